"""Warm start from an earlier run's results.csv, and the checks that the space still matches."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tuning.config import ConfigError, load_warm_start, parse_experiment
from tuning.experiment import search_space
from tuning.searcher import GaussianProcessSearcher

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"

EARLIER_RUN = pd.DataFrame({
    "trial_number": [1, 2, 3, 4, 5, 6, 7],
    "trial_id": ["a", "b", "c", "d", "e", "f", "g"],
    "learning_rate": [1e-3, 3e-3, 1e-2, 3e-4, 5e-2, 2e-3, 1e-3],
    "decay_rate": [0.1, 0.5, 0.9, 0.0, 0.3, 0.2, 0.4],
    "dropout": [0.1, 0.2, 0.3, 0.0, 0.5, 0.25, 0.15],
    "units_1": [128, 256, 64, 512, 32, 300, 200],
    "units_2": [64, 16, 128, 256, 32, 100, 50],
    "units_3": [16, 32, 64, 128, 16, 40, 20],
    "l2": [1e-5, 1e-4, 1e-3, 1e-6, 1e-2, 5e-5, 2e-5],
    "batch_size": [32, 64, 128, 256, 64, 32, 128],
    "best_val_loss": [0.2, 0.1, 0.5, 0.3, float("nan"), 0.15, 0.4],
    "status": ["TERMINATED", "TERMINATED", "TERMINATED", "TERMINATED", "TERMINATED", "TERMINATED", "ERROR"],
})


def config_with(tmp_path: Path, frame: pd.DataFrame, change=None):
    path = tmp_path / "results.csv"
    frame.to_csv(path, index=False)
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = str(path)
    if change:
        change(data)
    return parse_experiment(copy.deepcopy(data))


def test_finished_trials_registered(tmp_path):
    observations = load_warm_start(config_with(tmp_path, EARLIER_RUN))
    values = [value for _, value in observations]

    # The NaN row and the failed row come back as NaN, so the searcher counts them as failures.
    assert values[:4] == [0.2, 0.1, 0.5, 0.3]
    assert math.isnan(values[4])
    assert values[5] == 0.15
    assert math.isnan(values[6])
    assert observations[1][0]["units_1"] == 256
    assert type(observations[1][0]["units_1"]) is int
    assert observations[1][0]["batch_size"] == 64


def test_warm_searcher_skips_random_phase(tmp_path, caplog):
    config = config_with(tmp_path, EARLIER_RUN)
    searcher = GaussianProcessSearcher(search_space(config), metric="val_loss", mode="min", initial_points=5, seed=0)
    for point, value in load_warm_start(config):
        searcher.add_evaluated_point(point, value)

    with caplog.at_level(logging.INFO, logger="tuning.searcher"):
        config_suggested = searcher.suggest("t0")

    assert "now picks each configuration" in caplog.text
    assert len(searcher.observations) == 5
    # The two failed rows are known, so the GP will not suggest them again.
    assert len(searcher.get_state()["_failed_configs"]) == 2
    assert search_space(config).check(config_suggested) == []


def test_missing_parameter_column_rejected(tmp_path):
    with pytest.raises(ConfigError, match="has no column units_3"):
        load_warm_start(config_with(tmp_path, EARLIER_RUN.drop(columns=["units_3"])))


def test_parameter_dropped_from_space_rejected(tmp_path):
    def drop_units_3(data):
        del data["search"]["space"]["units_3"]

    with pytest.raises(ConfigError, match="tuned units_3, which the current search space does not"):
        load_warm_start(config_with(tmp_path, EARLIER_RUN, drop_units_3))


def test_narrowed_range_rejected(tmp_path):
    def narrow(data):
        data["search"]["space"]["units_1"] = {"type": "int", "low": 32, "high": 256}

    with pytest.raises(ConfigError) as raised:
        load_warm_start(config_with(tmp_path, EARLIER_RUN, narrow))

    assert "row 5, units_1: 512 is outside the current range [32, 256]" in str(raised.value)
    assert "row 3, units_1" not in str(raised.value)
    assert "it changed since that run" in str(raised.value)
    assert "widen search.space to cover these values, or remove warm_start" in str(raised.value)


def test_removed_choice_rejected(tmp_path):
    def fewer_batch_sizes(data):
        data["search"]["space"]["batch_size"] = {"type": "choice", "values": [32, 64, 128]}

    with pytest.raises(ConfigError, match="256 is not one of the current choices"):
        load_warm_start(config_with(tmp_path, EARLIER_RUN, fewer_batch_sizes))


def test_missing_file_rejected(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = str(tmp_path / "nope.csv")

    with pytest.raises(ConfigError, match="not found"):
        load_warm_start(parse_experiment(data))


def test_check_command_reads_warm_start(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = str(tmp_path / "missing.csv")
    experiment = tmp_path / "warm.yaml"
    experiment.write_text(yaml.safe_dump(data))

    completed = subprocess.run([sys.executable, "-m", "tuning", "check", str(experiment)], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 2
    assert "search.warm_start" in completed.stderr
    assert "not found" in completed.stderr


def earlier_snapshot(tmp_path: Path, change=None) -> None:
    """Write the experiment.json of the run that produced results.csv: the quickstart, changed by `change`."""
    data = yaml.safe_load(QUICKSTART.read_text())
    if change:
        change(data)
    (tmp_path / "experiment.json").write_text(parse_experiment(data).model_dump_json())


def test_same_search_snapshot_accepted(tmp_path):
    earlier_snapshot(tmp_path)

    assert len(load_warm_start(config_with(tmp_path, EARLIER_RUN))) == 7


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"mode": "max"}, "optimised val_loss (max), and this experiment optimises val_loss (min); its best_val_loss column holds each trial's highest value"),
        ({"metric": "val_accuracy", "mode": "max"}, "comes from a run that optimised val_accuracy (max), and this experiment optimises val_loss (min)"),
    ],
    ids=["mode", "metric"],
)
def test_different_earlier_search_rejected(tmp_path, change, expected):
    def apply(data):
        data["search"].update(change)

    earlier_snapshot(tmp_path, apply)

    with pytest.raises(ConfigError) as raised:
        load_warm_start(config_with(tmp_path, EARLIER_RUN))

    assert expected in str(raised.value)
    assert "warm-start from a run with the same metric and mode, or remove warm_start" in str(raised.value)


def test_changed_parameter_type_accepted(tmp_path):
    # Values are checked against the current space, so a range may become log-spaced or a choice an int.
    def earlier_types(data):
        data["search"]["space"]["learning_rate"] = {"type": "uniform", "low": 1.0e-4, "high": 1.0e-1}
        data["search"]["space"]["batch_size"] = {"type": "int", "low": 32, "high": 256}

    earlier_snapshot(tmp_path, earlier_types)

    assert len(load_warm_start(config_with(tmp_path, EARLIER_RUN))) == 7


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"search": []}', '{"search": {"metric": "val_loss"}}', "[]", '{"search": {"metric": 5, "mode": null}}'],
    ids=["invalid_json", "search_list", "no_mode", "list", "wrong_types"],
)
def test_unreadable_snapshot_rejected(tmp_path, content):
    (tmp_path / "experiment.json").write_text(content)

    with pytest.raises(ConfigError) as raised:
        load_warm_start(config_with(tmp_path, EARLIER_RUN))

    assert "experiment.json' beside it is not a frozen-tune run's experiment.json" in str(raised.value)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("units_1", 24.6, "row 2, units_1: 24.6 is not a whole number"),
        ("units_1", float("nan"), "row 2, units_1: nan is not a finite number"),
        ("dropout", float("inf"), "row 2, dropout: inf is not a finite number"),
    ],
)
def test_bad_parameter_value_named(tmp_path, column, value, expected):
    frame = EARLIER_RUN.copy()
    frame[column] = frame[column].astype(float)
    frame.loc[0, column] = value

    with pytest.raises(ConfigError) as raised:
        load_warm_start(config_with(tmp_path, frame))

    assert expected in str(raised.value)


def test_folder_rejected_with_file_named(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = str(tmp_path)

    with pytest.raises(ConfigError) as raised:
        load_warm_start(parse_experiment(data))

    assert f"{str(tmp_path)!r} is a folder; give the results.csv inside it, such as {str(tmp_path / 'results.csv')!r}" in str(raised.value)


def test_empty_path_rejected():
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = ""

    with pytest.raises(ConfigError, match="search.warm_start: warm_start is empty; give the results.csv of an earlier run"):
        parse_experiment(data)


def batch_size_only(data: dict) -> None:
    data["search"]["space"] = {"batch_size": {"type": "choice", "values": [32, 64, 128, 256]}}


def test_every_configuration_tried_rejected(tmp_path):
    frame = pd.DataFrame({"batch_size": [32, 64, 128, 256, 64], "best_val_loss": [0.3, 0.2, float("nan"), 0.4, 0.25]})

    with pytest.raises(ConfigError, match=r"tried every one of the 4 configurations .* widen search.space or remove warm_start"):
        load_warm_start(config_with(tmp_path, frame, batch_size_only))


def test_untried_configuration_accepted(tmp_path):
    frame = pd.DataFrame({"batch_size": [32, 64, 128, 64], "best_val_loss": [0.3, 0.2, 0.1, 0.25]})

    observations = load_warm_start(config_with(tmp_path, frame, batch_size_only))

    assert [point["batch_size"] for point, _ in observations] == [32, 64, 128, 64]
