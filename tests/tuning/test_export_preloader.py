"""When the driver starts importing the export's modules: once at most one trial is left to run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ray.tune.experiment import Trial

from tuning import experiment
from tuning.experiment import ExportPreloader


def trials_with(*statuses: str) -> list[Trial]:
    trials = []
    for status in statuses:
        trial = Trial("train_head", stub=True)
        trial.set_status(status)
        trials.append(trial)
    return trials


@pytest.fixture
def starts(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(experiment, "start_export_imports", lambda: calls.append("start"))
    return calls


def test_waits_for_every_trial_created(starts):
    trials = trials_with(Trial.TERMINATED, Trial.TERMINATED, Trial.RUNNING)
    ExportPreloader(num_trials=4).on_trial_start(0, trials, trials[-1])
    assert starts == []


def test_waits_while_two_trials_run(starts):
    trials = trials_with(Trial.TERMINATED, Trial.TERMINATED, Trial.RUNNING, Trial.RUNNING)
    ExportPreloader(num_trials=4).on_trial_start(0, trials, trials[-1])
    assert starts == []


def test_starts_when_second_last_finishes(starts):
    trials = trials_with(Trial.TERMINATED, Trial.TERMINATED, Trial.RUNNING, Trial.RUNNING)
    # Ray Tune changes the ending trial's status after the callback, so it still reads RUNNING here.
    ExportPreloader(num_trials=4).on_trial_complete(0, trials, trials[2])
    assert starts == ["start"]


def test_starts_with_last_trial_alone(starts):
    trials = trials_with(Trial.TERMINATED, Trial.ERROR, Trial.TERMINATED, Trial.RUNNING)
    ExportPreloader(num_trials=4).on_trial_start(0, trials, trials[-1])
    assert starts == ["start"]


def test_starts_when_a_trial_fails_late(starts):
    trials = trials_with(Trial.TERMINATED, Trial.TERMINATED, Trial.RUNNING, Trial.RUNNING)
    ExportPreloader(num_trials=4).on_trial_error(0, trials, trials[3])
    assert starts == ["start"]


def test_start_imports_runs_once():
    experiment.start_export_imports()
    thread = experiment._export_imports
    experiment.start_export_imports()

    assert thread is not None
    assert experiment._export_imports is thread
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "models.classifier" in sys.modules
    assert "matplotlib.pyplot" in sys.modules


def test_outputs_wait_for_imports():
    # A fresh interpreter, so the imports really run in the thread while the main thread waits.
    code = (
        "import sys\n"
        "from tuning import experiment\n"
        "experiment.start_export_imports()\n"
        "experiment.wait_for_export_imports()\n"
        "import matplotlib.pyplot\n"
        "print(experiment._export_imports.is_alive(), hasattr(matplotlib.pyplot, 'switch_backend'), 'tensorflow' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["False", "True", "True"]
