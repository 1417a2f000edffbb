"""A short real run through the `frozen-tune run` command, then a second run that reuses the caches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_support import TINY_EXPERIMENT, run_cli, tiny_experiment, write_experiment

PARAMETERS = list(TINY_EXPERIMENT["search"]["space"])

# Loads the exported model in a Python process that never imports this project.
EVALUATE_SCRIPT = """
import json, sys, zipfile
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1])
arrays = np.load(sys.argv[2])
probabilities = model.predict(arrays["x"], verbose=0)
with zipfile.ZipFile(sys.argv[1]) as archive:
    metadata = json.loads(archive.read("frozen_tune.json"))
print(json.dumps({
    "accuracy": float((probabilities.argmax(axis=1) == arrays["y"]).mean()),
    "class_names": metadata["class_names"],
    "project_imported": any(name.split(".")[0] in ("models", "tuning") for name in sys.modules),
}))
"""


def test_run_succeeds_and_prints_best(first_run):
    _, _, completed = first_run

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert re.search(r"Best trial \d{5} \(\w+\) of \d+ \(0 failed\), \d+ s in all:", completed.stdout)
    assert "best_model.keras" in completed.stdout
    # The export loads the best checkpoint whole, optimizer variables included.
    assert "Skipping variable loading" not in completed.stderr


def test_results_table_has_every_column(first_run):
    folder, _, _ = first_run
    frame = pd.read_csv(folder / "runs" / "tiny" / "results.csv")

    assert len(frame) == 3
    for column in [*PARAMETERS, "trial_id", "best_epoch", "best_val_loss", "best_val_accuracy", "epochs_run", "status", "node", "started_at", "ended_at"]:
        assert column in frame.columns
    assert (frame["status"] == "TERMINATED").all()
    durations = frame["ended_at"] - frame["started_at"]
    assert (durations > 0).all()
    # Each trial ran inside this run: after the snapshot written before the first trial, and
    # before results.csv, written last. Ray's wall_seconds of a reused worker can start later
    # than the trainable's own clock, by more than a second on a busy machine.
    run_dir = folder / "runs" / "tiny"
    assert (frame["started_at"] >= (run_dir / "experiment.json").stat().st_mtime - 1.0).all()
    assert (frame["ended_at"] <= (run_dir / "results.csv").stat().st_mtime + 1.0).all()
    assert frame["trial_id"].is_unique
    assert frame["units_1"].between(32, 128).all()
    assert frame["batch_size"].isin([32, 64]).all()
    assert (frame["epochs_run"] >= frame["best_epoch"]).all()


def test_best_config_matches_table(first_run):
    folder, _, _ = first_run
    run_dir = folder / "runs" / "tiny"
    frame = pd.read_csv(run_dir / "results.csv")
    best = json.loads((run_dir / "best_config.json").read_text())
    best_row = frame.loc[frame["best_val_loss"].idxmin()]

    assert best["trial_id"] == best_row["trial_id"]
    assert best["trial_number"] == f"{best_row['trial_number']:05d}"
    assert best["metrics"]["best_val_loss"] == pytest.approx(best_row["best_val_loss"])
    assert best["hyperparameters"]["units_1"] == best_row["units_1"]
    assert best_row["trial_id"] in (run_dir / "report.md").read_text()
    # scikit-learn's digits have no held-out test split, so nothing is scored on one.
    assert best["test"] is None
    assert "no held-out test split" in (run_dir / "report.md").read_text()
    assert re.search(r"^- Whole run: \d+\.\d s$", (run_dir / "report.md").read_text(), re.MULTILINE)


def test_convergence_plot_is_png(first_run):
    folder, _, _ = first_run
    image = (folder / "runs" / "tiny" / "convergence.png").read_bytes()

    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(image) > 10_000


def test_checkpoint_folders_named_by_values(first_run):
    folder, _, _ = first_run
    trial_folders = sorted(path for path in (folder / "runs" / "tiny").iterdir() if path.is_dir())

    assert len(trial_folders) == 3
    for trial_folder in trial_folders:
        assert "learning_rate=" in trial_folder.name
        assert "units_1=" in trial_folder.name
        assert len(list(trial_folder.glob("checkpoint_*"))) == 1


def test_model_loads_without_project(first_run, tmp_path):
    from models.datasets import load_dataset

    folder, _, _ = first_run
    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], validation_split=0.2, seed=0)
    arrays = tmp_path / "validation.npz"
    np.savez(arrays, x=dataset.x_val, y=dataset.y_val)

    completed = subprocess.run(
        [sys.executable, "-c", EVALUATE_SCRIPT, str(folder / "runs" / "tiny" / "best_model.keras"), str(arrays)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert outcome["project_imported"] is False
    assert outcome["class_names"] == ["5", "6", "7", "8", "9"]
    assert outcome["accuracy"] > 0.8


def test_second_run_reuses_caches(first_run):
    folder, experiment, _ = first_run
    cache = folder / "cache"
    before = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}

    completed = run_cli(experiment, folder / "runs", cache, "--name", "again", "--num-trials", "1")
    after = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(path.name for path in before if path.parent.parent.name == "embeddings") == ["manifest.json", "train.npy", "val.npy"]
    assert len([path for path in before if path.name.endswith(".weights.h5")]) == 1
    assert after == before
    assert "(loaded from the cache); embeddings reused from cache" in completed.stderr


def test_existing_run_folder_rejected(first_run):
    folder, experiment, _ = first_run

    completed = run_cli(experiment, folder / "runs", folder / "cache")

    assert completed.returncode == 2
    assert "already contains a finished experiment" in completed.stderr
    assert "--name" in completed.stderr


def test_run_ends_when_space_used_up(first_run, tmp_path):
    folder, _, _ = first_run
    space = {"batch_size": {"type": "choice", "values": [32, 64]}, "units_1": {"type": "int", "low": 32, "high": 33}}
    experiment = write_experiment(tmp_path / "discrete.yaml", tiny_experiment(**{"search.space": space, "search.num_trials": 6}))

    completed = run_cli(experiment, folder / "runs", folder / "cache", "--name", "discrete")

    assert completed.returncode == 0, completed.stderr[-3000:]
    frame = pd.read_csv(folder / "runs" / "discrete" / "results.csv")
    assert sorted(zip(frame["batch_size"], frame["units_1"])) == [(32, 32), (32, 33), (64, 32), (64, 33)]
    assert "the search space has 4 distinct configurations, fewer than search.num_trials (6)" in completed.stderr
    assert completed.stderr.count("every one of the 4 configurations of the search space has been suggested") == 1
    assert re.search(r"Best trial \d{5} \(\w+\) of 4 \(0 failed\)", completed.stdout)
    assert "4 of 4 done" in completed.stderr
    assert "experiment discrete: 4 trials, at most 2 at a time" in completed.stderr
    report = (folder / "runs" / "discrete" / "report.md").read_text()
    assert "4 trials (4 completed, 0 failed)" in report
    assert "The search space has 4 distinct configurations, fewer than `num_trials` (6)" in report

    # A warm start from that run leaves 2 of the 6 configurations of a wider space.
    space["batch_size"]["values"] = [32, 64, 128]
    warm = tiny_experiment(**{"search.space": space, "search.num_trials": 6, "search.warm_start": str(folder / "runs" / "discrete" / "results.csv")})
    completed = run_cli(write_experiment(tmp_path / "warm.yaml", warm), folder / "runs", folder / "cache", "--name", "discrete_warm")

    assert completed.returncode == 0, completed.stderr[-3000:]
    frame = pd.read_csv(folder / "runs" / "discrete_warm" / "results.csv")
    assert sorted(zip(frame["batch_size"], frame["units_1"])) == [(128, 32), (128, 33)]
    assert "the search space has 6 distinct configurations and the warm start tried 4, which leaves 2" in completed.stderr
    assert "2 of 2 done" in completed.stderr
