"""What every Ray worker of a run imports and configures when it starts."""

from __future__ import annotations

import logging
import subprocess
import sys

from tuning.worker_setup import configure_worker_logging


def modules_loaded_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Import `module` in a fresh interpreter and return which of `candidates` it loaded."""
    code = f"import sys, {module}; print(' '.join(name for name in {candidates!r} if name in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return completed.stdout.split()


def test_setup_hook_module_is_light():
    # Every worker imports the hook's module at start, idle workers included.
    assert modules_loaded_by("tuning.worker_setup", ("tensorflow", "ray", "sklearn", "bayes_opt", "pandas")) == []


def test_experiment_module_loads_no_searcher():
    # The feature task's worker imports tuning.experiment to run prepare_data.
    assert modules_loaded_by("tuning.experiment", ("bayes_opt", "sklearn", "tensorflow")) == []


def test_worker_logging_levels():
    names = ("ray", "tensorflow", "absl", "h5py")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        configure_worker_logging()

        assert logging.getLogger("ray").level == logging.WARNING
        assert logging.getLogger("tensorflow").level == logging.WARNING
        assert logging.getLogger("absl").level == logging.WARNING
        assert logging.getLogger("h5py").level == logging.WARNING
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
