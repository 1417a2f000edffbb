"""Time one head epoch at full Fashion-MNIST size against the dense-matmul limit of this machine.

The head is built and compiled exactly as a trial builds it
(`models.classifier.build_head` with the trainable's steps per execution):
1,280-float embeddings, units 512/256/128, 10 classes, 60,000 training and
10,000 validation rows of random data (speed does not depend on the values).
TensorFlow is configured as for a trial given all of this machine's CPUs
(thread pools, Grappler off).
For each batch size the second epoch is timed, so tracing is left out.

The limit is the epoch's FLOPs divided by the FLOP/s of one large float32
matmul measured in the same run on the same threads:
training counts 3 matmuls per layer and row (forward, and two for the
gradients), validation one. The ratio is measured time / limit.

    python bench/epoch_speed.py [--batch-sizes 32,64,128,256] [--output bench/epoch_speed.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
TRAIN_ROWS, VALIDATION_ROWS, EMBEDDING, CLASSES = 60_000, 10_000, 1_280, 10
UNITS = (512, 256, 128)


def layer_shapes() -> list[tuple[int, int]]:
    sizes = [EMBEDDING, *UNITS, CLASSES]
    return list(zip(sizes[:-1], sizes[1:]))


def epoch_flops() -> float:
    per_row = sum(2 * inputs * outputs for inputs, outputs in layer_shapes())
    return 3 * per_row * TRAIN_ROWS + per_row * VALIDATION_ROWS


def matmul_flops_per_second(repeats: int = 30) -> float:
    """Measure float32 matmul throughput on a 4096 x 1280 by 1280 x 512 product, the head's largest layer."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    left = tf.constant(rng.normal(size=(4096, EMBEDDING)).astype(np.float32))
    right = tf.constant(rng.normal(size=(EMBEDDING, UNITS[0])).astype(np.float32))
    product = tf.function(lambda: tf.matmul(left, right))
    product().numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        result = product()
    result.numpy()
    return 2 * 4096 * EMBEDDING * UNITS[0] * repeats / (time.perf_counter() - started)


def time_epoch(batch_size: int) -> dict:
    import keras

    from models.classifier import build_head
    from tuning.trainable import STEPS_PER_EXECUTION

    rng = np.random.default_rng(batch_size)
    x_train = rng.normal(size=(TRAIN_ROWS, EMBEDDING)).astype(np.float32)
    y_train = rng.integers(CLASSES, size=TRAIN_ROWS)
    x_val = rng.normal(size=(VALIDATION_ROWS, EMBEDDING)).astype(np.float32)
    y_val = rng.integers(CLASSES, size=VALIDATION_ROWS)
    steps = math.ceil(TRAIN_ROWS / batch_size)
    keras.backend.clear_session()
    hyperparameters = {"units_1": UNITS[0], "units_2": UNITS[1], "units_3": UNITS[2], "batch_size": batch_size, "dropout": 0.2}
    head = build_head(EMBEDDING, CLASSES, x_train.mean(axis=0), x_train.var(axis=0), hyperparameters, steps,
                      steps_per_execution=min(STEPS_PER_EXECUTION, steps))
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        head.fit(x_train, y_train, batch_size=batch_size, epochs=1, validation_data=(x_val, y_val), shuffle=True, verbose=0)
        seconds.append(time.perf_counter() - started)
    return {"batch_size": batch_size, "first_epoch_seconds": round(seconds[0], 2), "epoch_seconds": round(seconds[1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="Comma-separated batch sizes (the quickstart's choices).")
    parser.add_argument("--output", default=str(REPOSITORY / "bench" / "epoch_speed.json"), help="JSON file for the results.")
    arguments = parser.parse_args()

    from tuning.trainable import _configure_tensorflow

    _configure_tensorflow(os.cpu_count() or 1, 0)
    rate_before = matmul_flops_per_second()
    rows = [time_epoch(int(size)) for size in arguments.batch_sizes.split(",")]
    rate = max(rate_before, matmul_flops_per_second())
    limit = epoch_flops() / rate
    for row in rows:
        row["ratio_to_limit"] = round(row["epoch_seconds"] / limit, 2)
        print(json.dumps(row), flush=True)
    summary = {
        "matmul_gflops_per_second": round(rate / 1e9, 1), "epoch_gflop": round(epoch_flops() / 1e9, 1),
        "limit_seconds": round(limit, 2), "cpus": os.cpu_count(), "epochs": rows,
    }
    Path(arguments.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({key: value for key, value in summary.items() if key != "epochs"}))


if __name__ == "__main__":
    main()
