"""Backbones by name, and the frozen feature extractor from raw images to embeddings.

A backbone maps a preprocessed image to an embedding vector. Its weights stay
frozen while heads are tuned, so the embeddings can be computed once and cached
(see models.features). Three kinds exist:

- small_cnn: a small CNN the project pretrains on a source dataset (models.small_cnn);
- Keras Applications from the registry (models.applications), with ImageNet,
  random or file weights;
- any saved Keras model, cut at a layer (models.saved_models).

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
    >>> load_backbone("MobileNetV2", weights="none", image_size=32, seed=0).cnn.output_shape
    (None, 1280)
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from models.applications import build_application_backbone
from models.backbone_common import Backbone
from models.backbone_specs import (
    APPLICATIONS,
    BACKBONE_NAMES,
    FLOAT32,
    MIXED_FLOAT16,
    SMALL_CNN_WEIGHTS,
    BackboneError,
    closest_name,
)
from models.cache_keys import PREPROCESSING_VERSION, pretrained_small_cnn_description, random_small_cnn_description
from models.datasets import Dataset
from models.preprocessing import build_preprocessing
from models.saved_models import load_saved_model_backbone
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
    "APPLICATIONS",
    "BACKBONES",
    "BACKBONE_WEIGHTS",
    "MIN_IMAGE_SIZE",
    "PREPROCESSING_VERSION",
    "Backbone",
    "BackboneError",
    "build_feature_extractor",
    "build_preprocessing",
    "half_precision_copy",
    "build_random_small_cnn",
    "build_small_cnn",
    "load_backbone",
    "load_saved_model_backbone",
    "pretrain_small_cnn",
    "random_small_cnn_cache_key",
    "small_cnn_cache_key",
]

BACKBONES = BACKBONE_NAMES

# small_cnn weights. "pretrained": trained on a source dataset and cached;
# "none": seeded random init. Keras Applications take "imagenet", "none" or a file.
BACKBONE_WEIGHTS = SMALL_CNN_WEIGHTS


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
    """Build a backbone by name: small_cnn or a Keras Application from the registry.

    Args:
        name: One of BACKBONES.
        weights: For small_cnn, "pretrained" runs pretrain_small_cnn and needs
            source, epochs and cache_dir, and "none" sets Keras' global seed and
            builds random weights. For a Keras Application, "imagenet", "none"
            or the path of a .h5 or .weights.h5 file (see
            models.applications.build_application_backbone). Arguments a choice
            does not use (source, epochs, cache_dir) are ignored with a log line.
        image_size: Input side length in pixels, at least the backbone's minimum
            (MIN_IMAGE_SIZE for small_cnn, APPLICATIONS[name].min_image_size otherwise).
        seed: Keras global seed for pretraining or for the random init.
        source: Dataset to pretrain small_cnn on.
        epochs: Pretraining epochs.
        cache_dir: Root of the weights cache.

    Returns:
        The Backbone.

    Raises:
        BackboneError: A ValueError, if name or weights is unknown, the image
            size is too small, a weights file is missing or does not fit, or
            pretraining arguments are missing.
    """
    if name not in BACKBONES:
        suggestion = closest_name(name, BACKBONES)
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        raise BackboneError(f"Unknown backbone {name!r}{hint}; use one of {', '.join(BACKBONES)}.")

    unused = (("source", source), ("epochs", epochs), ("cache_dir", cache_dir))
    if name in APPLICATIONS:
        ignored = [argument for argument, value in unused if value is not None]
        if ignored:
            logger.info("Ignoring %s because %s is not pretrained by this project.", ", ".join(ignored), name)
        return build_application_backbone(name, weights=weights, image_size=image_size, seed=seed)

    if weights not in BACKBONE_WEIGHTS:
        raise BackboneError(
            f"Unknown backbone weights {weights!r} for small_cnn; use one of {', '.join(BACKBONE_WEIGHTS)}."
        )

    if weights == "none":
        ignored = [argument for argument, value in unused if value is not None]
        if ignored:
            logger.info("Ignoring %s because backbone weights are 'none' (random init).", ", ".join(ignored))

        cnn = build_random_small_cnn(image_size, seed)
        logger.info("Built small_cnn with random weights (image size %d, seed %d).", image_size, seed)
        return Backbone(
            cnn=cnn,
            weights_key=random_small_cnn_cache_key(image_size, seed),
            cache_hit=False,
            description=random_small_cnn_description(seed),
        )

    missing = [
        argument
        for argument, value in (("source", source), ("epochs", epochs), ("cache_dir", cache_dir))
        if value is None
    ]
    if missing:
        raise BackboneError(f"Backbone weights 'pretrained' need {', '.join(missing)}; pass them or use weights='none'.")

    cnn, cache_hit = pretrain_small_cnn(image_size, source, epochs=epochs, seed=seed, cache_dir=cache_dir)
    weights_key = small_cnn_cache_key(image_size, source, epochs, seed)
    description = pretrained_small_cnn_description(epochs, source.num_classes, from_cache=cache_hit)
    return Backbone(cnn=cnn, weights_key=weights_key, cache_hit=cache_hit, description=description)


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
        A model from (batch, *raw_shape) to embeddings (batch, D): float32, or
        float16 when `cnn` is a copy from `half_precision_copy`.

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


def half_precision_copy(cnn: keras.Model) -> keras.Model:
    """Return a copy of `cnn` that computes in float16 and keeps its weights in float32.

    Every layer that computes in float32 gets Keras' mixed_float16 policy, and
    the copy receives the original's weights. Input layers keep their dtype, so
    the copy takes the same float32 images. Its outputs are float16.

    NOTE: a model's config does not tell a layer pinned to float32 from one
    that got float32 by default, so pinned layers compute in float16 too.
    Callers compare a few embeddings with the original's before using the copy.

    Args:
        cnn: A functional or sequential model of Keras' own layers.

    Returns:
        A new model with the same architecture and weights.

    Raises:
        BackboneError: If the model cannot be rebuilt from its config, for
            example a subclassed model or one with custom layers.
    """
    try:
        copy = type(cnn).from_config(_with_policy(cnn.get_config(), MIXED_FLOAT16))
        copy.set_weights(cnn.get_weights())
    except (NotImplementedError, TypeError, ValueError, KeyError) as error:
        raise BackboneError(
            f"The backbone {cnn.name!r} cannot be rebuilt to compute in {MIXED_FLOAT16} "
            f"({type(error).__name__}: {error})."
        ) from None
    return copy


def _with_policy(config: object, policy: str) -> object:
    """Return a copy of a model config in which every float32 dtype policy is `policy`."""
    if isinstance(config, list):
        return [_with_policy(item, policy) for item in config]
    if not isinstance(config, dict):
        return config
    rewritten = {}
    for name, value in config.items():
        if name == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
            if value.get("config", {}).get("name") == FLOAT32:
                value = {**value, "config": {**value["config"], "name": policy}}
            rewritten[name] = value
        else:
            rewritten[name] = _with_policy(value, policy)
    return rewritten
