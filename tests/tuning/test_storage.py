"""Run storage: a URI storage gets every output, and the shared-storage check on a one-node Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from tuning.config import load_experiment
from tuning.storage import PROBE_PREFIX, check_storage_shared

REPOSITORY = Path(__file__).resolve().parents[2]
QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"

TINY_EXPERIMENT = {
    "name": "tiny-uri",
    "dataset": {"name": "digits", "classes": [5, 6, 7], "validation_split": 0.2, "seed": 0},
    "backbone": {"name": "small_cnn", "image_size": 16, "weights": "none"},
    "search": {
        "num_trials": 2, "max_concurrent": 2, "initial_points": 2, "seed": 0,
        "space": {"learning_rate": {"type": "loguniform", "low": 3.0e-3, "high": 3.0e-2}},
    },
    "training": {"max_epochs": 3, "patience": 2},
}


def test_uri_storage_gets_outputs(tmp_path):
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    storage = f"file://{tmp_path}/bucket/runs"
    environment = {**os.environ, "FROZEN_TUNE_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(experiment), "--storage", storage],
        capture_output=True, text=True, timeout=900, env=environment, cwd=tmp_path,
    )
    run_dir = tmp_path / "bucket" / "runs" / "tiny-uri"

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"{storage}/tiny-uri/results.csv" in completed.stdout
    assert len(pd.read_csv(run_dir / "results.csv")) == 2
    for name in ("best_config.json", "convergence.png", "report.md", "best_model.keras"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (tmp_path / "file:").exists()


def test_shared_storage_check_one_node(ray_local, tmp_path):
    config = load_experiment(QUICKSTART, {"storage": str(tmp_path / "runs")})
    (tmp_path / "runs").mkdir()

    check_storage_shared(config)

    assert not list((tmp_path / "runs").glob(f"{PROBE_PREFIX}*"))
