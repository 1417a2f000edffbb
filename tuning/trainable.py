"""The Ray Tune trainable: one trial trains one head on the cached embeddings."""

from __future__ import annotations

import gc
import json
import logging
import math
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

logger = logging.getLogger(__name__)

HEAD_WEIGHTS_FILE = "head.weights.h5"
TRIAL_STATE_FILE = "trial_state.json"

# Training steps per call into TensorFlow. At batch size 32 a full Fashion-MNIST epoch
# has 1,875 steps, and one Python round trip per step dominated the epoch time.
STEPS_PER_EXECUTION = 32

# Embeddings up to this size (training and validation together) reach fit() as tensors made once
# per trial (see _fit_inputs). Each worker then has its own copy, so larger ones stay in the object store.
TENSOR_PIPELINE_MAX_BYTES = 64 * 2**20

# Key of the last report of a trial that failed by itself; its value is the reason.
FAILURE_KEY = "failure"


@dataclass(frozen=True)
class EmbeddingData:
    """Embeddings and labels every trial trains on; shipped once through the object store."""

    train: np.ndarray
    y_train: np.ndarray
    val: np.ndarray
    y_val: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    num_classes: int

    @classmethod
    def from_arrays(cls, train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, num_classes: int) -> EmbeddingData:
        """Bundle the arrays with the feature-wise statistics of the training embeddings.

        Float32 C-contiguous arrays, memory maps included, are kept without a copy.
        """
        train = np.ascontiguousarray(train, dtype=np.float32)
        mean, variance = feature_statistics(train)
        return cls(
            train=train,
            y_train=np.asarray(y_train, dtype=np.int64),
            val=np.ascontiguousarray(val, dtype=np.float32),
            y_val=np.asarray(y_val, dtype=np.int64),
            mean=mean,
            variance=variance,
            num_classes=num_classes,
        )


# Rows per step of feature_statistics: 4,096 rows of 2,048 floats are 64 MB in float64.
STATISTICS_CHUNK_ROWS = 4096


