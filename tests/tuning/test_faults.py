"""Faults in real runs: a driver killed with SIGKILL and resumed, two runs on one folder, diverging trials."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from cli_support import run_cli, start_cli, tiny_experiment, write_experiment

from tuning.config import ConfigError
from tuning.run_folder import repair_experiment_state

# "trial 00003 (0c7f2a1b) finished, 2 of 6 done: val_loss 0.0482 at best epoch ..."
FINISHED_LINE = re.compile(r"trial (\d{5}) \((\w+)\) finished, \d+ of \d+ done: val_loss (\S+) ")


def kill_process_group(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL the process group this test started (the driver and the local Ray under it) and wait until it is empty."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGKILL)
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of group {group} still alive {timeout} s after SIGKILL")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_killed_run_resumes_exactly(tmp_path, cache):
    experiment = write_experiment(tmp_path / "resume.yaml", tiny_experiment(**{"name": "resume", "search.num_trials": 6}))
    storage = tmp_path / "runs"
    process = start_cli(experiment, storage, cache)
    finished_before_kill: dict[str, float] = {}
    try:
        for line in process.stderr:
            match = FINISHED_LINE.search(line)
            if match:
                finished_before_kill[match.group(2)] = float(match.group(3))
            if len(finished_before_kill) == 2:
                break
    finally:
        kill_process_group(process)
    assert len(finished_before_kill) == 2, "the run ended before two trials finished"
    run_dir = storage / "resume"
    assert not (run_dir / "results.csv").exists()
    # A kill while Ray copies its state into the run folder leaves an empty file there.
    # Ray Tune cannot read it, so resume must take the intact copy from Ray's staging folder.
    (search_state,) = run_dir.glob("search_gen_state-*.json")
    search_state.write_bytes(b"")

    without_resume = run_cli(experiment, storage, cache)
    assert without_resume.returncode == 2
    assert "interrupted experiment" in without_resume.stderr
    assert "--resume" in without_resume.stderr

    resumed = run_cli(experiment, storage, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted run" in resumed.stderr
    # Only the resumed command's time is measured, and the log and report state it.
    assert re.search(r"experiment resume finished in \d+ s since the resume", resumed.stderr)
    report = (run_dir / "report.md").read_text()
    assert re.search(r"in \d+ s since the resume\.", report)
    assert "- Resumed run, from the resume on: " in report
    assert "Whole run" not in report
    assert re.search(r"of 6 \(0 failed\), \d+ s since the resume:", resumed.stdout)
    # The kill may have cut other state files too; each damaged one is named on the line.
    assert re.search(rf"restored the damaged [^\n]*{re.escape(search_state.name)}", resumed.stderr)

    frame = pd.read_csv(run_dir / "results.csv")
    assert len(frame) == 6
    assert frame["trial_id"].is_unique
    assert (frame["status"] == "TERMINATED").all()
    assert sorted(frame["trial_number"]) == [1, 2, 3, 4, 5, 6]
    by_id = frame.set_index("trial_id")
    for trial_id, value in finished_before_kill.items():
        assert by_id.loc[trial_id, "best_val_loss"] == pytest.approx(value, abs=5e-5)

    again = run_cli(experiment, storage, cache, "--resume")
    assert again.returncode == 2
    assert "already finished" in again.stderr


def test_resume_rejects_damaged_state_without_copy(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "damaged"
    run_dir.mkdir(parents=True)
    (run_dir / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (run_dir / "search_gen_state-2026-01-01_00-00-00.json").write_text('{"cut')
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray-here"))

    expected = r"search_gen_state-2026-01-01_00-00-00\.json, searcher-state-2026-01-01_00-00-00\.pkl, tuner\.pkl: missing, empty or cut off"
    with pytest.raises(ConfigError, match=expected) as error:
        repair_experiment_state(run_dir)

    assert "--name" in str(error.value)
    assert (run_dir / "search_gen_state-2026-01-01_00-00-00.json").read_text() == '{"cut'


SESSION, OLDER_SESSION = "2026-01-02_00-00-00", "2026-01-01_00-00-00"


def write_state(folder: Path, session: str) -> None:
    """Write a whole set of Ray Tune state files of one save, with small pickles in place of Ray's."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trials": [], "session": session}))
    (folder / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": 3, "session": session}))
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"observations": list(range(500)), "session": session}))
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"tuner": session}))


