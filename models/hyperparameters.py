"""Names and defaults of the head's hyperparameters, importable without TensorFlow."""

from __future__ import annotations

HEAD_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-3,
    "decay_rate": 0.0,
    "dropout": 0.0,
    "units_1": 128,
    "units_2": 0,
    "units_3": 0,
    "l2": 0.0,
    "batch_size": 64,
    "activation": "relu",
    "optimizer": "adam",
}
HEAD_HYPERPARAMETERS: tuple[str, ...] = tuple(HEAD_DEFAULTS)
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop")
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "elu", "selu", "swish", "tanh", "sigmoid", "leaky_relu")
