"""Run storage: the check that every node of a cluster reaches it, and writing outputs to a URI."""

from __future__ import annotations

import logging
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tuning.config import ConfigError, ExperimentConfig, temporary_folders

logger = logging.getLogger(__name__)

# Seconds to wait for every node to run the storage check. The probe tasks need no CPU, so
# only a node that is starting up or overloaded takes longer than a second or two.
PROBE_TIMEOUT_SECONDS = 120
PROBE_PREFIX = ".frozen-tune-probe-"


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def check_storage_shared(config: ExperimentConfig) -> None:
    """Check that every alive node of the connected cluster can read the run's local storage folder.

    Trials write checkpoints on the node they run on and the driver writes
    the results, so a folder that exists on one node only would scatter the
    run over several disks. The driver writes a probe file with a random
    content into the storage folder, and a task pinned to each node reads it
    back. The folders the probe needed are removed again afterwards. Cloud
    URIs (s3://, gs://) pass without a check.

    NOTE: nodes that join later (autoscaling) are not checked.

    Raises:
        ConfigError: naming the nodes that cannot see the folder and what to use instead.
    """
    if config.is_remote_storage:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    folder = Path(config.storage_path())
    content = secrets.token_hex(16)
    probe = folder / f"{PROBE_PREFIX}{content[:8]}"
    with temporary_folders(folder):
        probe.write_text(content, encoding="utf-8")
        try:
            answers = _read_on_every_node(probe, nodes, folder)
        finally:
            probe.unlink(missing_ok=True)

    missing = [node for node, answer in zip(nodes, answers) if answer != content]
    if missing:
        names = ", ".join(f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})" for node in missing)
        raise ConfigError(
            f"storage: {config.storage!r} is not shared: {len(missing)} of {len(nodes)} nodes cannot see {folder} ({names}). "
            "A run on a cluster needs storage every node can reach: pass --storage with a shared file system "
            "mounted at the same path on every node (NFS, EFS, Filestore), or a URI such as s3://bucket/runs or gs://bucket/runs"
        )
    logger.info("storage %s is reachable from all %d nodes", folder, len(nodes))


def _read_on_every_node(probe: Path, nodes: list[dict], folder: Path) -> list[str | None]:
    """Read `probe` in a task pinned to each node and return what each one read (None where it could not).

    Raises:
        ConfigError: when the tasks do not finish within PROBE_TIMEOUT_SECONDS.
    """
    read_probe = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
    pending = [
        read_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(probe))
        for node in nodes
    ]
    try:
        return ray.get(pending, timeout=PROBE_TIMEOUT_SECONDS)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"storage: the check that every node can reach {str(folder)!r} timed out after {PROBE_TIMEOUT_SECONDS} s; "
            "check `ray status` for nodes that are starting or unhealthy"
        ) from None


@contextmanager
def output_folder(config: ExperimentConfig) -> Iterator[Path]:
    """Yield the local folder to write the run's outputs (results.csv, report, model) into.

    For a local storage path that is the run folder itself. For a URI
    (s3://, gs://, any filesystem that pyarrow supports), the outputs are written to
    a temporary folder and copied to the run folder under the URI when the
    block ends without an error.
    """
    if not config.is_remote_storage:
        folder = Path(config.run_dir())
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return

    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="frozen-tune-outputs-") as folder:
        yield Path(folder)
        filesystem, path = pyarrow.fs.FileSystem.from_uri(config.run_dir())
        filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(folder, path, destination_filesystem=filesystem)
        logger.info("copied the outputs to %s", config.run_dir())
