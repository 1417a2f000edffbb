"""The trainable in real Ray Tune trials on digits pixels used as embeddings."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray import tune
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from models.classifier import build_head
from tuning.trainable import (
    FAILURE_KEY,
    HEAD_WEIGHTS_FILE,
    STATISTICS_CHUNK_ROWS,
    TRIAL_STATE_FILE,
    EmbeddingData,
    TrialSettings,
    _configure_tensorflow,
    _fit_inputs,
    build_trial_head,
    feature_statistics,
    train_head,
)


@pytest.fixture(scope="module")
def digits_data() -> EmbeddingData:
    images, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=0)
    return EmbeddingData.from_arrays(x_train, y_train, x_val, y_val, num_classes=10)


def run_trials(data: EmbeddingData, param_space: dict, storage: Path, *, max_epochs: int, patience: int) -> tune.ResultGrid:
    settings = TrialSettings(
        metric="val_loss", mode="min", max_epochs=max_epochs, patience=patience,
        fixed_hyperparameters={"units_1": 32}, cpus_per_trial=1, gpus_per_trial=0,
    )
    tuner = tune.Tuner(
        tune.with_parameters(train_head, data=data, settings=settings),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(storage), verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()


def test_statistics_come_from_training_embeddings(digits_data):
    assert digits_data.mean.shape == (64,)
    # The statistics are summed in float64, so they are compared with numpy's float64 result.
    train = digits_data.train.astype(np.float64)
    np.testing.assert_allclose(digits_data.mean, train.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(digits_data.variance, train.var(axis=0), rtol=1e-6, atol=1e-6)
    assert digits_data.train.dtype == np.float32


def test_trial_reports_stops_and_checkpoints(ray_local, digits_data, tmp_path):
    results = run_trials(
        digits_data, {"learning_rate": 0.05, "batch_size": 32}, tmp_path, max_epochs=40, patience=2,
    )
    result = results[0]
    history = result.metrics_dataframe
    last = result.metrics

    assert result.error is None
    for column in ("loss", "accuracy", "val_loss", "val_accuracy", "best_val_loss", "best_epoch", "node", "startup_seconds"):
        assert column in history.columns
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    # Early stopping: training ended `patience` epochs after the best epoch, before max_epochs.
    assert last["epoch"] < 40
    assert last["best_epoch"] == last["epoch"] - 2
    assert last["best_val_loss"] == pytest.approx(history["val_loss"].min())
    assert last["best_val_accuracy"] > 0.9

    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / TRIAL_STATE_FILE).read_text())
        assert (Path(folder) / HEAD_WEIGHTS_FILE).is_file()
    assert state["epoch"] == last["best_epoch"]
    assert state["last_epoch"] == last["epoch"]
    assert state["finished"] is True
    assert state["hyperparameters"]["units_1"] == 32
    assert state["hyperparameters"]["learning_rate"] == 0.05
    # The checkpoint contains the best epoch's weights, although two worse epochs followed.
    head = build_trial_head(digits_data, state["hyperparameters"], 1)
    head.load_weights(str(Path(folder) / HEAD_WEIGHTS_FILE))
    predicted = head.predict(digits_data.val, verbose=0).argmax(axis=1)
    assert float(np.mean(predicted == digits_data.y_val)) == pytest.approx(last["best_val_accuracy"], abs=1e-6)


def test_diverging_trial_fails_with_reason(ray_local, digits_data, tmp_path):
    results = run_trials(
        digits_data, {"learning_rate": 1.0e6, "optimizer": "sgd", "batch_size": 256}, tmp_path, max_epochs=5, patience=5,
    )

    # The trial ends by itself with the reason, without raising: Ray keeps its retries for dead workers.
    assert results.num_errors == 0
    last = results[0].metrics
    assert last[FAILURE_KEY].startswith("FloatingPointError: ")
    assert "diverged" in last[FAILURE_KEY]
    assert np.isnan(last["val_loss"])
    assert "best_val_loss" not in last


def test_trial_turns_grappler_off():
    import tensorflow as tf

    previous_options = tf.config.optimizer.get_experimental_options()
    try:
        _configure_tensorflow(1, 0)
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is True
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous_options.get("disable_meta_optimizer", False)})


def test_trial_head_optimizer_built_before_fit(digits_data):
    head = build_trial_head(digits_data, {"units_1": 32, "units_2": 16, "optimizer": "adam"}, steps_per_epoch=10)

    # Adam's step counter, and a first and a second moment for each trainable variable.
    assert head.optimizer.built
    assert len(head.trainable_variables) == 6
    assert len(head.optimizer.variables) == 1 + 2 * 6


def test_trial_head_fit_creates_no_variables(digits_data):
    import tensorflow as tf

    head = build_trial_head(digits_data, {"units_1": 32, "units_2": 16, "batch_size": 64}, steps_per_epoch=22)
    created = []

    def record(next_creator, **arguments):
        variable = next_creator(**arguments)
        created.append(variable.name)
        return variable

    with tf.variable_creator_scope(record):
        history = head.fit(**_fit_inputs(digits_data, batch_size=64, seed=0), epochs=2, verbose=0)

    # 1,347 rows at batch size 64 are 22 steps per epoch, one pass of the repeated pipeline.
    assert int(head.optimizer.iterations.numpy()) == 2 * 22

    # A variable created while the training step is traced makes TensorFlow trace the step
    # again. The placeholder metric update of build_trial_head must not reach the accuracy.
    assert created == []
    assert len(history.history["accuracy"]) == 2
    assert 0.0 < history.history["accuracy"][0] < history.history["accuracy"][1] <= 1.0


def test_trial_graph_freed_after_trial(digits_data):
    import keras
    from tensorflow.python.framework.func_graph import FuncGraph

    def training_graphs() -> int:
        gc.collect()
        # type() rather than isinstance(): isinstance() reads __class__, which warns on some of torch's module attributes.
        return sum(1 for item in gc.get_objects() if type(item) is FuncGraph and item.name == "one_step_on_data")

    before = training_graphs()
    for units in (32, 33):
        keras.backend.clear_session()
        head = build_trial_head(digits_data, {"units_1": units, "units_2": 16, "batch_size": 64}, steps_per_epoch=22)
        head.fit(**_fit_inputs(digits_data, batch_size=64, seed=0), epochs=1, verbose=0)
        # The live head's training and validation steps are counted.
        assert training_graphs() > before
        del head
    keras.backend.clear_session()

    # A reused worker runs trial after trial, so nothing of a finished trial's graph may stay alive.
    assert training_graphs() == before


def test_statistics_of_memory_map_in_chunks(tmp_path):
    rows = STATISTICS_CHUNK_ROWS * 2 + 17
    values = np.random.default_rng(0).normal(loc=1000.0, scale=0.01, size=(rows, 3)).astype(np.float32)
    np.save(tmp_path / "embeddings.npy", values)
    mapped = np.load(tmp_path / "embeddings.npy", mmap_mode="r")

    data = EmbeddingData.from_arrays(mapped, np.zeros(rows), mapped[:5], np.zeros(5), num_classes=2)
    mean, variance = feature_statistics(np.zeros((0, 3), np.float32))

    # The arrays are kept as views of the memory map, not copied.
    assert np.shares_memory(data.train, mapped)
    # Centred float64 sums keep the variance of values far from 0 accurate.
    np.testing.assert_allclose(data.variance, values.astype(np.float64).var(axis=0), rtol=1e-4)
    np.testing.assert_allclose(data.mean, values.astype(np.float64).mean(axis=0), rtol=1e-7)
    assert mean.tolist() == [0.0, 0.0, 0.0]
    assert variance.tolist() == [0.0, 0.0, 0.0]


def test_small_embeddings_pass_rows_once(digits_data):
    inputs = _fit_inputs(digits_data, batch_size=100, seed=0)
    # 1,347 rows at batch size 100 are 14 steps, one call into TensorFlow per epoch, so the
    # pipeline repeats its passes and steps_per_epoch cuts it into epochs.
    passes = list(inputs["x"].take(2 * 14).as_numpy_iterator())
    first_pass, second_pass = passes[:14], passes[14:]
    validation = list(inputs["validation_data"].as_numpy_iterator())
    first_labels = np.concatenate([labels for _, labels in first_pass])
    second_labels = np.concatenate([labels for _, labels in second_pass])

    assert inputs["steps_per_epoch"] == 14
    assert len(first_pass[-1][1]) == 47
    assert "batch_size" not in inputs
    # Each pass is the whole training set in a new shuffled order.
    assert sorted(first_labels) == sorted(digits_data.y_train)
    assert sorted(second_labels) == sorted(digits_data.y_train)
    assert not np.array_equal(first_labels, digits_data.y_train)
    assert not np.array_equal(first_labels, second_labels)
    # Rows keep their labels, and validation is one pass in order.
    label_of = {tuple(row): label for row, label in zip(digits_data.train, digits_data.y_train)}
    features, labels = first_pass[0]
    assert all(label_of[tuple(row)] == label for row, label in zip(features, labels))
    assert np.array_equal(np.concatenate([batch for batch, _ in validation]), digits_data.val)


def test_small_embeddings_pipelines_skip_autotuning(digits_data):
    import tensorflow as tf

    inputs = _fit_inputs(digits_data, batch_size=100, seed=0)

    # Autotuning left a head's process idle whenever another busy process shared its core.
    for pipeline in (inputs["x"], inputs["validation_data"]):
        options = pipeline.options()
        assert options.autotune.enabled is False
        assert options.experimental_optimization.apply_default_optimizations is False
        assert options.threading.private_threadpool_size == tf.config.threading.get_intra_op_parallelism_threads()


def test_small_embeddings_train_whole_epochs(digits_data):
    # 1,347 rows at batch size 32 are 43 steps, fewer than the 64 of two executions of 32 steps.
    steps_per_epoch = 43
    head = build_head(digits_data.train.shape[1], 10, digits_data.mean, digits_data.variance,
                      {"units_1": 16, "batch_size": 32}, steps_per_epoch, steps_per_execution=32)
    inputs = _fit_inputs(digits_data, batch_size=32, seed=0)

    history = head.fit(**inputs, epochs=2, verbose=0)

    # The pipeline ends each pass itself, because a repeated one would run on into the next.
    assert "steps_per_epoch" not in inputs
    assert int(head.optimizer.iterations.numpy()) == 2 * steps_per_epoch
    predicted = head.predict(digits_data.val, verbose=0).argmax(axis=1)
    assert history.history["val_accuracy"][-1] == pytest.approx(float(np.mean(predicted == digits_data.y_val)), abs=1e-6)


def test_large_embeddings_stay_numpy(digits_data, monkeypatch):
    monkeypatch.setattr("tuning.trainable.TENSOR_PIPELINE_MAX_BYTES", 1000)

    inputs = _fit_inputs(digits_data, batch_size=100, seed=0)

    assert inputs["x"] is digits_data.train
    assert inputs["y"] is digits_data.y_train
    assert inputs["batch_size"] == 100
    assert inputs["validation_data"][0] is digits_data.val


REPOSITORY = Path(__file__).resolve().parents[2]

RELEASE_SCRIPT = """
import gc, json, weakref
import keras
from tuning.trainable import release_previous_trial

class Node:
    pass

release_previous_trial()
frozen_after_first = gc.get_freeze_count()

# A reference cycle, as a trial's objects form them, made after the first trial started.
node = Node()
node.self = node
alive = weakref.ref(node)
del node
release_previous_trial()
print(json.dumps({"frozen_after_first": frozen_after_first, "frozen_after_second": gc.get_freeze_count(),
                  "cycle_collected": alive() is None}))
"""


def test_release_freezes_imports_once():
    completed = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPOSITORY)

    assert completed.returncode == 0, completed.stderr[-2000:]
    counts = json.loads(completed.stdout.strip().splitlines()[-1])
    # The imports of Keras and TensorFlow alone are several hundred thousand objects.
    assert counts["frozen_after_first"] > 100_000
    assert counts["frozen_after_second"] == counts["frozen_after_first"]
    assert counts["cycle_collected"] is True
