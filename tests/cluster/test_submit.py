"""`frozen-tune submit` and `frozen-tune jobs` against a real two-node Ray cluster with token authentication."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]

QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"
NUM_TRIALS = 4
COMMAND_TIMEOUT_SECONDS = 900


def frozen_tune(cluster, *arguments: str, token: str | None = "cluster", cwd: Path = REPOSITORY) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuning", *arguments], capture_output=True, text=True, cwd=cwd,
        env=cluster.client_environment(token=token), timeout=COMMAND_TIMEOUT_SECONDS,
    )


def submitted_jobs(cluster) -> list[dict]:
    answer = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()


def job_id_from(output: str) -> str:
    match = re.search(r"Submitted job (\S+) to", output)
    assert match, output[-2000:]
    return match.group(1)


@pytest.fixture(scope="module")
def quickstart_job(two_node_cluster):
    completed = frozen_tune(
        two_node_cluster, "submit", str(QUICKSTART), "--address", two_node_cluster.dashboard_url,
        "--num-trials", str(NUM_TRIALS), "--storage", str(two_node_cluster.shared_storage), "--wait",
    )
    return completed


def test_submit_wait_succeeds(quickstart_job):
    assert quickstart_job.returncode == 0, quickstart_job.stdout[-4000:] + quickstart_job.stderr[-3000:]
    assert "succeeded" in quickstart_job.stdout
    assert "Best trial" in quickstart_job.stdout
    assert job_id_from(quickstart_job.stdout).startswith("frozen-tune-quickstart-")


def test_trials_ran_on_both_nodes(two_node_cluster, quickstart_job):
    frame = pd.read_csv(two_node_cluster.shared_storage / "quickstart" / "results.csv")

    assert len(frame) == NUM_TRIALS
    assert (frame["status"] == "TERMINATED").all()
    assert frame["node"].str.startswith("127.0.0.1 ").all()
    assert frame["node"].nunique() == 2


def test_outputs_in_shared_storage(two_node_cluster, quickstart_job):
    run_dir = two_node_cluster.shared_storage / "quickstart"
    best = json.loads((run_dir / "best_config.json").read_text())
    trial_folders = [path for path in run_dir.iterdir() if path.is_dir() and path.name[:5].isdigit()]

    assert (run_dir / "best_model.keras").stat().st_size > 10_000
    assert (run_dir / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert best["trial_id"] in (run_dir / "report.md").read_text()
    assert len(trial_folders) == NUM_TRIALS
    for folder in trial_folders:
        assert len(list(folder.glob("checkpoint_*"))) == 1


def test_jobs_list_status_logs(two_node_cluster, quickstart_job):
    job_id = job_id_from(quickstart_job.stdout)
    address = ["--address", two_node_cluster.dashboard_url]

    listed = frozen_tune(two_node_cluster, "jobs", "list", *address)
    status = frozen_tune(two_node_cluster, "jobs", "status", job_id, *address)
    logs = frozen_tune(two_node_cluster, "jobs", "logs", job_id, *address)
    followed = frozen_tune(two_node_cluster, "jobs", "logs", job_id, "--follow", *address)

    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"{re.escape(job_id)}\s+SUCCEEDED\s+.*quickstart", listed.stdout)
    assert status.returncode == 0, status.stderr
    assert re.search(r"status:\s+SUCCEEDED", status.stdout)
    assert "--address auto" in status.stdout
    assert f"--storage {two_node_cluster.shared_storage}" in status.stdout
    assert logs.returncode == 0, logs.stderr
    assert "Best trial" in logs.stdout
    assert followed.returncode == 0, followed.stderr
    assert "Best trial" in followed.stdout


def test_submit_without_token_rejected(two_node_cluster):
    before = len(submitted_jobs(two_node_cluster))

    completed = frozen_tune(
        two_node_cluster, "submit", str(QUICKSTART), "--address", two_node_cluster.dashboard_url,
        "--storage", str(two_node_cluster.shared_storage), "--name", "no-token", token=None,
    )

    assert completed.returncode == 1
    assert "requires an authentication token (HTTP 401)" in completed.stderr
    assert "RAY_AUTH_TOKEN" in completed.stderr
    assert len(submitted_jobs(two_node_cluster)) == before


def test_submit_with_wrong_token_rejected(two_node_cluster):
    before = len(submitted_jobs(two_node_cluster))

    completed = frozen_tune(
        two_node_cluster, "submit", str(QUICKSTART), "--address", two_node_cluster.dashboard_url,
        "--storage", str(two_node_cluster.shared_storage), "--name", "wrong-token", token="0" * 64,
    )

    assert completed.returncode == 1
    assert "rejected the token from RAY_AUTH_TOKEN (HTTP 403)" in completed.stderr
    assert "0" * 64 not in completed.stderr
    assert len(submitted_jobs(two_node_cluster)) == before


@pytest.mark.parametrize(
    ("token", "auth_mode", "expected"),
    [
        (None, None, "if the cluster checks tokens, that this machine has its token: set RAY_AUTH_TOKEN"),
        (None, "token", "requires an authentication token and none was found; set RAY_AUTH_TOKEN"),
        ("0" * 64, None, "if the cluster checks tokens, that the token from RAY_AUTH_TOKEN is the cluster's"),
    ],
    ids=["none", "none-token-mode", "wrong"],
)
def test_run_address_token_problem_named(two_node_cluster, token, auth_mode, expected):
    name = f"run-token-{'none' if token is None else 'wrong'}-{auth_mode}"
    environment = two_node_cluster.client_environment(token=token)
    if auth_mode:
        environment["RAY_AUTH_MODE"] = auth_mode

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(QUICKSTART), "--address", two_node_cluster.gcs_address,
         "--storage", str(two_node_cluster.shared_storage), "--name", name],
        capture_output=True, text=True, env=environment, timeout=COMMAND_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 1
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr
    assert "0" * 64 not in completed.stderr
    assert not (two_node_cluster.shared_storage / name).exists()


def test_token_from_token_path(two_node_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(two_node_cluster.token + "\n")
    environment = two_node_cluster.client_environment(token=None)
    environment["RAY_AUTH_TOKEN_PATH"] = str(token_file)

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "jobs", "list", "--address", two_node_cluster.dashboard_url],
        capture_output=True, text=True, env=environment, timeout=COMMAND_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 0, completed.stderr
    assert "JOB ID" in completed.stdout


def test_token_from_default_file(two_node_cluster, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(two_node_cluster.token)

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "jobs", "list", "--address", two_node_cluster.dashboard_url],
        capture_output=True, text=True, env=two_node_cluster.client_environment(token=None, home=tmp_path),
        timeout=COMMAND_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 0, completed.stderr
    assert "JOB ID" in completed.stdout


def test_invalid_experiment_not_sent(two_node_cluster, tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["search"]["space"]["dropout"] = {"type": "uniform", "low": 0.9, "high": 0.1}
    experiment = tmp_path / "bad.yaml"
    experiment.write_text(yaml.safe_dump(data))
    before = len(submitted_jobs(two_node_cluster))

    completed = frozen_tune(
        two_node_cluster, "submit", str(experiment), "--address", two_node_cluster.dashboard_url,
        "--storage", str(two_node_cluster.shared_storage), "--wait",
    )

    assert completed.returncode == 2
    assert "search.space.dropout: low must be < high" in completed.stderr
    assert "Submitted job" not in completed.stdout
    assert len(submitted_jobs(two_node_cluster)) == before


def test_relative_storage_not_sent(two_node_cluster):
    before = len(submitted_jobs(two_node_cluster))

    completed = frozen_tune(two_node_cluster, "submit", str(QUICKSTART), "--address", two_node_cluster.dashboard_url)

    assert completed.returncode == 2
    assert "storage: './runs' is a relative path" in completed.stderr
    assert "--storage" in completed.stderr
    assert len(submitted_jobs(two_node_cluster)) == before


def test_node_local_storage_refused(two_node_cluster):
    storage = two_node_cluster.node_local_storage

    completed = frozen_tune(
        two_node_cluster, "submit", str(QUICKSTART), "--address", two_node_cluster.dashboard_url,
        "--num-trials", "1", "--storage", str(storage), "--name", "node-local", "--wait",
    )

    assert completed.returncode == 1
    assert f"storage: {str(storage)!r} is not shared: 1 of 2 nodes cannot see" in completed.stdout
    assert "s3://" in completed.stdout
    assert "ended with status FAILED" in completed.stderr
    # The streamed log already showed the error, so the final message does not repeat it.
    assert "is not shared" not in completed.stderr
    assert not (storage / "node-local").exists()
    assert not list(storage.glob(".frozen-tune-probe-*"))


def test_unknown_job_id(two_node_cluster):
    address = ["--address", two_node_cluster.dashboard_url]

    for command in (["status"], ["logs"], ["stop"]):
        completed = frozen_tune(two_node_cluster, "jobs", *command, "frozen-tune-no-such-job", *address)

        assert completed.returncode == 1, command
        assert "job 'frozen-tune-no-such-job' not found" in completed.stderr, command


def test_stop_running_job(two_node_cluster):
    address = ["--address", two_node_cluster.dashboard_url]
    submitted = frozen_tune(
        two_node_cluster, "submit", str(QUICKSTART), *address, "--num-trials", "2",
        "--storage", str(two_node_cluster.shared_storage), "--name", "to-stop",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_from(submitted.stdout)

    stopped = frozen_tune(two_node_cluster, "jobs", "stop", job_id, *address)
    status = ""
    for _ in range(60):
        status = frozen_tune(two_node_cluster, "jobs", "status", job_id, *address).stdout
        if re.search(r"status:\s+(STOPPED|SUCCEEDED|FAILED)", status):
            break
        time.sleep(2)

    assert stopped.returncode == 0, stopped.stderr
    assert f"Stop requested for job {job_id}" in stopped.stdout
    assert re.search(r"status:\s+STOPPED", status), status
