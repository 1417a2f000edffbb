"""Experiment file validation: every malformed file names its field, and the CLI exits with 2."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tuning.config import ConfigError, check_datasets, check_storage_writable, load_experiment, parse_experiment

REPOSITORY = Path(__file__).resolve().parents[2]
QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"


def quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def changed(path: str, value) -> dict:
    """The quickstart with the dotted key `path` set to `value` (a value of `DELETE` removes it)."""
    data = copy.deepcopy(quickstart())
    *parents, last = path.split(".")
    target = data
    for part in parents:
        target = target.setdefault(part, {})
    if value == "DELETE":
        del target[last]
    else:
        target[last] = value
    return data


MALFORMED = [
    ("name", changed("name", "has space"), "name"),
    ("missing search", changed("search", "DELETE"), "search: required key is missing"),
    ("unknown top key", changed("serach", {}), "did you mean 'search'"),
    ("unknown dataset", changed("dataset.name", "mnist"), "dataset.name: unknown dataset 'mnist'"),
    ("one class", changed("dataset.classes", [5]), "dataset.classes"),
    ("repeated classes", changed("dataset.classes", [5, 5, 6]), "dataset.classes"),
    ("split above 1", changed("dataset.validation_split", 1.5), "dataset.validation_split"),
    ("unknown backbone", changed("backbone.name", "resnet9000"), "backbone.name: unknown backbone"),
    ("tiny image", changed("backbone.image_size", 2), "backbone.image_size"),
    ("unknown weights", changed("backbone.weights", "imagenet21k"), "backbone.weights"),
    ("pretrain epochs 0", changed("backbone.pretrain.epochs", 0), "backbone.pretrain.epochs"),
    ("unknown metric", changed("search.metric", "f1"), "search.metric: unknown metric 'f1'"),
    ("bad mode", changed("search.mode", "minimize"), "search.mode"),
    ("zero trials", changed("search.num_trials", 0), "search.num_trials"),
    ("zero concurrency", changed("search.max_concurrent", 0), "search.max_concurrent"),
    ("negative initial points", changed("search.initial_points", -1), "search.initial_points"),
    ("unknown acquisition", changed("search.acquisition", "thompson"), "search.acquisition"),
    ("unknown hyperparameter", changed("search.space.learning_rat", {"type": "uniform", "low": 0, "high": 1}), "did you mean 'learning_rate'"),
    ("low above high", changed("search.space.dropout", {"type": "uniform", "low": 0.5, "high": 0.1}), "search.space.dropout: low must be < high"),
    ("loguniform from 0", changed("search.space.l2", {"type": "loguniform", "low": 0.0, "high": 0.1}), "search.space.l2: loguniform needs low > 0"),
    ("empty choice", changed("search.space.batch_size", {"type": "choice", "values": []}), "search.space.batch_size.values"),
    ("unknown type", changed("search.space.dropout", {"type": "normal", "low": 0, "high": 1}), "unknown parameter type 'normal'"),
    ("misspelt bound", changed("search.space.dropout", {"type": "uniform", "low": 0, "hihg": 1}), "did you mean 'high'"),
    ("fractional units", changed("search.space.units_1", {"type": "uniform", "low": 8, "high": 64}), "search.space.units_1.type: units_1 takes whole numbers"),
    ("dropout of 1", changed("search.space.dropout", {"type": "uniform", "low": 0.0, "high": 1.0}), "search.space.dropout.high: dropout must be in [0, 1), got 1.0"),
    ("unknown activation", changed("search.space.activation", {"type": "choice", "values": ["relu", "swishy"]}), "search.space.activation.values: 'swishy' is not accepted for activation"),
    ("zero batch size", changed("search.space.batch_size", {"type": "choice", "values": [0, 32]}), "search.space.batch_size.values: batch_size must be a whole number >= 1, got 0"),
    ("text epochs", changed("training.max_epochs", "ten"), "training.max_epochs"),
    ("zero patience", changed("training.patience", 0), "training.patience"),
    ("unknown scheduler", changed("scheduler.name", "hyperband"), "scheduler.name"),
    ("negative cpus", changed("resources.cpus_per_trial", -1), "resources.cpus_per_trial"),
    ("negative gpus", changed("resources.gpus_per_trial", -0.5), "resources.gpus_per_trial"),
    ("empty storage", changed("storage", ""), "storage: storage is empty; give a folder such as ./runs"),
    ("count with a decimal point", changed("search.num_trials", 30.0), "search.num_trials: must be a whole number written without a decimal point: write 30 (got 30.0)"),
    ("empty space", changed("search.space", {}), "search.space: must not be empty"),
    ("fixed and tuned", changed("head", {"dropout": 0.1}), "both fixed in head and tuned"),
    ("fixed activation unknown", changed("head", {"activation": "swishy"}), "head.activation: 'swishy' is not accepted for activation"),
    ("point outside space", changed("search.points_to_evaluate", [{"dropout": 0.1}]), "points_to_evaluate[0]"),
    ("negative seed", changed("search.seed", -1), "search.seed: Input should be greater than or equal to 0 (got -1)"),
    ("true seed", changed("search.seed", True), "search.seed: Input should be a valid integer (got True)"),
    ("true initial points", changed("search.initial_points", True), "search.initial_points: Input should be a valid integer (got True)"),
    ("true epochs", changed("training.max_epochs", True), "training.max_epochs: Input should be a valid integer (got True)"),
]


def point(**values) -> dict:
    """A point of the quickstart's space, with `values` replacing its defaults."""
    defaults = {
        "learning_rate": 0.01, "decay_rate": 0.5, "dropout": 0.2, "units_1": 64, "units_2": 32, "units_3": 16,
        "l2": 1.0e-4, "batch_size": 64,
    }
    return {**defaults, **values}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"learning_rate": 1.0}, "points_to_evaluate[0].learning_rate: 1.0 is outside the loguniform range [0.0001, 0.1]"),
        ({"learning_rate": "fast"}, "points_to_evaluate[0].learning_rate: 'fast' is not a number"),
        ({"learning_rate": float("nan")}, "points_to_evaluate[0].learning_rate: nan is not a finite number"),
        ({"units_1": 40.5}, "points_to_evaluate[0].units_1: 40.5 is not a whole number"),
        ({"units_1": True}, "points_to_evaluate[0].units_1: True is not a number"),
        ({"batch_size": 48}, "points_to_evaluate[0].batch_size: 48 is not one of the choices [32, 64, 128, 256]"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_point_value_outside_space(values, expected):
    with pytest.raises(ConfigError) as raised:
        parse_experiment(changed("search.points_to_evaluate", [point(**values)]))

    assert expected in str(raised.value)
    assert "give values inside search.space" in str(raised.value)


def test_point_whole_float_accepted():
    config = parse_experiment(changed("search.points_to_evaluate", [point(units_1=64.0)]))

    assert config.search.points_to_evaluate[0]["units_1"] == 64.0


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_experiment_names_field(data, expected):
    with pytest.raises(ConfigError) as raised:
        parse_experiment(data)

    assert expected in str(raised.value)


def test_every_problem_reported_together():
    data = changed("trainng", {"max_epochs": 3})
    data["search"]["space"]["dropout"] = {"type": "uniform", "low": 0.9, "high": 0.1}
    data["search"]["space"]["units_22"] = data["search"]["space"].pop("units_2")

    with pytest.raises(ConfigError) as raised:
        parse_experiment(data)
    message = str(raised.value)

    assert "trainng: unknown key (did you mean 'training'?)" in message
    assert "search.space.dropout: low must be < high" in message
    assert "search.space.units_22: unknown hyperparameter (did you mean 'units_2'?)" in message


def test_override_errors_name_the_option():
    with pytest.raises(ConfigError) as raised:
        load_experiment(QUICKSTART, {"name": "a b", "search.num_trials": 0}, option_names={"name": "--name", "search.num_trials": "--num-trials"})

    assert "(set by --name)" in str(raised.value)
    assert "(set by --num-trials)" in str(raised.value)


def test_file_errors_name_no_option(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["num_trials"] = "thirty"
    path = tmp_path / "thirty.yaml"
    path.write_text(yaml.safe_dump(data))

    with pytest.raises(ConfigError) as raised:
        load_experiment(path, {"search.num_trials": None}, option_names={"search.num_trials": "--num-trials"})

    assert "search.num_trials: Input should be a valid integer" in str(raised.value)
    assert "(got 'thirty')" in str(raised.value)
    assert "set by" not in str(raised.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("dataset.classes", [5, 6, 19], "dataset: "),
        ("backbone.pretrain.classes", [0, 1, 42], "backbone.pretrain: "),
    ],
    ids=["tuned classes", "pretrain classes"],
)
def test_classes_missing_from_dataset(path, value, expected):
    config = parse_experiment(changed(path, value))

    with pytest.raises(ConfigError) as raised:
        check_datasets(config)

    assert str(raised.value).startswith(expected)
    assert str(value[-1]) in str(raised.value)


def test_quickstart_is_valid():
    config = load_experiment(QUICKSTART)

    assert config.search.num_trials == 30
    assert config.search.max_concurrent == 2
    assert config.dataset.classes == [5, 6, 7, 8, 9]
    assert config.backbone.pretrain.classes == [0, 1, 2, 3, 4]
    assert set(config.search.space) == {"learning_rate", "decay_rate", "dropout", "units_1", "units_2", "units_3", "l2", "batch_size"}


def test_mode_defaults_from_metric():
    assert parse_experiment(changed("search.mode", "DELETE")).search.mode == "min"
    accuracy = changed("search.mode", "DELETE")
    accuracy["search"]["metric"] = "val_accuracy"
    assert parse_experiment(accuracy).search.mode == "max"


def test_overrides_replace_values(tmp_path):
    config = load_experiment(QUICKSTART, {"search.num_trials": 3, "storage": str(tmp_path), "name": "other"})

    assert config.search.num_trials == 3
    assert config.storage == str(tmp_path)
    assert config.run_dir() == f"{tmp_path}/other"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "is empty"),
    ],
    ids=["broken yaml", "list", "empty file"],
)
def test_unreadable_files_rejected(tmp_path, content, expected):
    path = tmp_path / "experiment.yaml"
    path.write_text(content)

    with pytest.raises(ConfigError, match=expected):
        load_experiment(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_cli_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(changed("search.space.dropout", {"type": "uniform", "low": 0.9, "high": 0.1})))
    storage = tmp_path / "runs"

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(path), "--storage", str(storage)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "FROZEN_TUNE_CACHE": str(tmp_path / "cache")},
    )

    assert completed.returncode == 2
    assert "search.space.dropout: low must be < high" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not storage.exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["run", "resume"])