def zero_middle(path: Path) -> None:
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes(32) + data[middle + 32:])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda run_dir: zero_middle(run_dir / f"searcher-state-{SESSION}.pkl"), f"searcher-state-{SESSION}.pkl"),
        (lambda run_dir: (run_dir / f"searcher-state-{SESSION}.pkl").unlink(), f"searcher-state-{SESSION}.pkl"),
        (lambda run_dir: (run_dir / "tuner.pkl").write_bytes(b""), "tuner.pkl"),
    ],
    ids=["zeroed-bytes", "missing-newest", "empty-tuner"],
)
def test_damaged_state_named_or_restored(tmp_path, monkeypatch, damage, named):
    run_dir = tmp_path / "runs" / "damaged"
    write_state(run_dir, OLDER_SESSION)
    write_state(run_dir, SESSION)
    intact = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    damage(run_dir)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))

    with pytest.raises(ConfigError, match=rf"\({re.escape(named)}: missing, empty or cut off"):
        repair_experiment_state(run_dir)

    # With the copy that Ray's session keeps, the newest set is restored instead.
    write_state(tmp_path / "ray-tmp" / "ray" / "session_x" / "artifacts" / "run_y" / "damaged" / "driver_artifacts", SESSION)
    repair_experiment_state(run_dir)

    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if not path.name.startswith(".")} == intact


