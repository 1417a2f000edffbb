from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from models.classifier import (
    HEAD_DEFAULTS,
    HEAD_HYPERPARAMETERS,
    build_head,
    resolve_head_hyperparameters,
)
from models.datasets import Dataset
from models.optimizers import FusedAdam, FusedAdamW

EMBEDDING_DIM = 12
NUM_CLASSES = 3


def _statistics(dim: int = EMBEDDING_DIM) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(dim, np.float32), np.ones(dim, np.float32)


def _head(hyperparameters: dict, steps_per_epoch: int = 10) -> keras.Model:
    mean, variance = _statistics()
    return build_head(EMBEDDING_DIM, NUM_CLASSES, mean, variance, hyperparameters, steps_per_epoch)


def _hidden_dense_layers(head: keras.Model) -> list[keras.layers.Dense]:
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    return dense[:-1]


def test_head_names_and_defaults() -> None:
    assert HEAD_HYPERPARAMETERS == (
        "learning_rate",
        "decay_rate",
        "dropout",
        "units_1",
        "units_2",
        "units_3",
        "l2",
        "batch_size",
        "activation",
        "optimizer",
    )
    assert resolve_head_hyperparameters({}) == HEAD_DEFAULTS
    assert resolve_head_hyperparameters({"units_2": 32})["units_2"] == 32


@pytest.mark.parametrize(
    ("units", "expected_hidden_units"),
    [
        ((128, 0, 0), [128]),
        ((64, 32, 0), [64, 32]),
        ((64, 32, 16), [64, 32, 16]),
        ((0, 32, 0), [32]),
        ((0, 0, 0), []),
    ],
)
def test_head_layers_follow_units(units: tuple[int, int, int], expected_hidden_units: list[int]) -> None:
    head = _head({"units_1": units[0], "units_2": units[1], "units_3": units[2], "dropout": 0.25})

    hidden = _hidden_dense_layers(head)
    dropouts = [layer for layer in head.layers if isinstance(layer, keras.layers.Dropout)]
    output = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)][-1]

    assert [layer.units for layer in hidden] == expected_hidden_units
    assert len(dropouts) == len(expected_hidden_units)
    assert all(layer.rate == 0.25 for layer in dropouts)
    assert output.units == NUM_CLASSES
    assert isinstance(head.layers[1], keras.layers.Normalization)
    assert head.output_shape == (None, NUM_CLASSES)


def test_head_applies_activation_and_l2() -> None:
    head = _head({"units_1": 16, "units_2": 8, "activation": "tanh", "l2": 0.01})

    for layer in _hidden_dense_layers(head):
        assert layer.activation is keras.activations.tanh
        assert isinstance(layer.kernel_regularizer, keras.regularizers.L2)
        assert layer.kernel_regularizer.l2 == pytest.approx(0.01)


def test_head_outputs_probabilities() -> None:
    head = _head({})
    embeddings = np.random.default_rng(0).normal(size=(5, EMBEDDING_DIM)).astype(np.float32)

    probabilities = head.predict(embeddings, verbose=0)

    assert probabilities.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities.min() >= 0.0


