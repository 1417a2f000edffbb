"""Time one head epoch at full Fashion-MNIST size against the dense-matmul limit of this machine.

The head is built, compiled and fed exactly as a trial does it
(`tuning.trainable.build_trial_head` and the trial's `fit()` inputs):
1,280-float embeddings, units 512/256/128, 10 classes, 60,000 training and
10,000 validation rows of random data (speed does not depend on the values).
TensorFlow is configured as for a trial given all of this machine's CPUs
(thread pools, Grappler off).
For each batch size one `fit()` runs 1 + `--timed-epochs` epochs, as a trial
runs all its epochs in one `fit()`. The first epoch traces the steps and is
left out. The epoch time is the median of the others, because on two cores a
stretch of a few seconds within an epoch sometimes runs at half speed.

The limit is the epoch's FLOPs divided by the FLOP/s of one large float32
matmul measured in the same run on the same threads:
training counts 3 matmuls per layer and row (forward, and two for the
gradients), validation one. The ratio is measured time / limit.

    python bench/epoch_speed.py [--batch-sizes 32,64,128,256] [--timed-epochs 3] [--output bench/epoch_speed.json]
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


def time_epoch(batch_size: int, timed_epochs: int) -> dict:
    import keras

    from tuning.trainable import EmbeddingData, _fit_inputs, build_trial_head

    rng = np.random.default_rng(batch_size)
    data = EmbeddingData.from_arrays(
        rng.normal(size=(TRAIN_ROWS, EMBEDDING)).astype(np.float32), rng.integers(CLASSES, size=TRAIN_ROWS),
        rng.normal(size=(VALIDATION_ROWS, EMBEDDING)).astype(np.float32), rng.integers(CLASSES, size=VALIDATION_ROWS),
        CLASSES,
    )
    keras.backend.clear_session()
    hyperparameters = {"units_1": UNITS[0], "units_2": UNITS[1], "units_3": UNITS[2], "batch_size": batch_size, "dropout": 0.2}
    head = build_trial_head(data, hyperparameters, math.ceil(TRAIN_ROWS / batch_size))

    class EpochClock(keras.callbacks.Callback):
        """Time each epoch, validation included, inside one fit() as a trial runs them."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    clock = EpochClock()
    head.fit(**_fit_inputs(data, batch_size, seed=0), epochs=1 + timed_epochs, verbose=0, callbacks=[clock])
    seconds = clock.seconds
    return {
        "batch_size": batch_size, "first_epoch_seconds": round(seconds[0], 2),
        "epoch_seconds": round(float(np.median(seconds[1:])), 2), "timed_epoch_seconds": [round(value, 2) for value in seconds[1:]],
    }


def positive_int(text: str) -> int:
    """Parse an integer of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}; pass a whole number such as 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; pass at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="Comma-separated batch sizes (the quickstart's choices).")
    parser.add_argument("--timed-epochs", type=positive_int, default=3, help="Epochs timed after the first; the median is reported.")
    parser.add_argument("--output", default=str(REPOSITORY / "bench" / "epoch_speed.json"), help="JSON file for the results.")
    arguments = parser.parse_args()

    from tuning.trainable import _configure_tensorflow

    _configure_tensorflow(os.cpu_count() or 1, 0)
    rate_before = matmul_flops_per_second()
    rows = [time_epoch(int(size), arguments.timed_epochs) for size in arguments.batch_sizes.split(",")]
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
