"""Backbones by name, and the frozen feature extractor from raw images to embeddings.

A backbone maps a preprocessed image to an embedding vector. Its weights stay
frozen while heads are tuned, so the embeddings can be computed once and cached
(see models.features). The preprocessing and the small CNN live in
models.preprocessing and models.small_cnn and are re-exported here.

Example:
    >>> from pathlib import Path
    >>> from models.datasets import load_dataset
    >>> source = load_dataset("digits", classes=[0, 1, 2, 3, 4])
    >>> backbone = load_backbone(
    ...     "small_cnn", weights="pretrained", image_size=32, seed=0,
    ...     source=source, epochs=3, cache_dir=Path("cache"),
    ... )
    >>> extractor = build_feature_extractor(source.raw_shape, source.value_range, 32, backbone.cnn)
    >>> extractor.output_shape
    (None, 128)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras

from models.datasets import Dataset
from models.preprocessing import PREPROCESSING_VERSION, build_preprocessing
from models.small_cnn import (
    MIN_IMAGE_SIZE,
    build_random_small_cnn,
    build_small_cnn,
    pretrain_small_cnn,
    random_small_cnn_cache_key,
    small_cnn_cache_key,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BACKBONE_WEIGHTS",
    "MIN_IMAGE_SIZE",
    "PREPROCESSING_VERSION",
    "Backbone",
    "build_feature_extractor",
    "build_preprocessing",
    "build_random_small_cnn",
    "build_small_cnn",
    "load_backbone",
    "pretrain_small_cnn",
    "random_small_cnn_cache_key",
    "small_cnn_cache_key",
]

BACKBONES = ("small_cnn",)

# "pretrained": trained on a source dataset and cached; "none": seeded random init.
BACKBONE_WEIGHTS = ("pretrained", "none")


@dataclass(frozen=True)
class Backbone:
    """A backbone CNN with the key that identifies its weights.

    Attributes:
        cnn: Model from (batch, image_size, image_size, 3) to embeddings.
        weights_key: Hex digest that changes whenever the weights would differ;
            pass it to models.features.embedding_cache_key.
        cache_hit: True when the weights were loaded from the cache.

    Example:
        >>> backbone = load_backbone("small_cnn", weights="none", image_size=32, seed=0)
        >>> backbone.cache_hit
        False
    """

    cnn: keras.Model
    weights_key: str
    cache_hit: bool


def load_backbone(
    name: str,
    *,
    weights: str,
    image_size: int,
    seed: int,
    source: Dataset | None = None,
    epochs: int | None = None,
    cache_dir: Path | None = None,
) -> Backbone:
    """Build a backbone by name, pretrained (cached) or with random weights.

    Args:
        name: One of BACKBONES.
        weights: "pretrained" runs pretrain_small_cnn and needs source, epochs
            and cache_dir. "none" sets Keras' global seed and builds random
            weights, and source, epochs and cache_dir are ignored with a log line.
        image_size: Input side length in pixels, at least MIN_IMAGE_SIZE.
        seed: Keras global seed for pretraining or for the random init.
        source: Dataset to pretrain on.
        epochs: Pretraining epochs.
        cache_dir: Root of the weights cache.

    Returns:
        The Backbone.

    Raises:
        ValueError: If name or weights is unknown, or pretraining arguments are missing.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; use one of {', '.join(BACKBONES)}.")
    if weights not in BACKBONE_WEIGHTS:
        raise ValueError(f"Unknown backbone weights {weights!r}; use one of {', '.join(BACKBONE_WEIGHTS)}.")

    if weights == "none":
        ignored = [
            argument
            for argument, value in (("source", source), ("epochs", epochs), ("cache_dir", cache_dir))
            if value is not None
        ]
        if ignored:
            logger.info("Ignoring %s because backbone weights are 'none' (random init).", ", ".join(ignored))

        cnn = build_random_small_cnn(image_size, seed)
        logger.info("Built small_cnn with random weights (image size %d, seed %d).", image_size, seed)
        return Backbone(cnn=cnn, weights_key=random_small_cnn_cache_key(image_size, seed), cache_hit=False)

    missing = [
        argument
        for argument, value in (("source", source), ("epochs", epochs), ("cache_dir", cache_dir))
        if value is None
    ]
    if missing:
        raise ValueError(f"Backbone weights 'pretrained' need {', '.join(missing)}; pass them or use weights='none'.")

    cnn, cache_hit = pretrain_small_cnn(image_size, source, epochs=epochs, seed=seed, cache_dir=cache_dir)
    weights_key = small_cnn_cache_key(image_size, source, epochs, seed)
    return Backbone(cnn=cnn, weights_key=weights_key, cache_hit=cache_hit)


def build_feature_extractor(
    raw_shape: tuple[int, ...],
    value_range: tuple[float, float],
    image_size: int,
    cnn: keras.Model,
) -> keras.Model:
    """Build the frozen model from raw images to embeddings.

    Sets cnn.trainable = False and calls it with training=False, so its
    BatchNormalization layers always use their moving statistics and an
    image's embedding does not depend on the other images in its batch.

    Args:
        raw_shape: Shape of one raw image, as for build_preprocessing.
        value_range: (min, max) of the raw intensities.
        image_size: Side length the CNN expects, in pixels.
        cnn: Backbone from (batch, image_size, image_size, 3) to (batch, D).
            It is frozen in place.

    Returns:
        A model from (batch, *raw_shape) to float32 embeddings (batch, D).

    Raises:
        ValueError: If the CNN input does not match image_size.
    """
    expected_input = (image_size, image_size, 3)
    cnn_input = tuple(cnn.input_shape[1:])
    if cnn_input != expected_input:
        raise ValueError(
            f"The backbone expects input {cnn_input} but image_size={image_size} gives {expected_input}; "
            f"build the backbone with the same image_size."
        )

    preprocessing = build_preprocessing(raw_shape, value_range, image_size)
    cnn.trainable = False

    inputs = keras.Input(shape=preprocessing.input_shape[1:], dtype="float32", name="raw_image")
    images = preprocessing(inputs)
    embeddings = cnn(images, training=False)
    extractor = keras.Model(inputs, embeddings, name="feature_extractor")
    extractor.trainable = False
    return extractor
