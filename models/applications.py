"""Keras Applications as frozen feature extractors, with ImageNet, random or file weights.

Each network is built without its classifier (include_top=False) and with
global average pooling, behind a frozen layer that turns [0, 1] RGB images into
the input its own preprocess_input produces.

Example:
    >>> backbone = build_application_backbone("MobileNetV2", weights="none", image_size=32, seed=0)
    >>> backbone.cnn.output_shape
    (None, 1280)
"""

from __future__ import annotations

import logging
import warnings
from numbers import Integral
from pathlib import Path

import keras
import numpy as np

from models.backbone_common import Backbone, build_input_conversion, file_digest, weights_digest
from models.backbone_specs import (
    APPLICATIONS,
    IMAGENET,
    NO_WEIGHTS,
    WEIGHTS_FILE_SUFFIXES,
    ApplicationSpec,
    BackboneError,
    closest_name,
)
from models.cache_keys import hash_description

logger = logging.getLogger(__name__)

# Bump when the way an application is wrapped changes its embeddings in a way
# that the weights key does not already capture.
APPLICATION_WRAPPER_VERSION = "1"

# preprocess_input works on pixel values in 0..255.
_PIXEL_MAX = 255.0

# Random pixels on which the affine fit of preprocess_input is checked, and the
# largest deviation accepted, in the units of its output.
_AFFINE_CHECK_PIXELS = 64
_AFFINE_TOLERANCE = 1e-3


def input_conversion_for(spec: ApplicationSpec) -> tuple[np.ndarray, np.ndarray]:
    """Express the application's preprocess_input as an affine map on [0, 1] RGB pixels.

    Every preprocess_input of the registry is affine per pixel: scaling to
    [-1, 1] ("tf" mode), ImageNet mean and standard deviation ("torch" mode),
    RGB to BGR with mean subtraction ("caffe" mode), or the identity for
    networks that normalize inside the model. So the map is read off by
    probing it with black and the three pure primaries, then checked on random pixels.

    Args:
        spec: The application.

    Returns:
        (kernel, bias): float32 (3, 3) and (3,), with
        preprocess_input(255 * x) == x @ kernel + bias for x in [0, 1].

    Raises:
        RuntimeError: If preprocess_input is not affine, which would need a
            different conversion layer.
    """
    preprocess_input = getattr(keras.applications, spec.module).preprocess_input

    probe = np.zeros((1, 1, 4, 3), dtype=np.float32)
    for channel in range(3):
        probe[0, 0, channel + 1, channel] = _PIXEL_MAX
    # Some modes scale the array in place, so each call gets its own copy.
    response = np.asarray(preprocess_input(probe.copy()), dtype=np.float64)[0, 0]
    bias = response[0]
    kernel = response[1:] - bias

    pixels = np.random.default_rng(0).uniform(0.0, 1.0, size=(1, 1, _AFFINE_CHECK_PIXELS, 3)).astype(np.float32)
    expected = np.asarray(preprocess_input(pixels * _PIXEL_MAX), dtype=np.float64)[0, 0]
    deviation = np.abs(pixels[0, 0].astype(np.float64) @ kernel + bias - expected).max()
    if deviation > _AFFINE_TOLERANCE:
        raise RuntimeError(
            f"keras.applications.{spec.module}.preprocess_input is not affine per pixel "
            f"(deviation {deviation:.3g}); {spec.name} needs its own input conversion layer."
        )
    return kernel.astype(np.float32), bias.astype(np.float32)


