"""A trial whose node dies is retried from its checkpoint on the surviving node.

The test starts its own two-node cluster, because it kills the worker node:
`frozen-tune run --address` drives two long trials at once on two
one-CPU nodes, and the worker node's process group gets SIGKILL while its
trial trains.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import requests
import yaml
from conftest import REPOSITORY, running_two_node_cluster

QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"

# Seconds between both trials' first checkpoints and the kill. With no early stop, a trial trains
# EPOCHS epochs, about 30 s on two cores (an estimate from one run), so the kill comes mid-trial.
KILL_AFTER_SECONDS = 0.5
EPOCHS = 400
RETRY_LINE = re.compile(r"trial (\d{5}) \((\w+)\) lost its worker .*retrying it from its last checkpoint")


def head_node_id(cluster) -> str:
    answer = requests.get(
        f"{cluster.dashboard_url}/nodes?view=summary", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=30,
    )
    answer.raise_for_status()
    nodes = answer.json()["data"]["summary"]
    return next(node["raylet"]["nodeId"] for node in nodes if node["raylet"].get("isHeadNode"))


# The head node has one CPU, so the retried trial waits for the other trial to finish first.
# On a loaded machine the whole test took more than the default 600 s.
@pytest.mark.timeout(1500)
def test_trial_on_lost_node_finishes_on_head(tmp_path):
    with running_two_node_cluster() as cluster:
        head = head_node_id(cluster)
        experiment = yaml.safe_load(QUICKSTART.read_text())
        experiment["name"] = "worker-loss"
        experiment["search"].update({"num_trials": 2, "max_concurrent": 2})
        # A checkpoint at every improving epoch, so both trials have one long before they finish.
        experiment["training"] = {"max_epochs": EPOCHS, "patience": EPOCHS, "max_failures": 2, "checkpoint_seconds": 0}
        path = tmp_path / "worker-loss.yaml"
        path.write_text(yaml.safe_dump(experiment))

        environment = cluster.client_environment()
        environment.update({"RAY_AUTH_MODE": "token", "FROZEN_TUNE_CACHE": str(cluster.folder / "cache")})
        # Standard output goes to a file: only the reader thread below may read the stderr pipe,
        # or lines such as the retry would be split between two readers.
        stdout_path = tmp_path / "driver.out"
        with stdout_path.open("w") as stdout:
            driver = subprocess.Popen(
                [sys.executable, "-m", "tuning", "run", str(path), "--address", cluster.gcs_address, "--storage", str(cluster.shared_storage)],
                stdout=stdout, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPOSITORY, start_new_session=True,
            )
        lines: list[str] = []
        tuner_started = threading.Event()

        def read_errors() -> None:
            for line in driver.stderr:
                lines.append(line)
                if "trials, at most 2 at a time" in line:
                    tuner_started.set()

        reader = threading.Thread(target=read_errors, daemon=True)
        reader.start()
        try:
            assert tuner_started.wait(timeout=600), "".join(lines)[-3000:]
            # Kill only once both first trials have stored a checkpoint, so the retry has one to resume from.
            run_dir = cluster.shared_storage / "worker-loss"
            deadline = time.monotonic() + 600
            while len([trial for trial in run_dir.glob("0000*") if any(trial.glob("checkpoint_*"))]) < 2:
                assert driver.poll() is None, "".join(lines)[-3000:]
                assert time.monotonic() < deadline, "the trials stored no checkpoints"
                time.sleep(0.1)
            time.sleep(KILL_AFTER_SECONDS)
            assert driver.poll() is None, "".join(lines)[-3000:]
            os.killpg(cluster.worker.pid, signal.SIGKILL)
            cluster.worker.wait(timeout=60)
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        reader.join(timeout=30)
        errors = "".join(lines)
        (tmp_path / "driver.log").write_text(errors)
        output = stdout_path.read_text()

        assert driver.returncode == 0, errors[-4000:]
        retried = RETRY_LINE.search(errors)
        assert retried, errors[-4000:]
        frame = pd.read_csv(cluster.shared_storage / "worker-loss" / "results.csv")
        assert len(frame) == 2
        assert (frame["status"] == "TERMINATED").all()
        row = frame.set_index("trial_id").loc[retried.group(2)]
        assert row["node"].endswith(head)
        assert row["epochs_run"] == EPOCHS
        # The retry continued from the trial's checkpoint instead of starting again at epoch 1.
        progress = pd.read_csv(os.path.join(row["path"], "progress.csv"))
        resumed_from = int(progress["resumed_from_epoch"].iloc[-1])
        assert 0 < resumed_from < EPOCHS
        assert (progress["epoch"] == resumed_from + 1).any()
        assert "Best trial" in output