def feature_statistics(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the feature-wise mean and (biased) variance in chunks of rows.

    numpy's var allocates a temporary as large as its input, which for 60,000
    embeddings of 2,048 floats is a second 490 MB copy. Chunks with float64
    sums keep the extra memory to one chunk.

    Returns:
        float32 (D,) mean and variance; zeros for an empty array.
    """
    count, dimension = embeddings.shape
    if count == 0:
        return np.zeros(dimension, np.float32), np.zeros(dimension, np.float32)

    total = np.zeros(dimension, dtype=np.float64)
    for start in range(0, count, STATISTICS_CHUNK_ROWS):
        total += embeddings[start : start + STATISTICS_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    mean = total / count

    # A second pass over the centred values avoids the cancellation of E[x^2] - E[x]^2.
    squares = np.zeros(dimension, dtype=np.float64)
    for start in range(0, count, STATISTICS_CHUNK_ROWS):
        centred = embeddings[start : start + STATISTICS_CHUNK_ROWS].astype(np.float64) - mean
        squares += np.square(centred).sum(axis=0)
    return mean.astype(np.float32), (squares / count).astype(np.float32)


@dataclass(frozen=True)
class TrialSettings:
    """Settings every trial shares besides the data: stopping rule, fixed hyperparameters, resources."""

    metric: str
    mode: str
    max_epochs: int
    patience: int
    fixed_hyperparameters: dict[str, Any]
    cpus_per_trial: float
    gpus_per_trial: float
    seed: int = 0
    # Seconds between checkpoints of a running trial's best weights; 0 checkpoints every
    # improving epoch. Each checkpoint costs a file write and a save of the experiment state.
    checkpoint_interval_seconds: float = 10.0


def train_head(config: dict[str, Any], data: EmbeddingData, settings: TrialSettings) -> None:
    """Train one head for up to `max_epochs` epochs and report every epoch to Ray Tune.

    Each report contains `loss`, `accuracy`, `val_loss`, `val_accuracy`, the
    values of the best epoch so far under the search metric (`best_epoch`,
    `best_val_loss`, ...), the node's address and Ray node id, and the
    trial's start-up time.
    A checkpoint of the head's weights is attached whenever the epoch is the
    best so far, so the kept checkpoint is always the best epoch. Training
    stops after `patience` epochs without improvement of the search metric.

    A trial that fails by itself (a NaN or infinite loss, TensorFlow running
    out of memory, any other exception in training) ends with a last report
    whose `failure` names the reason and whose metric is NaN. Retrying it
    would fail the same way, so it does not raise: Ray Tune keeps its retries
    for trials whose worker or node died.
    """
    started = time.monotonic()
    _configure_tensorflow(settings.cpus_per_trial, settings.gpus_per_trial)
    # Fields of every report: where the trial runs, when it started (Unix time), and the
    # checkpoint's epoch it continued from after a retry or a resume (0 for a fresh start).
    labels = {"node": _node_address(), "started_at": time.time() - (time.monotonic() - started), "resumed_from_epoch": 0}
    progress = {"epoch": 0}
    try:
        _train(config, data, settings, started, labels, progress)
    except Exception as error:  # noqa: BLE001 - every failure of the trial's own work ends it as failed
        reason = f"{type(error).__name__}: {error}".strip()
        logger.warning("trial %s failed at epoch %d: %s", tune.get_context().get_trial_id(), progress["epoch"], reason)
        tune.report({settings.metric: math.nan, FAILURE_KEY: reason, "epoch": progress["epoch"], **labels, "ended_at": time.time()})


def _train(
    config: dict[str, Any], data: EmbeddingData, settings: TrialSettings, started: float, labels: dict[str, Any], progress: dict[str, int],
) -> None:
    import keras

    from models.hyperparameters import HEAD_DEFAULTS

    release_previous_trial()
    hyperparameters = {**HEAD_DEFAULTS, **settings.fixed_hyperparameters, **config}
    hyperparameters = {name: value for name, value in hyperparameters.items() if name in HEAD_DEFAULTS}
    batch_size = int(hyperparameters["batch_size"])
    steps_per_epoch = max(1, math.ceil(len(data.train) / batch_size))
    seed = _trial_seed(settings.seed, hyperparameters)
    keras.utils.set_random_seed(seed)
    head = build_trial_head(data, hyperparameters, steps_per_epoch)

    first_epoch, best = 0, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            head.load_weights(str(Path(folder) / HEAD_WEIGHTS_FILE))
            state = json.loads((Path(folder) / TRIAL_STATE_FILE).read_text())
        first_epoch, best = state["epoch"], state["best"]
        if state.get("finished"):
            # The trial had finished before the run was interrupted, after the checkpoint
            # was saved but before the run's state recorded the trial as done.
            logger.info("trial had already finished at epoch %d; nothing to train", state.get("last_epoch", first_epoch))
            return
        # The learning rate decays with the optimizer's step count, so a resumed
        # trial continues the schedule instead of starting it again.
        head.optimizer.iterations.assign(first_epoch * steps_per_epoch)
        labels["resumed_from_epoch"] = first_epoch
        logger.info("resuming trial from its checkpoint at epoch %d", first_epoch)

    from tuning.epoch_reporter import EpochReporter

    reporter = EpochReporter(settings, hyperparameters, first_epoch, best, labels, time.monotonic() - started, progress)
    if first_epoch < settings.max_epochs and not reporter.patience_used_up():
        # One fit() for all epochs: the data is converted and the training step traced
        # once per trial, and the callback reports each epoch to Ray Tune.
        head.fit(
            **_fit_inputs(data, batch_size, seed),
            initial_epoch=first_epoch, epochs=settings.max_epochs, verbose=0, callbacks=[reporter],
        )


def release_previous_trial() -> None:
    """Release the previous trial's head and graphs in a reused worker, with Keras' `clear_session`.

    `clear_session` runs a full garbage collection, which scans the more than
    400,000 objects of the TensorFlow and Keras imports and took 0.22-0.29 s
    per trial on two CPU cores. Before the first trial those objects move to
    the collector's permanent generation (`gc.freeze`), and the collection then
    took 0.01-0.03 s. Frozen objects are still freed when their reference count
    drops to zero, and objects created later are collected as usual.
    """
    import keras

    global _imports_frozen
    if not _imports_frozen:
        gc.collect()
        gc.freeze()
        _imports_frozen = True
    keras.backend.clear_session()


# Whether release_previous_trial has frozen the objects that existed before this process's first trial.
_imports_frozen = False


def build_trial_head(data: EmbeddingData, hyperparameters: dict[str, Any], steps_per_epoch: int) -> Any:
    """Build and compile a trial's head, with the variables of its optimizer and accuracy metric already created.

    Keras otherwise creates the optimizer's variables inside conditionals while
    it traces the first training step. On a quickstart head that tracing took
    about 0.15 s longer, and TensorFlow kept the conditionals' functions after
    the trial, 32 for a head of three hidden layers (bench/worker_memory.py).
    The accuracy metric's variables, created during that trace too, made
    TensorFlow trace the whole training step a second time.

    Without a distribution strategy the optimizer also skips the all-reduce of
    the gradients over replicas, which returns them unchanged with one replica.
    In a traced step that all-reduce registers a custom gradient in
    TensorFlow's global registry. The registry then kept every trial's whole
    training graph alive, 15.6 MB per trial in a reused worker.
    """
    import tensorflow as tf

    from models.classifier import build_head

    head = build_head(
        data.train.shape[1], data.num_classes, data.mean, data.variance, hyperparameters, steps_per_epoch,
        steps_per_execution=min(STEPS_PER_EXECUTION, steps_per_epoch),
    )
    head.optimizer.build(head.trainable_variables)
    if not tf.distribute.has_strategy():
        # NOTE: replaces a private method of Keras' TensorFlow optimizer (Keras 3.15). If a
        # later Keras renames it, the override does nothing and the memory growth returns.
        head.optimizer._all_reduce_sum_gradients = _gradients_unchanged
    # One eager metric update on a placeholder row creates the metric's variables.
    # reset_metrics() then clears the placeholder's count, as fit() does before each epoch.
    head.compute_metrics(None, np.zeros(1, np.int64), np.full((1, data.num_classes), 1.0 / data.num_classes, np.float32))
    head.reset_metrics()
    return head


def _gradients_unchanged(grads_and_vars: Any) -> list[tuple[Any, Any]]:
    """Return the (gradient, variable) pairs as a list: the sum over a single replica."""
    return list(grads_and_vars)


def _fit_inputs(data: EmbeddingData, batch_size: int, seed: int) -> dict[str, Any]:
    """Return the data arguments of `fit()`: tf.data pipelines for small embeddings, numpy arrays otherwise.

    Given numpy arrays, Keras converts them for a new input pipeline at every
    epoch, which on a few thousand rows costs as much as the epoch's
    arithmetic. Up to TENSOR_PIPELINE_MAX_BYTES of embeddings, the trial
    converts them to tensors once, and each epoch shuffles row indices and
    gathers the rows. Every epoch and every validation covers each row
    exactly once.

    When a whole epoch fits in one call into TensorFlow (at most
    STEPS_PER_EXECUTION steps, as `build_trial_head` sets it), the training
    pipeline repeats its passes and `steps_per_epoch` ends each epoch after
    one pass. Keras then keeps one iterator for all epochs instead of
    creating one per epoch, which took about a quarter of a quickstart
    epoch. Longer epochs, whose last call could run into the next pass,
    end with the pipeline instead.

    The pipelines run without tf.data's autotuning and static optimisations,
    on a private pool of as many threads as the trial's intra-op pool. With
    autotuning, a process training quickstart heads on a single core sat
    idle for 30-50% of its wall time, and two trials at a time on two cores
    each ran up to 1.6 times slower than one alone (bench/BENCHMARKS.md,
    scaling section).
    """
    if data.train.nbytes + data.val.nbytes > TENSOR_PIPELINE_MAX_BYTES:
        return {"x": data.train, "y": data.y_train, "batch_size": batch_size, "shuffle": True,
                "validation_data": (data.val, data.y_val)}
    import tensorflow as tf

    def batches(features: np.ndarray, labels: np.ndarray, shuffle: bool, repeat: bool) -> tf.data.Dataset:
        features, labels = tf.convert_to_tensor(features), tf.convert_to_tensor(labels)
        indices = tf.data.Dataset.range(len(labels))
        if shuffle:
            indices = indices.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        indices = indices.batch(batch_size)
        if repeat:
            indices = indices.repeat()
        pipeline = indices.map(lambda index: (tf.gather(features, index), tf.gather(labels, index))).prefetch(1)
        return pipeline.with_options(options)

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    # 0, when no trial set the intra-op threads, keeps TensorFlow's shared pool.
    options.threading.private_threadpool_size = tf.config.threading.get_intra_op_parallelism_threads()

    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    one_call_per_epoch = steps_per_epoch <= STEPS_PER_EXECUTION
    # The pipeline shuffles by itself; fit()'s own shuffle applies only to arrays.
    inputs = {
        "x": batches(data.train, data.y_train, shuffle=True, repeat=one_call_per_epoch),
        "validation_data": batches(data.val, data.y_val, shuffle=False, repeat=False), "shuffle": False,
    }
    if one_call_per_epoch:
        inputs["steps_per_epoch"] = steps_per_epoch
    return inputs


def _configure_tensorflow(cpus: float, gpus: float) -> None:
    """Match TensorFlow's thread pools to the trial's CPUs, let GPU memory grow on demand, and turn Grappler off.

    The thread pools and memory growth only take effect before TensorFlow
    initialises its runtime, so a reused worker keeps the values of its first trial.
    """
    threads = max(1, int(math.ceil(cpus)))
    import tensorflow as tf

    # Grappler rewrites each new function graph on its first run, and every trial traces new
    # ones. On dense heads that cost more than it saved (see bench/BENCHMARKS.md).
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:
        logger.debug("TensorFlow already initialised; thread pools left as they are")
    if gpus > 0:
        for device in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(device, True)
            except RuntimeError:
                logger.debug("TensorFlow already initialised; memory growth left as it is on %s", device.name)


def _trial_seed(seed: int, hyperparameters: dict[str, Any]) -> int:
    """Derive a per-configuration seed, so a repeated configuration trains identically."""
    text = json.dumps(hyperparameters, sort_keys=True, default=str)
    return (zlib.crc32(text.encode()) + seed) % (2**31 - 1)


def _node_address() -> str:
    """Label the node: its IP address and Ray node id, e.g. `10.0.0.5 6f0c...` (56 hex digits).

    Several nodes can share one IP address (containers, or nodes started on
    one machine), so the node id distinguishes them.
    """
    try:
        import ray

        return f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()}"
    except Exception:  # noqa: BLE001 - the address only labels results; never fail a trial over it
        return socket.gethostname()