@pytest.mark.parametrize("below", ["", "runs"])
def test_cli_rejects_file_as_storage(tmp_path, below, resume):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    storage = blocker / below if below else blocker

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(QUICKSTART), "--storage", str(storage), *resume],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 2
    assert f"storage: '{storage}' is not a folder because '{blocker}' is a file" in completed.stderr
    assert "set storage (or --storage) to a folder you can write to" in completed.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["run", "resume"])
@pytest.mark.parametrize("kind", ["file", "link-to-file", "broken-link"])
def test_cli_rejects_non_folder_as_run_folder(tmp_path, kind, resume):
    storage = tmp_path / "runs"
    storage.mkdir()
    run_dir = storage / "quickstart"
    target = tmp_path / "target"
    if kind == "file":
        run_dir.write_text("not a folder")
    else:
        if kind == "link-to-file":
            target.write_text("not a folder")
        run_dir.symlink_to(target)

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(QUICKSTART), "--storage", str(storage), *resume],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 2
    if kind == "broken-link":
        assert f"{run_dir} is a symbolic link to '{target}', which does not exist" in completed.stderr
        assert not target.exists()
    else:
        assert f"{run_dir} is not a folder, so it cannot be the run folder of experiment 'quickstart'" in completed.stderr
        assert (target if kind == "link-to-file" else run_dir).read_text() == "not a folder"
    assert "Traceback" not in completed.stderr
    assert sorted(path.name for path in storage.iterdir()) == ["quickstart"]


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("/proc/frozen-tune-runs", "storage: '/proc/frozen-tune-runs' is not writable"),
        ("foo://bucket/runs", "storage: 'foo://bucket/runs' is not a URI that pyarrow can open"),
        ("s3://", "storage: 's3://' names no bucket; set storage (or --storage) to a bucket and a folder in it, such as s3://bucket/runs"),
        ("gs://", "storage: 'gs://' names no bucket; set storage (or --storage) to a bucket and a folder in it, such as gs://bucket/runs"),
    ],
    ids=["unwritable", "unknown-scheme", "s3-without-bucket", "gs-without-bucket"],
)
def test_check_command_checks_storage(tmp_path, storage, expected):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(changed("storage", storage)))

    # Without this, pyarrow's S3 client asks the EC2 metadata address for credentials.
    environment = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "check", str(path)], capture_output=True, text=True, timeout=60, env=environment,
    )

    assert completed.returncode == 2
    assert expected in completed.stderr
    # `check` has no --storage option, so the fix names the experiment file's key first.
    assert "set storage (or --storage) to a " in completed.stderr


