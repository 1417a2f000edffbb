"""FusedAdam and FusedAdamW: Keras' update rule in one TensorFlow kernel per variable."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.optimizers import FusedAdam, FusedAdamW

SHAPE = (300, 40)
STEPS = 50


def _train(
    optimizer: keras.optimizers.Optimizer, start: np.ndarray, gradients: list[np.ndarray], dtype: str = "float32",
) -> np.ndarray:
    """Apply `gradients` one step at a time to a `dtype` variable that starts at `start`, in a traced step as fit() runs it.

    Returns the final values as float32.
    """
    variable = keras.Variable(start, dtype=dtype)
    optimizer.build([variable])
    step = tf.function(lambda gradient: optimizer.apply_gradients([(gradient, variable)]))
    for gradient in gradients:
        step(tf.constant(gradient, dtype=dtype))
    return np.asarray(variable.numpy(), np.float32)


def _schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.InverseTimeDecay(1e-2, decay_steps=10, decay_rate=0.5)


@pytest.fixture(scope="module")
def start_and_gradients() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return rng.normal(size=SHAPE).astype(np.float32), [rng.normal(size=SHAPE).astype(np.float32) for _ in range(STEPS)]


@pytest.mark.parametrize(
    ("fused", "reference"),
    [
        (lambda: FusedAdam(learning_rate=_schedule()), lambda: keras.optimizers.Adam(learning_rate=_schedule())),
        (
            lambda: FusedAdam(learning_rate=_schedule(), beta_1=0.8, beta_2=0.99, epsilon=1e-3),
            lambda: keras.optimizers.Adam(learning_rate=_schedule(), beta_1=0.8, beta_2=0.99, epsilon=1e-3),
        ),
        (
            lambda: FusedAdamW(learning_rate=_schedule(), weight_decay=0.05),
            lambda: keras.optimizers.AdamW(learning_rate=_schedule(), weight_decay=0.05),
        ),
        (
            lambda: FusedAdam(learning_rate=_schedule(), amsgrad=True),
            lambda: keras.optimizers.Adam(learning_rate=_schedule(), amsgrad=True),
        ),
    ],
    ids=["adam", "adam-custom-betas", "adamw", "amsgrad"],
)
def test_fused_update_matches_keras(fused, reference, start_and_gradients) -> None:
    start, gradients = start_and_gradients

    ours = _train(fused(), start, gradients)
    theirs = _train(reference(), start, gradients)

    # After 50 steps the variable has moved by about 0.15, and the two differ only by float rounding.
    assert np.abs(theirs - start).max() > 0.05
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def _update_op_types(optimizer: keras.optimizers.Optimizer, dtype: str = "float32") -> set[str]:
    variable = keras.Variable(np.zeros(SHAPE), dtype=dtype)
    optimizer.build([variable])
    step = tf.function(lambda gradient: optimizer.apply_gradients([(gradient, variable)]))
    graph = step.get_concrete_function(tf.TensorSpec(SHAPE, dtype)).graph
    return {operation.type for operation in graph.get_operations()}


def test_fused_update_is_one_kernel() -> None:
    # Keras' own update is a chain of element-wise operations, and the fused one calls the kernel.
    assert "ResourceApplyAdam" in _update_op_types(FusedAdam(learning_rate=1e-3))
    assert "ResourceApplyAdam" in _update_op_types(FusedAdam(learning_rate=1e-3), dtype="float64")
    assert "ResourceApplyAdam" in _update_op_types(FusedAdamW(learning_rate=1e-3, weight_decay=0.01))
    assert "ResourceApplyAdam" not in _update_op_types(keras.optimizers.Adam(learning_rate=1e-3))
    assert "ResourceApplyAdam" not in _update_op_types(FusedAdam(learning_rate=1e-3, amsgrad=True))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_variables_use_keras_update(dtype) -> None:
    # The kernel would round the betas to the variable's dtype: 0.999 is 1.0 in bfloat16.
    assert "ResourceApplyAdam" not in _update_op_types(FusedAdam(learning_rate=1e-3), dtype=dtype)

    start = np.full(SHAPE, 0.5, np.float32)
    gradients = [np.full(SHAPE, 0.1, np.float32)] * 3
    ours = _train(FusedAdam(learning_rate=1e-2), start, gradients, dtype)
    theirs = _train(keras.optimizers.Adam(learning_rate=1e-2), start, gradients, dtype)

    np.testing.assert_array_equal(ours, theirs)
    if dtype == "float16":
        # In bfloat16 Keras' own bias correction rounds the step to 0, so only float16 moves.
        assert np.all(ours < 0.5)



def test_fused_optimizers_serialize() -> None:
    for optimizer in (FusedAdam(learning_rate=_schedule(), beta_2=0.99), FusedAdamW(learning_rate=1e-3, weight_decay=0.02)):
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))

        assert type(restored) is type(optimizer)
        assert restored.get_config() == optimizer.get_config()