def build_application_backbone(name: str, *, weights: str, image_size: int, seed: int) -> Backbone:
    """Build a Keras Application from the registry as a frozen backbone.

    Args:
        name: A key of models.backbone_specs.APPLICATIONS, for example "MobileNetV2".
        weights: "imagenet" (Keras downloads the file once and caches it in
            ~/.keras/models), "none" (random weights from seed), or the path of
            a .h5, .hdf5 or .weights.h5 file. The file must come from the same
            network without its classifier. Keras' own "..._notop.h5" ImageNet
            file, copied to a machine without internet, is one such file.
        image_size: Input side length in pixels, at least the application's minimum.
        seed: Keras global seed for "none"; ignored otherwise.

    Returns:
        The Backbone. Its cnn maps (batch, image_size, image_size, 3) images in
        [0, 1] to (batch, spec.embedding_size) embeddings.

    Raises:
        BackboneError: If the name, image size or weights are invalid, the
            weights file is missing or does not fit the network, or the
            ImageNet weights cannot be downloaded.
    """
    spec = _application_spec(name)
    _check_image_size(spec, image_size)
    weights_description = _weights_description(spec, weights, seed)

    if weights == NO_WEIGHTS:
        keras.utils.set_random_seed(seed)
    constructor = getattr(keras.applications, spec.name)
    arguments = {"include_top": False, "input_shape": (image_size, image_size, 3), "pooling": "avg"}

    if weights == IMAGENET:
        network = _build_with_imagenet_weights(spec, constructor, arguments)
        if image_size < spec.default_image_size:
            logger.info(
                "%s's ImageNet weights were trained on %dx%d images; at %dx%d its embeddings are usually less informative.",
                spec.name, spec.default_image_size, spec.default_image_size, image_size, image_size,
            )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = constructor(weights=None, **arguments)
        if weights != NO_WEIGHTS:
            _load_weights_file(spec, network, Path(weights))

    kernel, bias = input_conversion_for(spec)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    converted = build_input_conversion(kernel, bias, name="input_conversion")(inputs)
    embeddings = network(converted)
    cnn = keras.Model(inputs, embeddings, name=f"{spec.name.lower()}_backbone")
    cnn.trainable = False

    description = {
        "kind": "keras_application",
        "name": spec.name,
        "wrapper_version": APPLICATION_WRAPPER_VERSION,
        "keras_version": keras.__version__,
        "image_size": int(image_size),
        "input_conversion": {"kernel": kernel.tolist(), "bias": bias.tolist()},
        "weights": weights_description,
        "weights_digest": weights_digest(network),
    }
    summary = _describe(spec, weights, seed, image_size)
    logger.info("Built %s.", summary)
    return Backbone(cnn=cnn, weights_key=hash_description(description), cache_hit=False, description=summary)


def _application_spec(name: str) -> ApplicationSpec:
    if name in APPLICATIONS:
        return APPLICATIONS[name]

    suggestion = closest_name(name, tuple(APPLICATIONS))
    hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
    raise BackboneError(f"Unknown backbone {name!r}{hint}; use one of {', '.join(APPLICATIONS)}.")


def _check_image_size(spec: ApplicationSpec, image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, Integral):
        raise BackboneError(f"image_size={image_size!r} is invalid; expected an integer number of pixels.")
    if image_size < spec.min_image_size:
        raise BackboneError(
            f"image_size={image_size} is below {spec.name}'s minimum of {spec.min_image_size} pixels; "
            f"use an image_size of at least {spec.min_image_size} (its ImageNet weights were trained at "
            f"{spec.default_image_size})."
        )


def _weights_description(spec: ApplicationSpec, weights: str, seed: int) -> dict:
    if weights == IMAGENET:
        return {"source": IMAGENET}
    if weights == NO_WEIGHTS:
        return {"source": NO_WEIGHTS, "seed": int(seed)}

    path = Path(str(weights))
    if not path.name.endswith(WEIGHTS_FILE_SUFFIXES):
        raise BackboneError(
            f"Unknown weights {weights!r} for {spec.name}; use {IMAGENET!r}, {NO_WEIGHTS!r} or the path of a "
            f".h5 or .weights.h5 file."
        )
    if not path.is_file():
        raise BackboneError(
            f"Weights file {str(path)!r} for {spec.name} not found; check the path, or use {IMAGENET!r} "
            f"on a machine with internet access."
        )
    return {"source": "file", "sha256": file_digest(path)}


def _build_with_imagenet_weights(spec: ApplicationSpec, constructor, arguments: dict) -> keras.Model:
    try:
        with warnings.catch_warnings():
            # MobileNetV2 warns for sizes other than its five trained sizes, and
            # loads the 224x224 weights, which fit every size.
            warnings.simplefilter("ignore")
            return constructor(weights=IMAGENET, **arguments)
    # Keras' file download raises a bare Exception when the URL cannot be fetched.
    except Exception as error:  # noqa: BLE001
        raise BackboneError(
            f"Could not get the ImageNet weights of {spec.name}: {error}. Without internet access, copy the "
            f"'..._notop.h5' file from ~/.keras/models on a machine that has it and set weights to its path."
        ) from error


def _load_weights_file(spec: ApplicationSpec, network: keras.Model, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            # A mismatched file makes Keras warn once per layer before it raises.
            warnings.simplefilter("ignore")
            network.load_weights(path)
    except (ValueError, OSError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackboneError(
            f"Weights file {str(path)!r} does not fit {spec.name} without its classifier: {first_line}. "
            f"Use a file saved from keras.applications.{spec.name}(include_top=False), for example with "
            f"save_weights('name.weights.h5'), or Keras' '..._notop.h5' ImageNet file."
        ) from error
    logger.info("Loaded %s weights from %s.", spec.name, path)


def _describe(spec: ApplicationSpec, weights: str, seed: int, image_size: int) -> str:
    if weights == IMAGENET:
        source = "ImageNet weights"
    elif weights == NO_WEIGHTS:
        source = f"random weights (seed {seed})"
    else:
        source = f"weights from {weights}"
    return f"{spec.name} with {source} at {image_size}x{image_size} pixels"