def test_intact_state_left_alone(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "intact"
    write_state(run_dir, SESSION)
    before = {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()}
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray-here"))

    repair_experiment_state(run_dir)

    assert {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()} == before


@pytest.mark.parametrize(("content", "problem"), [(None, "is missing"), ("{not json", "cannot be read"), ("[]", "cannot be read")])
def test_resume_needs_readable_snapshot(tmp_path, content, problem):
    from tuning.config import parse_experiment
    from tuning.run_folder import SNAPSHOT_FILE, snapshot_differences

    if content is not None:
        (tmp_path / SNAPSHOT_FILE).write_text(content)

    with pytest.raises(ConfigError, match=rf"experiment\.json {problem}.*start a new run with --name"):
        snapshot_differences(parse_experiment(tiny_experiment()), tmp_path)


def test_resume_rejects_missing_or_changed(tmp_path, cache):
    storage = tmp_path / "runs"
    experiment = write_experiment(tmp_path / "never.yaml", tiny_experiment(name="never"))
    missing = run_cli(experiment, storage, cache, "--resume")
    assert missing.returncode == 2
    assert f"{storage / 'never'} does not exist, so there is no interrupted experiment named 'never'" in missing.stderr
    assert "run without --resume" in missing.stderr
    assert not storage.exists()

    (storage / "never").mkdir(parents=True)
    empty = run_cli(experiment, storage, cache, "--resume")
    assert empty.returncode == 2
    assert "contains no interrupted experiment named 'never'" in empty.stderr
    assert list((storage / "never").iterdir()) == []

    # An interrupted run folder: the snapshot and Ray Tune's state file, as a killed run leaves them.
    from tuning.config import parse_experiment
    from tuning.run_folder import write_snapshot

    config = parse_experiment(tiny_experiment(name="changed"))
    config = config.model_copy(update={"storage": str(storage)})
    (storage / "changed").mkdir(parents=True)
    write_snapshot(config)
    (storage / "changed" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    changed = write_experiment(tmp_path / "changed.yaml", tiny_experiment(**{"name": "changed", "search.num_trials": 9}))
    completed = run_cli(changed, storage, cache, "--resume")
    assert completed.returncode == 2
    assert "search.num_trials: 3 -> 9" in completed.stderr


def test_busy_folder_rejects_second_run(tmp_path, cache):
    experiment = write_experiment(tmp_path / "busy.yaml", tiny_experiment(name="busy"))
    storage = tmp_path / "runs"
    lock = storage / "busy" / ".frozen-tune.lock"
    first = start_cli(experiment, storage, cache, keep_stdout=True)
    try:
        deadline = time.monotonic() + 300
        while not (lock.exists() and lock.read_text().startswith("pid ")):
            assert first.poll() is None, "the first run ended before it locked its folder"
            assert time.monotonic() < deadline, "the first run never locked its folder"
            time.sleep(0.2)

        second = run_cli(experiment, storage, cache)
        assert second.returncode == 2
        assert f"being written by another frozen-tune run (pid {first.pid} on " in second.stderr
        assert "--name" in second.stderr

        _, first_errors = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            kill_process_group(first)
    assert first.returncode == 0, first_errors[-3000:]
    frame = pd.read_csv(storage / "busy" / "results.csv")
    assert len(frame) == 3
    assert (frame["status"] == "TERMINATED").all()


def test_diverging_trials_fail_with_reason(tmp_path, cache):
    space = {
        "learning_rate": {"type": "loguniform", "low": 1.0e-2, "high": 1.0e6},
        "batch_size": {"type": "choice", "values": [64, 128]},
    }
    experiment = write_experiment(tmp_path / "diverge.yaml", tiny_experiment(**{
        "name": "diverge", "head": {"optimizer": "sgd"}, "search.space": space, "search.num_trials": 5,
        "search.points_to_evaluate": [
            {"learning_rate": 1.0e6, "batch_size": 64}, {"learning_rate": 3.0e5, "batch_size": 128},
            {"learning_rate": 0.05, "batch_size": 64},
        ],
    }))
    completed = run_cli(experiment, tmp_path / "runs", cache)
    assert completed.returncode == 0, completed.stderr[-3000:]

    run_dir = tmp_path / "runs" / "diverge"
    frame = pd.read_csv(run_dir / "results.csv")
    failed = frame[frame["status"] == "ERROR"]
    done = frame[frame["status"] == "TERMINATED"]
    assert len(frame) == 5
    assert len(failed) >= 2
    assert len(done) >= 1
    assert failed["error"].str.contains("the head diverged").all()
    assert failed["best_val_loss"].isna().all()
    assert done["best_val_loss"].map(math.isfinite).all()

    import json

    best = json.loads((run_dir / "best_config.json").read_text())
    assert math.isfinite(best["metrics"]["best_val_loss"])
    assert best["hyperparameters"]["learning_rate"] in set(done["learning_rate"])
    report = (run_dir / "report.md").read_text()
    assert "the head diverged" in report
    assert re.search(r"trial \d{5} \(\w+\) failed, \d of 5 done: FloatingPointError", completed.stderr)


@pytest.mark.parametrize(("cpus", "gpus"), [(64, 0), (1, 64)], ids=["cpus", "gpus"])
def test_unavailable_resources_rejected(tmp_path, cache, cpus, gpus):
    experiment = write_experiment(tmp_path / "big.yaml", tiny_experiment(**{
        "name": "big", "resources": {"cpus_per_trial": cpus, "gpus_per_trial": gpus},
    }))
    completed = run_cli(experiment, tmp_path / "runs", cache)

    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"error: resources: a trial requests {cpus} CPUs and {gpus} GPUs" in completed.stderr
    assert "lower them, or run on a cluster with --address" in completed.stderr
    # The storage check before Ray removes the folders it created, so nothing is left.
    assert not (tmp_path / "runs").exists()


def test_dashboard_address_logged(tmp_path, cache):
    # The trial's resources cannot be met, so the run stops right after Ray and its dashboard start.
    experiment = write_experiment(tmp_path / "dash.yaml", tiny_experiment(**{"name": "dash", "resources": {"cpus_per_trial": 64}}))
    completed = run_cli(experiment, tmp_path / "runs", cache, "--dashboard")

    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in completed.stderr


def test_all_failed_run_keeps_reasons(tmp_path, cache):
    space = {"learning_rate": {"type": "loguniform", "low": 1.0e5, "high": 1.0e6}, "batch_size": {"type": "choice", "values": [64]}}
    experiment = write_experiment(tmp_path / "allfail.yaml", tiny_experiment(**{
        "name": "allfail", "head": {"optimizer": "sgd"}, "search.space": space, "search.num_trials": 2,
    }))
    completed = run_cli(experiment, tmp_path / "runs", cache)

    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "all 2 trials failed" in completed.stderr
    assert "results.csv" in completed.stderr
    frame = pd.read_csv(tmp_path / "runs" / "allfail" / "results.csv")
    assert len(frame) == 2
    assert (frame["status"] == "ERROR").all()
    assert frame["error"].str.contains("the head diverged").all()
    assert not (tmp_path / "runs" / "allfail" / "best_model.keras").exists()


@pytest.mark.parametrize(("stop_signal", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_interrupted_run_writes_no_outputs(tmp_path, cache, stop_signal, exit_code):
    experiment = write_experiment(tmp_path / "ctrlc.yaml", tiny_experiment(**{"name": "ctrlc", "search.num_trials": 4}))
    storage = tmp_path / "runs"
    process = start_cli(experiment, storage, cache)
    errors = []
    try:
        for line in process.stderr:
            errors.append(line)
            if FINISHED_LINE.search(line):
                if stop_signal == signal.SIGINT:
                    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group.
                    os.killpg(os.getpgid(process.pid), signal.SIGINT)
                else:
                    # `kill PID`, `timeout` and job schedulers send SIGTERM to the command alone.
                    process.send_signal(signal.SIGTERM)
                break
        errors.extend(process.stderr)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            kill_process_group(process)
    output = "".join(errors)

    assert process.returncode == exit_code, output[-3000:]
    assert "SIGTERM received" not in output
    assert "Continue it with the same command and --resume" in output
    assert not (storage / "ctrlc" / "results.csv").exists()
    assert not (storage / "ctrlc" / "best_model.keras").exists()

    resumed = run_cli(experiment, storage, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    frame = pd.read_csv(storage / "ctrlc" / "results.csv")
    assert len(frame) == 4
    assert (frame["status"] == "TERMINATED").all()


def test_resume_rewrites_lost_outputs(tmp_path, cache):
    # A run stopped while it wrote its outputs has no results.csv, which is written last.
    experiment = write_experiment(tmp_path / "outputs.yaml", tiny_experiment(**{"name": "outputs", "search.num_trials": 2}))
    storage = tmp_path / "runs"
    first = run_cli(experiment, storage, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = storage / "outputs"
    before = pd.read_csv(run_dir / "results.csv")
    (run_dir / "results.csv").unlink()
    (run_dir / "best_model.keras").unlink()

    again = run_cli(experiment, storage, cache)
    resumed = run_cli(experiment, storage, cache, "--resume")

    assert again.returncode == 2
    assert "interrupted experiment" in again.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = pd.read_csv(run_dir / "results.csv")
    assert list(after["trial_id"]) == list(before["trial_id"])
    assert list(after["best_val_loss"]) == pytest.approx(list(before["best_val_loss"]))
    assert (run_dir / "best_model.keras").is_file()
    assert "resuming trial" not in resumed.stderr
    written = {name: (run_dir / name).stat().st_mtime_ns for name in ("convergence.png", "best_model.keras", "best_config.json", "report.md")}
    assert (run_dir / "results.csv").stat().st_mtime_ns >= max(written.values())


def test_full_disk_at_export_resumable(tmp_path, cache):
    experiment = write_experiment(tmp_path / "full.yaml", tiny_experiment(**{"name": "full", "search.num_trials": 2}))
    run_dir = tmp_path / "runs" / "full"
    run_dir.mkdir(parents=True)
    # Writes to /dev/full fail with ENOSPC, as on a full disk.
    (run_dir / "best_config.json.tmp").symlink_to("/dev/full")

    completed = run_cli(experiment, tmp_path / "runs", cache)

    assert completed.returncode == 1, completed.stderr[-3000:]
    assert f"writing the outputs in {run_dir} failed" in completed.stderr
    assert "No space left on device" in completed.stderr
    assert "run the same command with --resume" in completed.stderr
    assert not (run_dir / "results.csv").exists()

    (run_dir / "best_config.json.tmp").unlink()
    resumed = run_cli(experiment, tmp_path / "runs", cache, "--resume")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(pd.read_csv(run_dir / "results.csv")) == 2
    assert json.loads((run_dir / "best_config.json").read_text())["metric"] == "val_loss"


@pytest.mark.parametrize(
    ("signal_number", "exit_code", "stopped"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["sigint", "sigterm"],
)
def test_signal_before_ray_exits_cleanly(tmp_path, cache, signal_number, exit_code, stopped):
    experiment = write_experiment(tmp_path / "early.yaml", tiny_experiment(name="early"))
    process = start_cli(experiment, tmp_path / "runs", cache)
    try:
        # The dataset check logs this line before the command imports Ray, which takes seconds.
        for line in process.stderr:
            if "Loaded dataset" in line:
                process.send_signal(signal_number)
                break
        rest = process.stderr.read()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            kill_process_group(process)

    assert process.returncode == exit_code, rest[-3000:]
    assert f"{stopped} before Ray started; nothing to resume" in rest
    assert "Aborted" not in rest
    assert not (tmp_path / "runs" / "early").exists()
