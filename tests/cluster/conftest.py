"""A real two-node Ray cluster on 127.0.0.1 with token authentication, for the remote-submission tests.

The head and one worker run as `ray start --block` processes, each in a
process group of its own, with free ports and a Ray temp dir of its own.
Nodes that share a temp dir also share the unpacked job working
directories, and one node's clean-up removes the other's. The fixture's finaliser stops exactly those two process groups.

Both nodes get PYTHONPATH set to this checkout, which stands in for a real
cluster's `pip install` of the project in its setup commands: the jobs
import the code under test, not another installed copy.

The worker node runs in a mount namespace of its own, with an empty tmpfs
mounted over `node_local_storage`: to the head that folder is an ordinary
folder, to the worker it is a different, empty one, like a folder on one
machine's local disk. Every other path is the same on both nodes.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPOSITORY = Path(__file__).resolve().parents[2]

# Seconds the nodes get to start, and to stop after SIGTERM before they are killed.
START_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 45
NODE_OBJECT_STORE_BYTES = 300 * 1024**2


@dataclass(frozen=True)
class TwoNodeCluster:
    """Addresses and folders of the running cluster."""

    dashboard_url: str
    token: str
    shared_storage: Path
    node_local_storage: Path
    folder: Path
    gcs_address: str
    worker: subprocess.Popen

    def client_environment(self, *, token: str | None = "cluster", home: Path | None = None) -> dict[str, str]:
        """Environment for a `frozen-tune` client process, with the cluster's token, another token, or none.

        HOME points at an empty folder, so a token file in the real home folder is never read.
        """
        environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        environment["HOME"] = str(home or self.folder / "client-home")
        environment["PYTHONPATH"] = str(REPOSITORY)
        environment["RAY_USAGE_STATS_ENABLED"] = "0"
        if token == "cluster":
            environment["RAY_AUTH_TOKEN"] = self.token
        elif token is not None:
            environment["RAY_AUTH_TOKEN"] = token
        return environment


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_node(command: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        return subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(url: str, token: str, expected: int, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait until the dashboard accepts an authenticated request and lists `expected` alive nodes."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                pytest.fail(f"a Ray node exited with code {process.returncode} while starting:\n{log.read_text()[-3000:]}")
        try:
            answer = requests.get(f"{url}/nodes?view=summary", headers=headers, timeout=5)
            if answer.status_code == 200:
                summary = answer.json()["data"]["summary"]
                alive = [node for node in summary if node["raylet"]["state"] == "ALIVE"]
                if len(alive) >= expected:
                    return
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(2)
    pytest.fail(f"the two-node cluster did not start within {START_TIMEOUT_SECONDS} s:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def _stop_process_groups(processes: list[subprocess.Popen]) -> None:
    """Stop the nodes: SIGTERM to each process group, SIGKILL after STOP_TIMEOUT_SECONDS, then wait until each group is empty."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for process in processes:
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)


@pytest.fixture(scope="session")
def two_node_cluster():
    """One cluster for the whole session; tests must leave both nodes running."""
    with running_two_node_cluster() as cluster:
        yield cluster


@contextmanager
def running_two_node_cluster() -> Iterator[TwoNodeCluster]:
    """Start the head and the worker node, yield the cluster, and stop both process groups at the end."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("the two-node test needs root and util-linux's unshare to give the worker node a folder of its own")

    # A short path: Ray's Unix sockets live under the temp dir, and socket paths are limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="ft2n-", dir="/tmp"))
    token = secrets.token_hex(32)
    shared_storage = folder / "shared-runs"
    node_local_storage = folder / "node-local-runs"
    cache = folder / "cache"
    for path in (shared_storage, node_local_storage, cache, folder / "client-home", folder / "node-home"):
        path.mkdir()

    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    environment.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPOSITORY), "FROZEN_TUNE_CACHE": str(cache), "HOME": str(folder / "node-home"),
    })
    ray_command = str(Path(sys.executable).with_name("ray"))
    if not Path(ray_command).exists():
        ray_command = shutil.which("ray")
    gcs_port, dashboard_port = free_port(), free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(NODE_OBJECT_STORE_BYTES),
              "--disable-usage-stats"]

    head_log, worker_log = folder / "head.log", folder / "worker.log"
    head = _start_node(
        [ray_command, "start", "--head", *common, "--temp-dir", str(folder / "head"), "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())],
        environment, head_log,
    )
    processes, logs = [head], [head_log]
    try:
        worker_command = shlex.join([
            ray_command, "start", *common, "--temp-dir", str(folder / "worker"), "--address", f"127.0.0.1:{gcs_port}",
            "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
        ])
        worker = _start_node(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c",
             f"mount -t tmpfs tmpfs {shlex.quote(str(node_local_storage))} && exec {worker_command}"],
            environment, worker_log,
        )
        processes.append(worker)
        logs.append(worker_log)
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_nodes(url, token, 2, processes, logs)
        yield TwoNodeCluster(url, token, shared_storage, node_local_storage, folder, f"127.0.0.1:{gcs_port}", worker)
    finally:
        _stop_process_groups(processes)
        shutil.rmtree(folder, ignore_errors=True)

