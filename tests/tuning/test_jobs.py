"""Remote submission without a cluster: token lookup, addresses, the job's working directory, and CLI errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tuning import jobs
from tuning.config import ConfigError, check_cluster_paths, load_experiment

REPOSITORY = Path(__file__).resolve().parents[2]
QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"


@pytest.fixture
def clean_token_environment(monkeypatch, tmp_path):
    """No token variables, and a home folder without ~/.ray/auth_token."""
    monkeypatch.delenv(jobs.TOKEN_VARIABLE, raising=False)
    monkeypatch.delenv(jobs.TOKEN_PATH_VARIABLE, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_token_none_found(clean_token_environment):
    assert jobs.read_token() is None


def test_token_from_variable_first(clean_token_environment, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    (clean_token_environment / ".ray").mkdir()
    (clean_token_environment / ".ray" / "auth_token").write_text("from-default-file")
    monkeypatch.setenv(jobs.TOKEN_PATH_VARIABLE, str(token_file))
    monkeypatch.setenv(jobs.TOKEN_VARIABLE, "from-variable")

    token = jobs.read_token()

    assert token.value == "from-variable"
    assert token.source == "RAY_AUTH_TOKEN"


def test_token_from_path_before_default_file(clean_token_environment, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    (clean_token_environment / ".ray").mkdir()
    (clean_token_environment / ".ray" / "auth_token").write_text("from-default-file")
    monkeypatch.setenv(jobs.TOKEN_PATH_VARIABLE, str(token_file))

    token = jobs.read_token()

    assert token.value == "from-file"
    assert str(token_file) in token.source


def test_token_from_default_file(clean_token_environment):
    (clean_token_environment / ".ray").mkdir()
    (clean_token_environment / ".ray" / "auth_token").write_text("from-default-file\n")

    token = jobs.read_token()

    assert token.value == "from-default-file"
    assert token.source == str(clean_token_environment / ".ray" / "auth_token")


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_token_path_missing_or_empty(clean_token_environment, monkeypatch, tmp_path, content):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    monkeypatch.setenv(jobs.TOKEN_PATH_VARIABLE, str(token_file))

    with pytest.raises(jobs.JobError, match="RAY_AUTH_TOKEN_PATH"):
        jobs.read_token()


@pytest.mark.parametrize("address, expected", [
    ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
    ("http://head.internal:8265/", "http://head.internal:8265"),
    ("127.0.0.1:8265", "http://127.0.0.1:8265"),
    ("https://ray.example.com", "https://ray.example.com"),
])
def test_dashboard_url_accepted(address, expected):
    assert jobs.dashboard_url(address) == expected


@pytest.mark.parametrize("address, message", [
    ("auto", "not a Jobs API address"),
    ("ray://10.0.0.5:10001", "not a Jobs API address"),
    ("ftp://10.0.0.5:8265", "invalid"),
    ("http://", "invalid"),
    ("http://10.0.0.5:port", "invalid port"),
])
def test_dashboard_url_rejected(address, message):
    with pytest.raises(ConfigError, match=message):
        jobs.dashboard_url(address)


def write_experiment_with_local_files(folder: Path) -> Path:
    """An experiment in `folder` that warm-starts from runs/earlier/results.csv, next to a run folder and a cache."""
    (folder / "runs" / "earlier" / "00001_trial").mkdir(parents=True)
    (folder / "runs" / "earlier" / "results.csv").write_text("trial_number,best_val_loss\n1,0.5\n")
    (folder / "runs" / "earlier" / "00001_trial" / "checkpoint.bin").write_bytes(b"\0" * 1000)
    (folder / "cache" / "embeddings").mkdir(parents=True)
    (folder / "cache" / "embeddings" / "key.npz").write_bytes(b"\0" * 1000)
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["warm_start"] = "runs/earlier/results.csv"
    data["cache_dir"] = str(folder / "cache")
    experiment = folder / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(data))
    return experiment


def test_working_dir_holds_experiment_and_inputs_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = write_experiment_with_local_files(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()

    staged = jobs.stage_working_dir("experiment.yaml", staging)
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    staged_data = yaml.safe_load(staged.read_text())

    assert staged == staging / "experiment.yaml"
    assert files == ["experiment.yaml", "inputs/search.warm_start/results.csv"]
    assert staged_data["search"]["warm_start"] == "inputs/search.warm_start/results.csv"
    assert (staging / "inputs/search.warm_start/results.csv").read_text() == (tmp_path / "runs/earlier/results.csv").read_text()
    assert staged_data["cache_dir"] == str(tmp_path / "cache")
    assert staged_data["storage"] == "./runs"
    assert yaml.safe_load(experiment.read_text())["search"]["warm_start"] == "runs/earlier/results.csv"


def test_working_dir_copies_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "1.png").write_bytes(b"png")
    data = yaml.safe_load(QUICKSTART.read_text())
    data["dataset"]["path"] = "images"
    data["backbone"]["weights"] = "pretrained"
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(data))
    staging = tmp_path / "staging"
    staging.mkdir()

    staged_data = yaml.safe_load(jobs.stage_working_dir("experiment.yaml", staging).read_text())

    assert staged_data["dataset"]["path"] == "inputs/dataset.path/images"
    assert (staging / "inputs/dataset.path/images/cat/1.png").read_bytes() == b"png"
    assert staged_data["backbone"]["weights"] == "pretrained"


def test_working_dir_size_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_experiment_with_local_files(tmp_path)
    monkeypatch.setattr(jobs, "MAX_WORKING_DIR_BYTES", 10)
    staging = tmp_path / "staging"
    staging.mkdir()

    with pytest.raises(ConfigError, match="Ray's dashboard accepts at most"):
        jobs.stage_working_dir("experiment.yaml", staging)


def test_entrypoint_passes_resume():
    command = jobs.entrypoint_command("quickstart.yaml", {"storage": "/mnt/shared/runs", "resume": True})

    assert command.endswith("--storage /mnt/shared/runs --resume")


def test_entrypoint_runs_same_overrides():
    command = jobs.entrypoint_command("my experiment.yaml", {"num_trials": 4, "storage": "/mnt/shared runs", "name": None}, "debug")

    assert command == (
        "python -m tuning --log-level debug run 'my experiment.yaml' --address auto "
        "--num-trials 4 --storage '/mnt/shared runs'"
    )


@pytest.mark.parametrize("field, value, message", [
    ("storage", "./runs", "storage: './runs' is a relative path"),
    ("storage", "runs", "storage: 'runs' is a relative path"),
    ("cache_dir", "cache", "cache_dir: 'cache' is a relative path"),
])
def test_cluster_paths_rejected(tmp_path, field, value, message):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["storage"] = "/mnt/shared/runs"
    data[field] = value
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(data))

    with pytest.raises(ConfigError, match=message):
        check_cluster_paths(load_experiment(experiment))


@pytest.mark.parametrize("storage", ["/mnt/shared/runs", "~/runs", "s3://bucket/runs", "gs://bucket/runs"])
def test_cluster_paths_accepted(tmp_path, storage):
    check_cluster_paths(load_experiment(QUICKSTART, {"storage": storage}))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def frozen_tune(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    environment["HOME"] = str(home)
    # The timeout only guards against a hang; the command itself gives up after jobs.CONNECT_TIMEOUT_SECONDS.
    return subprocess.run([sys.executable, "-m", "tuning", *arguments], capture_output=True, text=True, env=environment, timeout=120)


def test_cli_unreachable_address(tmp_path):
    address = f"http://127.0.0.1:{closed_port()}"

    listed = frozen_tune("jobs", "list", "--address", address, home=tmp_path)
    submitted = frozen_tune("submit", str(QUICKSTART), "--address", address, "--storage", str(tmp_path / "runs"), home=tmp_path)

    for completed in (listed, submitted):
        assert completed.returncode == 1
        assert f"cannot reach the Ray dashboard at {address}" in completed.stderr
        assert "Traceback" not in completed.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_grpc_port_named(tmp_path):
    # A server that responds like Ray's GCS port: bytes that are not an HTTP status line.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)

        def answer() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    # The reachability probe connects and closes without sending; a request gets the bytes.
                    if connection.recv(4096):
                        connection.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")

        threading.Thread(target=answer, daemon=True).start()
        completed = frozen_tune("jobs", "list", "--address", f"http://127.0.0.1:{server.getsockname()[1]}", home=tmp_path)

    assert completed.returncode == 1
    assert "does not respond in HTTP, so it is not the Ray dashboard" in completed.stderr
    assert "port 8265 by default" in completed.stderr


def test_cli_ray_client_address_rejected(tmp_path):
    completed = frozen_tune("submit", str(QUICKSTART), "--address", "ray://127.0.0.1:10001", "--storage", "/mnt/shared/runs", home=tmp_path)

    assert completed.returncode == 2
    assert "not a Jobs API address" in completed.stderr


def test_cli_submit_missing_file(tmp_path):
    completed = frozen_tune("submit", str(tmp_path / "missing.yaml"), "--address", "http://127.0.0.1:8265", home=tmp_path)

    assert completed.returncode == 2
    assert "missing.yaml' not found" in completed.stderr


def test_cli_jobs_need_address(tmp_path):
    completed = frozen_tune("jobs", "status", "some-job", home=tmp_path)

    assert completed.returncode == 2
    assert "--address" in completed.stderr
