"""A tiny real experiment and a way to run the `frozen-tune` command on it in a fresh process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TINY_EXPERIMENT: dict[str, Any] = {
    "name": "tiny",
    "dataset": {"name": "digits", "classes": [5, 6, 7, 8, 9], "validation_split": 0.2, "seed": 0},
    "backbone": {"name": "small_cnn", "image_size": 16, "weights": "pretrained",
                 "pretrain": {"dataset": "digits", "classes": [0, 1, 2, 3, 4], "epochs": 3}},
    "search": {
        "metric": "val_loss", "mode": "min", "num_trials": 3, "max_concurrent": 2, "initial_points": 2, "seed": 0,
        "space": {
            "learning_rate": {"type": "loguniform", "low": 3.0e-3, "high": 3.0e-2},
            "units_1": {"type": "int", "low": 32, "high": 128},
            "dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
            "batch_size": {"type": "choice", "values": [32, 64]},
        },
    },
    "training": {"max_epochs": 8, "patience": 3},
}


def tiny_experiment(**changes: Any) -> dict[str, Any]:
    """Return a copy of TINY_EXPERIMENT with dotted keys replaced, e.g. `{"search.num_trials": 6}`; None removes a key."""
    experiment = copy.deepcopy(TINY_EXPERIMENT)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = experiment
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return experiment


def write_experiment(path: Path, experiment: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(experiment))
    return path


def cli_command(experiment: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuning", "run", str(experiment), "--storage", str(storage), *extra]


def cli_environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "FROZEN_TUNE_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}


def run_cli(experiment: Path, storage: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run `frozen-tune run` to the end and return its exit code and output."""
    return subprocess.run(
        cli_command(experiment, storage, *extra), capture_output=True, text=True, timeout=900, env=cli_environment(cache),
    )


def start_cli(experiment: Path, storage: Path, cache: Path, *, keep_stdout: bool = False) -> subprocess.Popen:
    """Start `frozen-tune run` in its own process group, so a test can kill it with everything it started.

    Standard error is a pipe for the test to read. Standard output is discarded unless `keep_stdout`.
    """
    return subprocess.Popen(
        cli_command(experiment, storage), stderr=subprocess.PIPE, stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
        text=True, env=cli_environment(cache), start_new_session=True,
    )
