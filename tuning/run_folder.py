"""The run folder `storage/name/`: whether a run may start or resume there, its lock and its experiment snapshot.

Only local storage gets these checks. On a URI storage (s3://, gs://) Ray
Tune's own experiment state decides whether a run can resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuning.config import ConfigError, ExperimentConfig

LOCK_FILE = ".frozen-tune.lock"
SNAPSHOT_FILE = "experiment.json"
RESULTS_FILE = "results.csv"

# Fields that may differ between an interrupted run and its resumption, because
# they change neither the trials nor the search.
RESUMABLE_CHANGES = ("cache_dir", "search.warm_start")


def check_run_folder(config: ExperimentConfig, *, resume: bool = False) -> None:
    """Check that a new run may start in the run folder, or that `resume` has a run to continue.

    Raises:
        ConfigError: naming the folder, its state and the choices.
    """
    if config.is_remote_storage:
        return
    run_dir = Path(config.run_dir())
    holder = _lock_holder(run_dir)
    if holder is not None:
        raise ConfigError(
            f"{run_dir} is being written by another frozen-tune run ({holder}); "
            "wait for it to finish, or choose a new name with --name"
        )
    finished = (run_dir / RESULTS_FILE).exists()
    started = has_experiment_state(run_dir)
    if resume:
        if finished:
            raise ConfigError(
                f"--resume: the experiment in {run_dir} already finished and its outputs are there; "
                "to run it again, choose a new name with --name"
            )
        if not started:
            raise ConfigError(f"--resume: {run_dir} contains no interrupted experiment named {config.name!r}; run without --resume to start it")
        differences = snapshot_differences(config, run_dir)
        if differences:
            raise ConfigError(
                f"--resume: the experiment differs from the interrupted one in {run_dir}: {'; '.join(differences)}; "
                "resume with the same file and options, or start a new run with --name"
            )
        return
    if finished:
        raise ConfigError(
            f"{run_dir} already contains a finished experiment named {config.name!r}; "
            "choose a new name with --name or another --storage, or delete that folder"
        )
    if started:
        raise ConfigError(
            f"{run_dir} already contains an interrupted experiment named {config.name!r}; "
            "continue it with --resume, or start a new one with --name NEW_NAME"
        )


@contextmanager
def hold_run_folder(config: ExperimentConfig) -> Iterator[None]:
    """Hold an exclusive lock on the run folder for the whole run.

    The lock is an flock on a file inside the folder, so the kernel releases
    it when the process ends in any way, SIGKILL included, and an interrupted
    run never leaves a stale lock behind.

    Raises:
        ConfigError: when another process holds the lock.
    """
    if config.is_remote_storage:
        yield
        return
    run_dir = Path(config.run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir} is being written by another frozen-tune run ({_read_holder(run_dir)}); "
                "wait for it to finish, or choose a new name with --name"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(descriptor)


def write_snapshot(config: ExperimentConfig) -> None:
    """Record the resolved experiment in the run folder, so `--resume` can check it has not changed."""
    if config.is_remote_storage:
        return
    path = Path(config.run_dir()) / SNAPSHOT_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def snapshot_differences(config: ExperimentConfig, run_dir: Path) -> list[str]:
    """List the fields, as `path: before -> now`, where `config` differs from the run folder's snapshot."""
    path = run_dir / SNAPSHOT_FILE
    if not path.exists():
        return []
    before = _flatten(json.loads(path.read_text()))
    now = _flatten(config.model_dump(mode="json"))
    differences = []
    for key in sorted(set(before) | set(now)):
        if key.startswith(RESUMABLE_CHANGES) or before.get(key) == now.get(key):
            continue
        differences.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return differences


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def has_experiment_state(run_dir: Path) -> bool:
    """Return whether Ray Tune has saved an experiment state in `run_dir`."""
    return run_dir.is_dir() and any(run_dir.glob("experiment_state-*.json"))


def _lock_holder(run_dir: Path) -> str | None:
    """Return the holder of the run folder's lock, or None when the lock is free."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return None
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(run_dir)
    finally:
        os.close(descriptor)
    return None


def _read_holder(run_dir: Path) -> str:
    try:
        return (run_dir / LOCK_FILE).read_text().strip() or "a process"
    except OSError:
        return "a process"
