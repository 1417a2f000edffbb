"""Time the 30-trial quickstart and check the accuracy of the model it exports.

Runs `frozen-tune run examples/quickstart.yaml` in a fresh process, so the time
includes Ray's start, the backbone and embeddings, every trial and the outputs.
Then it reads results.csv for the per-trial split into start-up and training,
and evaluates best_model.keras on the validation images of digits 5-9 with
plain `keras.models.load_model`.

    python bench/quickstart.py --storage /tmp/bench-runs [--cold-cache]

Start Ray only where it cannot reach other hosts (see README: offline runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPOSITORY = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=tempfile.mkdtemp(prefix="frozen-tune-bench-"), help="Run folder root.")
    parser.add_argument("--name", default=f"quickstart-bench-{int(time.time())}", help="Experiment name (a new folder).")
    parser.add_argument("--cold-cache", action="store_true", help="Use an empty cache, so pretraining and embeddings are timed too.")
    arguments = parser.parse_args()

    environment = dict(os.environ)
    if arguments.cold_cache:
        environment["FROZEN_TUNE_CACHE"] = tempfile.mkdtemp(prefix="frozen-tune-cache-")
    command = [sys.executable, "-m", "tuning", "run", str(REPOSITORY / "examples" / "quickstart.yaml"),
               "--storage", arguments.storage, "--name", arguments.name]
    started = time.monotonic()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    wall = time.monotonic() - started
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"quickstart failed with exit code {completed.returncode}")

    run_dir = Path(arguments.storage) / arguments.name
    frame = pd.read_csv(run_dir / "results.csv")
    completed_trials = frame[frame["status"] == "TERMINATED"]
    training = completed_trials["wall_seconds"] - completed_trials["startup_seconds"]
    accuracy = evaluate(run_dir / "best_model.keras")

    summary = {
        "wall_seconds": round(wall, 1),
        "trials": len(frame),
        "failed_trials": int((frame["status"] != "TERMINATED").sum()),
        "median_trial_seconds": round(float(completed_trials["wall_seconds"].median()), 2),
        "median_startup_seconds": round(float(completed_trials["startup_seconds"].median()), 2),
        "median_training_seconds": round(float(training.median()), 2),
        "median_epochs": float(completed_trials["epochs_run"].median()),
        "best_val_loss": round(float(completed_trials["best_val_loss"].min()), 4),
        "best_model_validation_accuracy": round(accuracy, 4),
        "cold_cache": arguments.cold_cache,
        "run_dir": str(run_dir),
    }
    print(json.dumps(summary, indent=2))


def evaluate(model_path: Path) -> float:
    """Accuracy of the exported model on the quickstart's validation images, loaded by plain Keras."""
    import keras

    from models.datasets import load_dataset

    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], validation_split=0.2, seed=0)
    model = keras.models.load_model(model_path)
    predictions = model.predict(dataset.x_val, verbose=0).argmax(axis=1)
    return float(np.mean(predictions == dataset.y_val))


if __name__ == "__main__":
    main()
