"""Saved Keras models the tests write, used as backbones cut at a named or the default layer."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from models.backbone_specs import BackboneError, inspect_saved_model
from models.backbones import build_feature_extractor
from models.datasets import Dataset
from models.features import compute_embeddings
from models.saved_models import load_saved_model_backbone


@pytest.fixture(scope="module")
def classifier_file(source: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN classifier of 16x16 gray images, trained one epoch on digits 0-4 and saved."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1), name="pixels")
    features = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    features = layers.Conv2D(8, 3, padding="same", name="conv")(features)
    features = layers.BatchNormalization(name="bn")(features)
    features = layers.ReLU(name="relu")(features)
    features = layers.GlobalAveragePooling2D(name="gap")(features)
    features = layers.Dropout(0.3, name="dropout")(features)
    logits = layers.Dense(5, name="logits")(features)
    probabilities = layers.Activation("softmax", name="probabilities")(logits)
    model = keras.Model(inputs, probabilities, name="team_classifier")

    # The team's own input pipeline: 8x8 digits resized to 16x16, in 0..255.
    images = keras.ops.image.resize(source.x_train[..., None] * (255.0 / 16.0), (16, 16))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images, source.y_train, epochs=1, batch_size=64, verbose=0)

    path = tmp_path_factory.mktemp("saved") / "team_classifier.keras"
    model.save(path)
    return path


def _saved_model(path: Path) -> keras.Model:
    return keras.models.load_model(path, compile=False)


def _converted(images: np.ndarray, low: float, high: float, gray: bool) -> np.ndarray:
    """What the backbone feeds the saved model for [0, 1] RGB images."""
    scaled = low + (high - low) * images
    if gray:
        return (scaled @ np.array([0.2989, 0.5870, 0.1140], np.float32))[..., None]
    return scaled


def test_inspect_reads_layers_and_input(classifier_file: Path) -> None:
    info = inspect_saved_model(classifier_file)

    assert info.class_name == "Functional"
    assert info.layer_names == ("scale", "conv", "bn", "relu", "gap", "dropout", "logits", "probabilities")
    assert info.input_shape == (16, 16, 1)
    assert info.nested_layer_names == {}


def test_default_layer_is_before_classifier(classifier_file: Path, target: Dataset) -> None:
    backbone = load_saved_model_backbone(classifier_file)
    images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)

    model = _saved_model(classifier_file)
    expected = keras.Model(model.inputs[0], model.get_layer("gap").output)(_converted(images, 0.0, 255.0, gray=True))
    embeddings = np.asarray(backbone.cnn(images, training=False))

    # The Softmax activation, the Dense classifier and the Dropout are skipped.
    assert "cut at layer 'gap' (8 features) at 16x16 pixels" in backbone.description
    assert backbone.cnn.output_shape == (None, 8)
    np.testing.assert_allclose(embeddings, np.asarray(expected), rtol=1e-5, atol=1e-5)

    extractor = build_feature_extractor(target.raw_shape, target.value_range, 16, backbone.cnn)
    assert compute_embeddings(extractor, target.x_val[:5], batch_size=2).shape == (5, 8)


def test_named_layer_is_cut_and_pooled(classifier_file: Path) -> None:
    backbone = load_saved_model_backbone(classifier_file, layer="relu", input_range=(-1.0, 1.0))
    images = np.random.default_rng(1).uniform(size=(3, 16, 16, 3)).astype(np.float32)

    model = _saved_model(classifier_file)
    feature_maps = keras.Model(model.inputs[0], model.get_layer("relu").output)(_converted(images, -1.0, 1.0, gray=True))
    embeddings = np.asarray(backbone.cnn(images, training=False))

    assert backbone.cnn.output_shape == (None, 8)
    np.testing.assert_allclose(embeddings, np.asarray(feature_maps).mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert backbone.cnn.trainable_weights == []


def test_layer_and_range_change_weights_key(classifier_file: Path) -> None:
    keys = {
        "default layer": load_saved_model_backbone(classifier_file).weights_key,
        "named gap": load_saved_model_backbone(classifier_file, layer="gap").weights_key,
        "relu": load_saved_model_backbone(classifier_file, layer="relu").weights_key,
        "input range": load_saved_model_backbone(classifier_file, layer="relu", input_range=(0.0, 1.0)).weights_key,
    }

    # The default layer is gap, so naming it gives the same key.
    assert keys["default layer"] == keys["named gap"]
    assert len({keys["named gap"], keys["relu"], keys["input range"]}) == 3


def test_rgb_model_with_any_input_size(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None, None, 3)),
        layers.Identity(name="pixels"),
        layers.Conv2D(4, 3, name="conv"),
        layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, activation="softmax", name="classes"),
    ])
    path = tmp_path / "sequential.keras"
    model.save(path)
    images = np.random.default_rng(2).uniform(size=(2, 12, 12, 3)).astype(np.float32)

    identity = load_saved_model_backbone(path, layer="pixels", image_size=12, input_range=(10.0, 20.0))
    default = load_saved_model_backbone(path, image_size=12)

    # Pooling the untouched input shows the exact pixel conversion: low + (high - low) * x per channel.
    np.testing.assert_allclose(np.asarray(identity.cnn(images)), (10.0 + 10.0 * images).mean(axis=(1, 2)), rtol=1e-5)
    assert default.cnn.output_shape == (None, 4)
    with pytest.raises(BackboneError, match="accepts images of any size; set image_size"):
        load_saved_model_backbone(path)
    with pytest.raises(BackboneError, match="image_size=2 does not fit the saved model"):
        load_saved_model_backbone(path, layer="conv", image_size=2)


def test_nested_model_layer_named(tmp_path: Path) -> None:
    inner = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(2, 3, name="inner_conv"), layers.GlobalAveragePooling2D(name="inner_gap")], name="base")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layers.Dense(2, activation="softmax", name="classes")(inner(inputs)))
    path = tmp_path / "nested.keras"
    model.save(path)

    backbone = load_saved_model_backbone(path)
    with pytest.raises(BackboneError, match="Layer 'inner_conv' is inside the nested model 'base'"):
        load_saved_model_backbone(path, layer="inner_conv")

    assert backbone.cnn.output_shape == (None, 2)
    assert "cut at layer 'base'" in backbone.description


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"layer": "rleu"}, r"Layer 'rleu' not found in '.*team_classifier.keras' \(did you mean 'relu'\?\); its last layers are: scale, conv, bn, relu, gap, dropout, logits, probabilities \(8 layers in all\)"),
        ({"layer": "pixels"}, "Layer 'pixels' not found"),
        ({"image_size": 32}, "takes 16x16 images but image_size=32; set image_size to 16 or leave it out"),
        ({"input_range": (1.0, 1.0)}, r"input_range=\(1.0, 1.0\) is invalid"),
    ],
)
def test_invalid_arguments_rejected(arguments: dict, message: str, classifier_file: Path) -> None:
    with pytest.raises(BackboneError, match=message):
        load_saved_model_backbone(classifier_file, **arguments)


def test_invalid_files_rejected(classifier_file: Path, tmp_path: Path) -> None:
    weights_only = tmp_path / "weights_only.weights.h5"
    _saved_model(classifier_file).save_weights(weights_only)
    not_a_model = tmp_path / "broken.keras"
    not_a_model.write_bytes(b"not a zip archive")

    with pytest.raises(BackboneError, match=r"saved model '.*missing.keras' not found"):
        load_saved_model_backbone(tmp_path / "missing.keras")
    with pytest.raises(BackboneError, match="is a weights-only file; use it as weights: with a backbone name"):
        load_saved_model_backbone(weights_only)
    with pytest.raises(BackboneError, match="is not a Keras model archive"):
        load_saved_model_backbone(not_a_model)
    with pytest.raises(BackboneError, match="must be a .keras or .h5 file"):
        load_saved_model_backbone(tmp_path / "model.onnx")


def test_model_without_image_input_rejected(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((64,)), layers.Dense(8, name="hidden"), layers.Dense(2, name="classes")])
    path = tmp_path / "vectors.keras"
    model.save(path)

    with pytest.raises(BackboneError, match=r"takes inputs of shape \(64,\); a backbone takes images"):
        load_saved_model_backbone(path, image_size=8)
