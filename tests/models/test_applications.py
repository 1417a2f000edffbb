"""Keras Applications from the registry, built with random or file weights (never downloaded here)."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from models.applications import build_application_backbone, input_conversion_for
from models.backbone_common import build_input_conversion
from models.backbone_specs import APPLICATIONS, BackboneError
from models.backbones import build_feature_extractor, load_backbone
from models.datasets import Dataset
from models.features import compute_embeddings

# Three images with a batch size of two: one full batch and one padded batch.
IMAGES = 3
BATCH_SIZE = 2


def _save_legacy_h5(network: keras.Model, path: Path) -> None:
    # The HDF5 layout of Keras 2, which Keras' downloadable ImageNet files
    # ("..._notop.h5") use; Keras 3 writes it only through this legacy module.
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, network)


def _network(name: str, image_size: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return getattr(keras.applications, name)(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg",
    )


def _network_at_size(network: keras.Model, image_size: int) -> keras.Model:
    """The same network and weights, rebuilt for another input size."""
    resized = _network("MobileNetV3Small", image_size, seed=0)
    resized.set_weights(network.get_weights())
    return resized


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_registry_backbone_embeds_at_minimum_size(name: str, target: Dataset) -> None:
    spec = APPLICATIONS[name]

    backbone = load_backbone(name, weights="none", image_size=spec.min_image_size, seed=0)
    extractor = build_feature_extractor(target.raw_shape, target.value_range, spec.min_image_size, backbone.cnn)
    embeddings = compute_embeddings(extractor, target.x_val[:IMAGES], batch_size=BATCH_SIZE)

    assert backbone.cnn.input_shape == (None, spec.min_image_size, spec.min_image_size, 3)
    assert embeddings.shape == (IMAGES, spec.embedding_size)
    assert embeddings.dtype == np.float32
    assert np.all(np.isfinite(embeddings))
    assert backbone.cnn.trainable_weights == []
    assert backbone.cache_hit is False
    assert backbone.description == f"{name} with random weights (seed 0) at 32x32 pixels"
    assert len(backbone.weights_key) == 64


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_input_conversion_matches_preprocess_input(name: str) -> None:
    spec = APPLICATIONS[name]
    preprocess_input = getattr(keras.applications, spec.module).preprocess_input
    images = np.random.default_rng(1).uniform(0.0, 1.0, size=(2, 5, 5, 3)).astype(np.float32)

    conversion = build_input_conversion(*input_conversion_for(spec), name="conversion")
    converted = np.asarray(conversion(images))
    expected = np.asarray(preprocess_input(images * 255.0))

    np.testing.assert_allclose(converted, expected, rtol=1e-5, atol=1e-3)
    assert conversion.trainable is False


@pytest.mark.parametrize("image_size", [31, 8, 1])
def test_registry_backbone_rejects_small_image(image_size: int) -> None:
    with pytest.raises(BackboneError, match=rf"image_size={image_size} is below ResNet50's minimum of 32 pixels"):
        load_backbone("ResNet50", weights="none", image_size=image_size, seed=0)


def test_random_weights_follow_seed() -> None:
    first = build_application_backbone("MobileNetV3Small", weights="none", image_size=32, seed=3)
    second = build_application_backbone("MobileNetV3Small", weights="none", image_size=32, seed=3)
    other = build_application_backbone("MobileNetV3Small", weights="none", image_size=32, seed=4)

    assert first.weights_key == second.weights_key
    assert first.weights_key != other.weights_key
    for a, b in zip(first.cnn.get_weights(), second.cnn.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("file_name", ["saved.weights.h5", "keras2_notop.h5"])
def test_weights_loaded_from_local_file(file_name: str, tmp_path: Path) -> None:
    network = _network("MobileNetV3Small", 32, seed=7)
    path = tmp_path / file_name
    if file_name.endswith(".weights.h5"):
        network.save_weights(path)
    else:
        _save_legacy_h5(network, path)

    # The weights fit any input size, so the backbone may use another one.
    backbone = load_backbone("MobileNetV3Small", weights=str(path), image_size=40, seed=0)
    random = load_backbone("MobileNetV3Small", weights="none", image_size=40, seed=7)

    loaded_network = backbone.cnn.layers[-1]
    assert len(loaded_network.weights) == len(network.weights)
    for loaded, saved in zip(loaded_network.get_weights(), network.get_weights()):
        np.testing.assert_array_equal(loaded, saved)
    assert backbone.weights_key != random.weights_key
    assert backbone.description == f"MobileNetV3Small with weights from {path} at 40x40 pixels"

    # The backbone runs the file's network on preprocess_input(255 * image).
    images = np.random.default_rng(2).uniform(0.0, 1.0, size=(2, 40, 40, 3)).astype(np.float32)
    expected = _network_at_size(network, 40)(keras.applications.mobilenet_v3.preprocess_input(images * 255.0), training=False)
    np.testing.assert_allclose(np.asarray(backbone.cnn(images, training=False)), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_weights_file_of_other_network_rejected(tmp_path: Path) -> None:
    path = tmp_path / "small.weights.h5"
    _network("MobileNetV3Small", 32, seed=0).save_weights(path)

    with pytest.raises(BackboneError) as raised:
        load_backbone("MobileNetV3Large", weights=str(path), image_size=32, seed=0)

    message = str(raised.value)
    assert f"Weights file '{path}' does not fit MobileNetV3Large without its classifier" in message
    assert "keras.applications.MobileNetV3Large(include_top=False)" in message


def test_legacy_file_with_classifier_rejected(tmp_path: Path) -> None:
    path = tmp_path / "with_top.h5"
    keras.utils.set_random_seed(0)
    _save_legacy_h5(keras.applications.MobileNetV3Small(include_top=True, weights=None, input_shape=(32, 32, 3)), path)

    with pytest.raises(BackboneError, match="does not fit MobileNetV3Small without its classifier: Layer count mismatch"):
        load_backbone("MobileNetV3Small", weights=str(path), image_size=32, seed=0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("missing.weights.h5", r"Weights file '.*missing.weights.h5' for MobileNetV2 not found"),
        ("garbage.h5", r"Weights file '.*garbage.h5' does not fit MobileNetV2"),
        ("imagenett", r"Unknown weights 'imagenett' for MobileNetV2; use 'imagenet', 'none' or the path"),
    ],
)
def test_invalid_weights_rejected(weights: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "garbage.h5").write_bytes(b"not an HDF5 file")
    weights = str(tmp_path / weights) if weights.endswith(".h5") else weights

    with pytest.raises(BackboneError, match=message):
        load_backbone("MobileNetV2", weights=weights, image_size=32, seed=0)


def test_unknown_application_suggests_name() -> None:
    with pytest.raises(BackboneError, match=r"Unknown backbone 'efficientnet_b0' \(did you mean 'EfficientNetB0'\?\)"):
        build_application_backbone("efficientnet_b0", weights="none", image_size=32, seed=0)
