"""Measure how a reused trial worker's memory grows from one trial to the next.

A reused Ray Tune worker runs trial after trial in one process. This script
does the same in one process, without Ray. For each trial it releases the
previous trial as the trainable does (`release_previous_trial`), then builds and compiles a head with the trainable's own
`build_trial_head`. It fits the head on quickstart-sized random embeddings
(716 training and 180 validation rows of 128 floats, 5 classes) through the
trainable's own input pipelines. After each trial it records the resident
memory (VmRSS) and the number of functions registered in TensorFlow's eager
context. The growth per trial is the slope after the first trials, whose
allocations are one-off.

    python bench/worker_memory.py [--trials 25] [--epochs 2] [--output bench/worker_memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
TRAIN_ROWS, VALIDATION_ROWS, EMBEDDING, CLASSES, BATCH_SIZE = 716, 180, 128, 5, 64
# Trials left out of the slope, because the first trials allocate caches and pools once.
WARM_UP_TRIALS = 5


def resident_megabytes() -> float:
    """Return this process's resident memory (VmRSS) in megabytes."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=25, help=f"Trials to run, more than {WARM_UP_TRIALS}.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per trial.")
    parser.add_argument("--output", default=str(REPOSITORY / "bench" / "worker_memory.json"), help="JSON file for the results.")
    arguments = parser.parse_args()
    if arguments.trials <= WARM_UP_TRIALS:
        parser.error(f"--trials must be more than {WARM_UP_TRIALS}")

    from tensorflow.python.eager import context

    from tuning.trainable import EmbeddingData, _configure_tensorflow, _fit_inputs, build_trial_head, release_previous_trial

    _configure_tensorflow(1, 0)
    rng = np.random.default_rng(0)
    data = EmbeddingData.from_arrays(
        rng.normal(size=(TRAIN_ROWS, EMBEDDING)).astype(np.float32), rng.integers(CLASSES, size=TRAIN_ROWS),
        rng.normal(size=(VALIDATION_ROWS, EMBEDDING)).astype(np.float32), rng.integers(CLASSES, size=VALIDATION_ROWS), CLASSES,
    )
    steps = math.ceil(TRAIN_ROWS / BATCH_SIZE)
    rows = []
    for trial in range(arguments.trials):
        release_previous_trial()
        hyperparameters = {"units_1": 400 + trial, "units_2": 250, "units_3": 120, "batch_size": BATCH_SIZE}
        head = build_trial_head(data, hyperparameters, steps)
        head.fit(**_fit_inputs(data, BATCH_SIZE, trial), epochs=arguments.epochs, verbose=0)
        del head
        row = {"trial": trial + 1, "resident_mb": round(resident_megabytes(), 1),
               "registered_functions": len(context.context().list_function_names())}
        rows.append(row)
        print(json.dumps(row), flush=True)

    first, last = rows[WARM_UP_TRIALS - 1], rows[-1]
    measured_trials = last["trial"] - first["trial"]
    summary = {
        "trials": arguments.trials, "epochs": arguments.epochs,
        "resident_mb_per_trial": round((last["resident_mb"] - first["resident_mb"]) / measured_trials, 1),
        "registered_functions_per_trial": round((last["registered_functions"] - first["registered_functions"]) / measured_trials, 1),
    }
    Path(arguments.output).write_text(json.dumps({"summary": summary, "trials": rows}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
