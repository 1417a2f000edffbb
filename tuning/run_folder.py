"""The run folder `storage/name/`: whether a run may start or resume there, its lock and its experiment snapshot.

Only local storage gets these checks. On a URI storage (s3://, gs://) Ray
Tune's own experiment state decides whether a run can resume.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickletools
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuning.config import ConfigError, ExperimentConfig, check_storage_not_file

logger = logging.getLogger(__name__)

LOCK_FILE = ".frozen-tune.lock"
SNAPSHOT_FILE = "experiment.json"
RESULTS_FILE = "results.csv"
# Ray Tune's state files in a run folder: trials, search generator and searcher.
RAY_STATE_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
# The Tuner's own settings, which Tuner.restore reads first.
TUNER_STATE_FILE = "tuner.pkl"

# Fields that may differ between an interrupted run and its resumption, because
# they change neither the trials nor the search.
RESUMABLE_CHANGES = ("cache_dir", "search.warm_start")

# Fields added to the experiment file after runs had been saved without them, with the
# value those runs used. A snapshot that lacks such a field counts as having that value.
ADDED_FIELDS: dict[str, Any] = {"backbone.precision": "auto"}


def check_run_folder(config: ExperimentConfig, *, resume: bool = False) -> None:
    """Check that a new run may start in the run folder, or that `resume` has a run to continue.

    Raises:
        ConfigError: naming the folder, its state and the choices.
    """
    if config.is_remote_storage:
        return
    # A file on the storage path would otherwise read as "no experiment there".
    check_storage_not_file(config)
    run_dir = Path(config.run_dir())
    try:
        # Path.exists raises, instead of returning False, when a folder on the path cannot be searched.
        run_dir_exists = run_dir.exists()
        broken_link = not run_dir_exists and run_dir.is_symlink()
    except OSError as error:
        raise ConfigError(
            f"storage: cannot look into {run_dir} ({error.strerror or error}); pass --storage with a folder you can write to"
        ) from None
    if broken_link:
        raise ConfigError(
            f"{run_dir} is a symbolic link to {os.readlink(run_dir)!r}, which does not exist; "
            "remove the link or point it at a folder, or choose another name with --name"
        )
    if run_dir_exists and not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a folder, so it cannot be the run folder of experiment {config.name!r}; "
            "choose another name with --name or another --storage, or move it away"
        )
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
        if not run_dir_exists:
            raise ConfigError(
                f"--resume: {run_dir} does not exist, so there is no interrupted experiment named {config.name!r} to continue; "
                "pass the --storage and --name of the interrupted run, or run without --resume to start it"
            )
        if not started:
            raise ConfigError(f"--resume: {run_dir} contains no interrupted experiment named {config.name!r}; run without --resume to start it")
        differences = snapshot_differences(config, run_dir)
        if differences:
            raise ConfigError(
                f"--resume: the experiment differs from the interrupted one in {run_dir}: {'; '.join(differences)}; "
                "resume with the same file and options, or start a new run with --name"
            )
        repair_experiment_state(run_dir)
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
    """List the fields, as `path: before -> now`, where `config` differs from the run folder's snapshot.

    Raises:
        ConfigError: when the snapshot is missing or is not a JSON object.
    """
    path = run_dir / SNAPSHOT_FILE
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__} instead of an object")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        problem = "is missing" if isinstance(error, FileNotFoundError) else f"cannot be read ({error})"
        raise ConfigError(
            f"--resume: {path} {problem}, so the experiment cannot be checked against the interrupted one; "
            "start a new run with --name (the finished trials' folders stay in place)"
        ) from None
    before = {**ADDED_FIELDS, **_flatten(saved)}
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


def repair_experiment_state(run_dir: Path) -> None:
    """Replace Ray Tune's state files in `run_dir` from the driver's own copies when a kill cut them short.

    Ray Tune writes its state (trials, search generator, searcher, and in a
    resumed run also tuner.pkl) atomically into a staging folder of the Ray
    session and then copies it into the run folder. A SIGKILL during that copy
    leaves an empty or cut file there. Ray Tune, unable to read it, starts the
    experiment again from its first trial, hangs, or stops without a clear
    error. The staging folder survives the kill, so its intact copies replace
    the whole set. A file of the set that is missing counts as damaged.

    Raises:
        ConfigError: when a state file is damaged and no intact copy is found.
    """
    # Each save writes the three files named after the session's start time, and Ray Tune reads the newest
    # file of each kind. So the set to check is the newest experiment state's session, and a file of that
    # set that is missing while an older session's file is there would otherwise mix two saves.
    experiment_state = max(run_dir.glob(RAY_STATE_PATTERNS[0]), default=None)
    if experiment_state is None:
        return
    session = experiment_state.name.removeprefix("experiment_state-").removesuffix(".json")
    state_files = [run_dir / pattern.replace("*", session) for pattern in RAY_STATE_PATTERNS]
    tuner_file = run_dir / TUNER_STATE_FILE
    damaged = [path for path in [*state_files, tuner_file] if not _state_file_intact(path)]
    if not damaged:
        return
    # The staging folder of a resumed run contains tuner.pkl too, and Ray rewrites it there at every save.
    # A first run writes tuner.pkl once, before its first trial, so its staging folder needs no copy.
    replaced = state_files + ([tuner_file] if tuner_file in damaged else [])
    staging = _staging_folder_with_intact_copies(run_dir.name, [path.name for path in replaced])
    if staging is None:
        raise ConfigError(
            f"--resume: the saved state in {run_dir} is damaged ({', '.join(path.name for path in damaged)}: missing, empty "
            "or cut off, probably by a kill during a save) and Ray's temporary folder has no intact copy of it; "
            "start a new run with --name (the finished trials' folders stay in place)"
        )
    for path in replaced:
        replacement = path.with_name(f".{path.name}.repair")
        replacement.write_bytes((staging / path.name).read_bytes())
        os.replace(replacement, path)
    logger.warning("restored the damaged %s in %s from Ray's local copy in %s", ", ".join(path.name for path in damaged), run_dir, staging)


def _state_file_intact(path: Path) -> bool:
    """Return whether a state file is whole: JSON that parses, or a pickle whose opcodes run from PROTO to STOP.

    search_gen_state-*.json is a pickle despite its name. The pickle's opcodes
    are only read, never run, so the check imports nothing the pickle names.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data.startswith(b"\x80"):
        try:
            for _ in pickletools.genops(data):
                pass
        except ValueError:
            return False
        return data.endswith(b".")
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _staging_folder_with_intact_copies(experiment_name: str, file_names: list[str]) -> Path | None:
    """Find the Ray session's staging folder of the experiment that contains intact copies of all `file_names`.

    Ray keeps it in /tmp/ray/session_*/artifacts/*/NAME/driver_artifacts
    (under $RAY_TMPDIR instead of /tmp when set). The state files' names carry
    the run's start time, so only the folder of the same run matches.
    """
    ray_temp = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    for folder in sorted(ray_temp.glob(f"session_*/artifacts/*/{experiment_name}/driver_artifacts"), reverse=True):
        if all((folder / name).is_file() and _state_file_intact(folder / name) for name in file_names):
            return folder
    return None


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
