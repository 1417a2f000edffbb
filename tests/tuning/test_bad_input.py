"""Malformed experiment files and datasets through `frozen-tune run`: exit code 2, a message naming the field, nothing written.

The command runs in this process through click's test runner; every case is
rejected before Ray or TensorFlow start, so no case starts Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_support import tiny_experiment
from click.testing import CliRunner

from tuning.cli import main

# (case id, the experiment file's text or a dict with dotted changes to the tiny experiment,
#  extra command-line options, strings the message must contain)
CASES: list[tuple[str, Any, list[str], list[str]]] = [
    ("yaml_syntax", "name: broken\nsearch: [unclosed\n", [], ["is not valid YAML", "line"]),
    ("top_level_list", "- name: a\n- name: b\n", [], ["must be a mapping"]),
    ("empty_file", "", [], ["is empty"]),
    ("duplicate_key", "name: a\ntraining: {max_epochs: 5}\ntraining: {max_epochs: 3}\n", [],
     ["key 'training' appears twice (first on line 2); merge the two entries into one", "line 3"]),
    ("unhashable_key", "name: a\n? [x, y]\n: 1\n", [], ["is not valid YAML", "found unhashable key", "line 2"]),
    ("missing_name", {"name": None}, [], ["name: required key is missing"]),
    ("missing_search", {"search": None}, [], ["search: required key is missing"]),
    ("unknown_top_key", {"serach": {"num_trials": 3}}, [], ["serach: unknown key", "did you mean 'search'"]),
    ("unknown_dataset_key", {"dataset.clases": [1, 2]}, [], ["dataset.clases: unknown key", "did you mean 'classes'"]),
    ("name_with_slash", {"name": "a/b"}, [], ["name", "'a/b'", "folder name"]),
    ("unknown_dataset", {"dataset.name": "mnist_fancy"}, [], ["dataset.name", "unknown dataset 'mnist_fancy'"]),
    ("single_class", {"dataset.classes": [5]}, [], ["dataset.classes", "at least 2 classes"]),
    ("duplicate_classes", {"dataset.classes": [5, 5, 6]}, [], ["dataset.classes", "distinct"]),
    ("class_not_in_dataset", {"dataset.classes": [5, 42]}, [], ["dataset:", "42"]),
    ("validation_split_above_one", {"dataset.validation_split": 1.5}, [], ["dataset.validation_split", "1.5"]),
    ("unknown_backbone", {"backbone.name": "resnet9000"}, [], ["backbone.name", "unknown backbone 'resnet9000'"]),
    ("image_size_too_small", {"backbone.image_size": 4}, [], ["backbone.image_size", "4"]),
    ("unknown_metric", {"search.metric": "val_auc"}, [], ["search.metric", "unknown metric 'val_auc'"]),
    ("invalid_mode", {"search.mode": "maximize"}, [], ["search.mode", "'maximize'"]),
    ("zero_trials", {"search.num_trials": 0}, [], ["search.num_trials", "0"]),
    ("trials_not_a_number", {"search.num_trials": "ten"}, [], ["search.num_trials", "'ten'"]),
    ("zero_concurrency", {"search.max_concurrent": 0}, [], ["search.max_concurrent", "0"]),
    ("negative_initial_points", {"search.initial_points": -1}, [], ["search.initial_points", "-1"]),
    ("unknown_acquisition", {"search.acquisition": "thompson"}, [], ["search.acquisition", "'thompson'"]),
    ("unknown_hyperparameter", {"search.space.momentum": {"type": "uniform", "low": 0.1, "high": 0.9}}, [],
     ["search.space.momentum: unknown hyperparameter", "the head accepts"]),
    ("uniform_low_above_high", {"search.space.dropout": {"type": "uniform", "low": 0.5, "high": 0.1}}, [],
     ["search.space.dropout", "low"]),
    ("loguniform_low_zero", {"search.space.learning_rate": {"type": "loguniform", "low": 0.0, "high": 0.1}}, [],
     ["search.space.learning_rate", "low"]),
    ("int_low_above_high", {"search.space.units_1": {"type": "int", "low": 128, "high": 32}}, [], ["search.space.units_1", "low"]),
    ("empty_choice", {"search.space.batch_size": {"type": "choice", "values": []}}, [], ["search.space.batch_size", "values"]),
    ("unknown_parameter_type", {"search.space.dropout": {"type": "normal", "low": 0.0, "high": 0.3}}, [],
     ["search.space.dropout", "unknown parameter type 'normal'"]),
    ("dropout_out_of_range", {"search.space.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, [],
     ["search.space.dropout.high: dropout must be in [0, 1), got 1.5"]),
    ("units_as_float_range", {"search.space.units_1": {"type": "uniform", "low": 32, "high": 128}}, [],
     ["search.space.units_1.type: units_1 takes whole numbers"]),
    ("fixed_and_tuned", {"head": {"dropout": 0.2}}, [], ["both fixed in head and tuned in search.space"]),
    ("unknown_fixed_hyperparameter", {"head": {"momentum": 0.9}}, [], ["head.momentum: unknown hyperparameter"]),
    ("zero_epochs", {"training.max_epochs": 0}, [], ["training.max_epochs", "0"]),
    ("zero_patience", {"training.patience": 0}, [], ["training.patience", "0"]),
    ("negative_retries", {"training.max_failures": -1}, [], ["training.max_failures", "-1"]),
    ("negative_checkpoint_interval", {"training.checkpoint_seconds": -5}, [], ["training.checkpoint_seconds", "-5"]),
    ("infinite_checkpoint_interval", {"training.checkpoint_seconds": float("inf")}, [], ["training.checkpoint_seconds", "inf"]),
    ("negative_cpus", {"resources.cpus_per_trial": -1}, [], ["resources.cpus_per_trial", "-1"]),
    ("boolean_cpus", {"resources.cpus_per_trial": True}, [], ["resources.cpus_per_trial: Input should be a number, not a boolean"]),
    ("boolean_dataset_seed", {"dataset.seed": True}, [], ["dataset.seed: Input should be a valid integer (got True)"]),
    ("boolean_bound", {"search.space.dropout": {"type": "uniform", "low": False, "high": 0.5}}, [],
     ["search.space.dropout.low: Input should be a number, not a boolean"]),
    ("boolean_int_bound", {"search.space.units_1": {"type": "int", "low": 32, "high": True}}, [],
     ["search.space.units_1.high: Input should be a valid integer (got True)"]),
    ("negative_gpus", {"resources.gpus_per_trial": -0.5}, [], ["resources.gpus_per_trial", "-0.5"]),
    ("unknown_scheduler", {"scheduler.name": "hyperband"}, [], ["scheduler.name", "'hyperband'"]),
    ("point_outside_space", {"search.points_to_evaluate": [{"learning_rate": 0.01}]}, [], ["points_to_evaluate[0]", "missing"]),
    ("warm_start_missing", {"search.warm_start": "/nonexistent/results.csv"}, [], ["search.warm_start", "/nonexistent/results.csv"]),
    ("storage_not_writable", {}, ["--storage", "/proc/frozen-tune-runs"], ["storage", "/proc/frozen-tune-runs", "not writable"]),
    ("storage_unknown_scheme", {}, ["--storage", "s4://bucket/runs"],
     ["storage: 's4://bucket/runs' is not a URI that pyarrow can open", "set storage (or --storage) to a folder"]),
    ("negative_trials_option", {}, ["--num-trials", "-3"], ["search.num_trials", "(set by --num-trials)"]),
    ("bad_name_option", {}, ["--name", "../escape"], ["name", "(set by --name)"]),
    ("missing_file", None, [], ["experiment file", "not found"]),
]


def write_case(folder: Path, content: Any) -> Path:
    path = folder / "experiment.yaml"
    if content is None:
        return path
    if isinstance(content, str):
        path.write_text(content)
        return path
    experiment = tiny_experiment(**content)
    path.write_text(yaml.safe_dump(experiment))
    return path


def test_table_has_thirty_cases():
    assert len({case_id for case_id, *_ in CASES}) >= 30


@pytest.mark.parametrize(("content", "options", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_without_output(tmp_path, content, options, expected):
    experiment = write_case(tmp_path, content)
    storage = tmp_path / "runs"
    arguments = ["run", str(experiment)]
    if "--storage" not in options:
        arguments += ["--storage", str(storage)]

    result = CliRunner().invoke(main, [*arguments, *options], env={"FROZEN_TUNE_CACHE": str(tmp_path / "cache")})

    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output
    assert not storage.exists()
    assert not (tmp_path / "cache").exists()