def test_head_standardizes_embeddings() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(loc=5.0, scale=3.0, size=(200, EMBEDDING_DIM)).astype(np.float32)
    head = build_head(
        EMBEDDING_DIM, NUM_CLASSES, embeddings.mean(axis=0), embeddings.var(axis=0), {}, steps_per_epoch=1
    )

    normalization = next(layer for layer in head.layers if isinstance(layer, keras.layers.Normalization))
    standardized = np.asarray(normalization(embeddings))

    np.testing.assert_allclose(standardized.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(standardized.var(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "optimizer_class"),
    [
        ("adam", FusedAdam),
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adamw", FusedAdamW),
    ],
)
def test_head_optimizer_choice(name: str, optimizer_class: type) -> None:
    head = _head({"optimizer": name})

    assert type(head.optimizer) is optimizer_class
    assert isinstance(head.optimizer._learning_rate, keras.optimizers.schedules.InverseTimeDecay)


def test_head_inverse_time_decay_after_steps() -> None:
    learning_rate = 0.01
    decay_rate = 0.5
    batch_size = 10
    embeddings = np.random.default_rng(0).normal(size=(50, EMBEDDING_DIM)).astype(np.float32)
    labels = np.arange(50) % NUM_CLASSES
    steps_per_epoch = math.ceil(len(embeddings) / batch_size)
    head = _head({"learning_rate": learning_rate, "decay_rate": decay_rate}, steps_per_epoch=steps_per_epoch)

    assert float(head.optimizer.learning_rate) == pytest.approx(learning_rate)
    head.fit(embeddings, labels, batch_size=batch_size, epochs=3, verbose=0)

    # 3 epochs of 5 steps: 0.01 / (1 + 0.5 * 15 / 5) = 0.004.
    assert int(head.optimizer.iterations) == 15
    assert float(head.optimizer.learning_rate) == pytest.approx(0.004, rel=1e-5)


def test_head_zero_decay_keeps_rate() -> None:
    embeddings = np.random.default_rng(0).normal(size=(40, EMBEDDING_DIM)).astype(np.float32)
    labels = np.arange(40) % NUM_CLASSES
    head = _head({"learning_rate": 0.02}, steps_per_epoch=4)

    head.fit(embeddings, labels, batch_size=10, epochs=2, verbose=0)

    assert float(head.optimizer.learning_rate) == pytest.approx(0.02)


def test_head_rejects_unknown_hyperparameter() -> None:
    with pytest.raises(ValueError) as error:
        _head({"learning_rate": 1e-3, "momentum": 0.9})

    message = str(error.value)
    assert "Unknown head hyperparameter 'momentum'" in message
    for name in HEAD_HYPERPARAMETERS:
        assert name in message


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"units_1": -1}, r"units_1=-1 is invalid; expected an integer >= 0"),
        ({"units_2": 12.5}, r"units_2=12.5 is invalid"),
        ({"units_3": True}, r"units_3=True is invalid"),
        ({"dropout": 1.0}, r"dropout=1.0 is invalid; expected a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 is invalid"),
        ({"l2": -1e-4}, r"l2=-0.0001 is invalid; expected a number >= 0"),
        ({"learning_rate": 0.0}, r"learning_rate=0.0 is invalid; expected a number > 0"),
        ({"learning_rate": float("nan")}, r"learning_rate=nan is invalid"),
        ({"learning_rate": "0.01"}, r"learning_rate='0.01' is invalid"),
        ({"decay_rate": -0.5}, r"decay_rate=-0.5 is invalid"),
        ({"batch_size": 0}, r"batch_size=0 is invalid; expected an integer >= 1"),
        ({"activation": "swoosh"}, r"activation='swoosh' is not a Keras activation name"),
        ({"optimizer": "adagrad"}, r"optimizer='adagrad' is not supported; use one of adam, adamw, sgd, rmsprop"),
    ],
)
def test_head_rejects_invalid_values(hyperparameters: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _head(hyperparameters)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"embedding_dim": 0}, "embedding_dim=0 is invalid"),
        ({"num_classes": 1}, "num_classes=1 is invalid; expected an integer of at least 2"),
        ({"steps_per_epoch": 0}, "steps_per_epoch=0 is invalid"),
        ({"mean": np.zeros(5, np.float32)}, r"mean has shape \(5,\) but embedding_dim is 12"),
        ({"variance": np.ones((12, 1), np.float32)}, r"variance has shape \(12, 1\)"),
        ({"variance": -np.ones(12, np.float32)}, "variance contains negative values"),
        ({"mean": np.full(12, np.inf, np.float32)}, "mean contains NaN or infinite values"),
    ],
)
def test_head_rejects_invalid_shapes(arguments: dict, message: str) -> None:
    mean, variance = _statistics()
    call = {
        "embedding_dim": EMBEDDING_DIM,
        "num_classes": NUM_CLASSES,
        "mean": mean,
        "variance": variance,
        "hyperparameters": {},
        "steps_per_epoch": 10,
        **arguments,
    }

    with pytest.raises(ValueError, match=message):
        build_head(**call)


def test_head_transfers_to_unseen_digits(trained_head, target: Dataset) -> None:
    # The CNN was pretrained on digits 0-4 only, and the head is trained on digits 5-9.
    assert target.class_names == ["5", "6", "7", "8", "9"]
    assert trained_head.val_accuracy >= 0.9, f"validation accuracy {trained_head.val_accuracy:.3f}"