def serve_locally(keep_open: bool):
    """Yield the port of a server on 127.0.0.1 that holds every connection open without a response, or closes it at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    connections = []

    def accept() -> None:
        while True:
            try:
                connection = server.accept()[0]
            except OSError:
                return
            if keep_open:
                connections.append(connection)
            else:
                connection.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in connections:
        connection.close()


@pytest.fixture
def silent_server():
    """Return the port of a server on 127.0.0.1 that accepts connections and never responds."""
    yield from serve_locally(keep_open=True)


def test_storage_uri_lookup_times_out(silent_server, monkeypatch):
    monkeypatch.setattr("tuning.config.STORAGE_URI_TIMEOUT_SECONDS", 1.0)
    # With a region and without the EC2 metadata lookup, the S3 client contacts only the local server.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{silent_server}&scheme=http&region=us-east-1"
    config = parse_experiment(changed("storage", uri))

    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        check_storage_writable(config)

    assert str(raised.value).startswith(f"storage: looking up {uri!r} timed out after 1 s;")
    assert "or set storage (or --storage) to a folder" in str(raised.value)
    assert time.monotonic() - started < 10


@pytest.fixture
def closing_server():
    """Return the port of a server on 127.0.0.1 that closes every connection at once."""
    yield from serve_locally(keep_open=False)


def test_storage_uri_lookup_error_names_cause(closing_server, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{closing_server}&scheme=http&region=us-east-1"
    config = parse_experiment(changed("storage", uri))

    with pytest.raises(ConfigError) as raised:
        check_storage_writable(config)

    assert str(raised.value).startswith(f"storage: cannot reach {uri!r} (When getting information for key 'runs' in bucket 'bucket'")
    assert str(raised.value).endswith("check the URI, the network and the credentials, or set storage (or --storage) to a folder")


def test_check_command_leaves_no_storage_folder(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(changed("storage", str(tmp_path / "new" / "runs"))))

    completed = subprocess.run([sys.executable, "-m", "tuning", "check", str(path)], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr
    assert not (tmp_path / "new").exists()


def test_cli_rejects_storage_under_proc(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(QUICKSTART), "--storage", "/proc/frozen-tune-runs"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "FROZEN_TUNE_CACHE": str(tmp_path / "cache")},
    )

    assert completed.returncode == 2
    assert "storage: '/proc/frozen-tune-runs' is not writable" in completed.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("address", "exit_code", "expected"),
    [
        ("127.0.0.1:1", 1, "cannot reach Ray at '127.0.0.1:1'"),
        ("bogus", 2, "invalid Ray address 'bogus'; use auto, HOST:PORT"),
        ("http://127.0.0.1:8265", 2, "'http://127.0.0.1:8265' is a dashboard address, which `frozen-tune submit`"),
        ("HTTPS://127.0.0.1:8265", 2, "'HTTPS://127.0.0.1:8265' is a dashboard address"),
    ],
    ids=["unreachable", "malformed", "dashboard", "dashboard-upper-case"],
)
def test_cli_bad_address_fails_fast(tmp_path, address, exit_code, expected):
    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(QUICKSTART), "--storage", str(tmp_path / "runs"), "--address", address],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FROZEN_TUNE_CACHE": str(tmp_path / "cache")},
    )

    assert completed.returncode == exit_code
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "runs" / "quickstart").exists()


def test_snapshot_without_added_field_matches(tmp_path):
    from tuning.run_folder import SNAPSHOT_FILE, snapshot_differences

    config = parse_experiment(quickstart())
    saved = config.model_dump(mode="json")
    del saved["backbone"]["precision"]
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(saved))
    assert snapshot_differences(config, tmp_path) == []

    saved["backbone"]["precision"] = "float32"
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(saved))
    assert snapshot_differences(config, tmp_path) == ["backbone.precision: 'float32' -> 'auto'"]
