"""Time quickstart-sized heads trained alone, two processes at a time, and on a single core.

Each process trains `--heads` heads the way a reused trial worker does:
`build_trial_head`, `_fit_inputs` and one `fit()` of 30 epochs. The data are
random embeddings of the quickstart's shape (716 training and 180 validation
rows of 128 floats, 5 classes), since the values do not change the speed. A
process prints its wall time and CPU time after one warm-up head.

Each round runs every setting twice: once with the pipelines at tf.data's
defaults (autotuning, static optimisations, the shared thread pool), as
trials ran before, and once with the options the trials now set.

Usage: python bench/concurrent_heads.py [--rounds 2] [--heads 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

HYPERPARAMETERS = {"units_1": 100, "units_2": 50, "units_3": 20, "batch_size": 64, "learning_rate": 1e-3,
                   "dropout": 0.2, "l2": 1e-5, "decay_rate": 0.5}


def train_heads(heads: int, autotune: bool) -> None:
    """Train `heads` heads after one warm-up head and print {"wall", "cpu"} as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPOSITORY))
    import numpy as np
    import tensorflow as tf

    from tuning import trainable

    trainable._configure_tensorflow(1, 0)
    if autotune:
        # The pipelines' options then stay at tf.data's defaults.
        tf.data.Dataset.with_options = lambda self, options, name=None: self
    rng = np.random.default_rng(0)
    data = trainable.EmbeddingData.from_arrays(
        rng.normal(size=(716, 128)).astype(np.float32), rng.integers(0, 5, 716),
        rng.normal(size=(180, 128)).astype(np.float32), rng.integers(0, 5, 180), 5,
    )
    batch_size = HYPERPARAMETERS["batch_size"]
    steps_per_epoch = -(-716 // batch_size)

    def one_head() -> None:
        trainable.release_previous_trial()
        head = trainable.build_trial_head(data, HYPERPARAMETERS, steps_per_epoch)
        head.fit(**trainable._fit_inputs(data, batch_size, 0), epochs=30, verbose=0)

    one_head()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(heads):
        one_head()
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)


def run_processes(count: int, heads: int, autotune: bool, pin: bool) -> list[dict[str, float]]:
    """Start `count` processes at once (each on its own core when `pin`) and return their timings."""
    processes = []
    for index in range(count):
        command = [sys.executable, __file__, "--worker", "--heads", str(heads)] + (["--autotune"] if autotune else [])
        preexec = (lambda core=index: os.sched_setaffinity(0, {core})) if pin else None
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=preexec))
    return [json.loads(process.communicate()[0].strip().splitlines()[-1]) for process in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of every setting, alternating.")
    parser.add_argument("--heads", type=int, default=5, help="Timed heads per process.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autotune", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        train_heads(arguments.heads, arguments.autotune)
        return

    settings = [(name, count, pin) for name, count, pin in
                (("one process on one core", 1, True), ("one process", 1, False), ("two processes", 2, False))]
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(arguments.rounds):
        for autotune in (True, False):
            for name, count, pin in settings:
                label = f"{name}, {'with' if autotune else 'without'} autotuning"
                timings = run_processes(count, arguments.heads, autotune, pin)
                results.setdefault(label, []).extend(timings)
                print(label, json.dumps(timings), flush=True)
    print("| setting | wall s per process, median (range) | CPU s per process, median |")
    print("|---|---|---|")
    for label, timings in results.items():
        walls = [timing["wall"] for timing in timings]
        cpus = [timing["cpu"] for timing in timings]
        print(f"| {label} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | {statistics.median(cpus):.2f} |")


if __name__ == "__main__":
    main()
