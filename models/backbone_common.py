"""Pieces every backbone kind shares: the Backbone record, input conversion and weight hashing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

# Bytes read at a time when hashing a file.
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Backbone:
    """A backbone CNN with the key that identifies its weights.

    Attributes:
        cnn: Model from (batch, image_size, image_size, 3) in [0, 1] to embeddings.
        weights_key: Hex digest that changes whenever the embeddings could
            differ: architecture, weights, cut layer, input conversion, image
            size. Pass it to models.features.embedding_cache_key.
        cache_hit: True when small_cnn weights were loaded from the project's
            cache. Always False for other backbones, which the project does not train.
        description: One line for logs, for example "MobileNetV2 with ImageNet weights".

    Example:
        >>> backbone = load_backbone("small_cnn", weights="none", image_size=32, seed=0)
        >>> backbone.cache_hit
        False
    """

    cnn: keras.Model
    weights_key: str
    cache_hit: bool
    description: str = ""


def build_input_conversion(kernel: np.ndarray, bias: np.ndarray, name: str) -> layers.Dense:
    """Build a frozen per-pixel affine map from [0, 1] RGB to what a backbone expects.

    A Dense layer on the channel axis applies output = input @ kernel + bias
    at every pixel. It covers scaling, per-channel normalization, the RGB to
    BGR swap and conversion to one gray channel, and it is a built-in layer, so
    a saved model that contains it loads with keras.models.load_model in safe mode.

    Args:
        kernel: float (3, channels) matrix.
        bias: float (channels,) offset.
        name: Layer name.

    Returns:
        The built, non-trainable layer.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    conversion = layers.Dense(kernel.shape[1], use_bias=True, trainable=False, name=name)
    conversion.build((None, None, None, kernel.shape[0]))
    conversion.set_weights([kernel, bias])
    return conversion


def weights_digest(model: keras.Model) -> str:
    """Hash the values, shapes and dtypes of every variable of a model, in order.

    Variable names are left out because Keras numbers unnamed layers per
    process, so the same weights would hash differently in two builds.

    Returns:
        A sha256 hex digest. BatchNormalization moving statistics are included.
    """
    digest = hashlib.sha256()
    for index, variable in enumerate(model.weights):
        values = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{index}{values.dtype.str}{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Hash a file's bytes with sha256, reading it in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


