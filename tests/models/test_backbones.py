from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from models.backbones import (
    BACKBONES,
    build_feature_extractor,
    build_preprocessing,
    build_small_cnn,
    half_precision_copy,
    load_backbone,
    pretrain_small_cnn,
    random_small_cnn_cache_key,
    small_cnn_cache_key,
)
from models.datasets import Dataset, load_dataset
from models.backbone_specs import BackboneError
from models.features import compute_embeddings


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("raw_shape", "value_range", "image_size"),
    [
        ((8, 8), (0.0, 16.0), 16),
        ((8, 8, 1), (0.0, 16.0), 8),
        ((10, 12), (0.0, 255.0), 24),
        ((6, 6, 3), (-1.0, 1.0), 12),
    ],
)
def test_preprocessing_output_shape_and_range(
    raw_shape: tuple[int, ...], value_range: tuple[float, float], image_size: int
) -> None:
    low, high = value_range
    rng = np.random.default_rng(0)
    images = rng.uniform(low, high, size=(5, *raw_shape)).astype(np.float32)
    images[0] = low
    images[1] = high

    output = np.asarray(build_preprocessing(raw_shape, value_range, image_size)(images))

    assert output.shape == (5, image_size, image_size, 3)
    assert output.dtype == np.float32
    assert output.min() >= -1e-6
    assert output.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(output[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(output[1], 1.0, atol=1e-6)


def test_preprocessing_gray_to_three_equal_channels() -> None:
    images = np.random.default_rng(1).uniform(0, 16, size=(3, 8, 8)).astype(np.float32)

    output = np.asarray(build_preprocessing((8, 8), (0.0, 16.0), 16)(images))

    np.testing.assert_array_equal(output[..., 0], output[..., 1])
    np.testing.assert_array_equal(output[..., 0], output[..., 2])


def test_preprocessing_rescales_linearly_at_native_size() -> None:
    images = np.array([[[0.0, 4.0], [8.0, 16.0]]], dtype=np.float32)
    images = np.tile(images, (1, 4, 4))

    output = np.asarray(build_preprocessing((8, 8), (0.0, 16.0), 8)(images))

    np.testing.assert_allclose(output[0, :2, :2, 0], [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("raw_shape", "value_range", "image_size", "message"),
    [
        ((8, 8, 2), (0.0, 16.0), 16, r"raw_shape=\(8, 8, 2\) is not supported"),
        ((64,), (0.0, 16.0), 16, r"raw_shape=\(64,\) is not supported"),
        ((8, 8), (16.0, 16.0), 16, r"value_range=\(16.0, 16.0\) is invalid"),
        ((8, 8), (0.0, 16.0), 0, "image_size=0 is invalid; expected an integer of at least 1"),
        ((8, 8), (0.0, 16.0), 16.0, "image_size=16.0 is invalid"),
    ],
)
def test_preprocessing_rejects_invalid_arguments(
    raw_shape: tuple[int, ...], value_range: tuple[float, float], image_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_preprocessing(raw_shape, value_range, image_size)


@pytest.mark.parametrize("image_size", [4, 7, 16.0, True])
def test_small_cnn_rejects_small_image_size(image_size: int) -> None:
    with pytest.raises(ValueError, match=f"image_size={image_size!r} is invalid; expected an integer of at least 8"):
        build_small_cnn(image_size)


@pytest.mark.parametrize("image_size", [8, 16, 33])
def test_small_cnn_embedding_shape(image_size: int) -> None:
    cnn = build_small_cnn(image_size)
    images = np.random.default_rng(0).uniform(size=(2, image_size, image_size, 3)).astype(np.float32)

    embeddings = np.asarray(cnn(images, training=False))

    assert "small_cnn" in BACKBONES
    assert embeddings.shape == (2, 128)
    assert embeddings.dtype == np.float32
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in cnn.layers)


def test_small_cnn_cache_key_changes_with_each_input(source: Dataset) -> None:
    other_source = load_dataset("digits", classes=[0, 1, 2, 3, 4], seed=1)
    base = small_cnn_cache_key(16, source, 3, 0)

    variants = {
        "image_size": small_cnn_cache_key(32, source, 3, 0),
        "source": small_cnn_cache_key(16, other_source, 3, 0),
        "epochs": small_cnn_cache_key(16, source, 4, 0),
        "seed": small_cnn_cache_key(16, source, 3, 1),
        "random weights": random_small_cnn_cache_key(16, 0),
    }

    assert small_cnn_cache_key(16, source, 3, 0) == base
    for name, key in variants.items():
        assert key != base, name
    assert len(set(variants.values())) == len(variants)


def test_pretrain_first_call_trains_and_stores(pretrained) -> None:
    backbones_dir = pretrained.cache_dir / "backbones"

    assert pretrained.cache_hit is False
    assert pretrained.weights_path.is_file()
    # Only the final file remains: the temporary file was renamed onto it.
    assert sorted(path.name for path in backbones_dir.iterdir()) == [pretrained.weights_path.name]


def test_pretrain_second_call_reuses_cache(pretrained, source: Dataset) -> None:
    stat_before = pretrained.weights_path.stat()
    digest_before = _sha256(pretrained.weights_path)

    cnn, cache_hit = pretrain_small_cnn(
        pretrained.image_size,
        source,
        epochs=pretrained.epochs,
        seed=pretrained.seed,
        cache_dir=pretrained.cache_dir,
    )

    assert cache_hit is True
    assert pretrained.weights_path.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert _sha256(pretrained.weights_path) == digest_before
    reused_weights = cnn.get_weights()
    trained_weights = pretrained.cnn.get_weights()
    assert len(reused_weights) == len(trained_weights)
    for reused, trained in zip(reused_weights, trained_weights):
        np.testing.assert_array_equal(reused, trained)


def test_pretrain_recomputes_batch_norm_statistics(pretrained, source: Dataset) -> None:
    # In inference mode the pretrained CNN must classify the source task well,
    # which only holds when the moving statistics match the final weights.
    preprocessing = build_preprocessing(source.raw_shape, source.value_range, pretrained.image_size)
    cnn = build_small_cnn(pretrained.image_size)
    cnn.set_weights(pretrained.cnn.get_weights())
    for layer in cnn.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            moving_mean = np.asarray(layer.moving_mean)
            assert np.any(np.abs(moving_mean) > 1e-3), layer.name

    train_embeddings = np.asarray(cnn(preprocessing(source.x_train), training=False))
    batch_statistics_embeddings = np.asarray(cnn(preprocessing(source.x_train), training=True))

    np.testing.assert_allclose(train_embeddings, batch_statistics_embeddings, atol=1e-3, rtol=1e-3)


def test_pretrain_corrupt_cache_file_raises(source: Dataset, tmp_path: Path) -> None:
    key = small_cnn_cache_key(16, source, 1, 5)
    weights_path = tmp_path / "backbones" / f"small_cnn-{key}.weights.h5"
    weights_path.parent.mkdir()
    weights_path.write_bytes(b"not an HDF5 file")

    with pytest.raises(ValueError, match="Delete the file to pretrain again"):
        pretrain_small_cnn(16, source, epochs=1, seed=5, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epochs": 0, "seed": 0}, "epochs=0 is invalid"),
        ({"epochs": 2.5, "seed": 0}, "epochs=2.5 is invalid"),
        ({"epochs": 1, "seed": -3}, "seed=-3 is invalid"),
    ],
)
def test_pretrain_rejects_invalid_arguments(
    arguments: dict, message: str, source: Dataset, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        pretrain_small_cnn(16, source, cache_dir=tmp_path, **arguments)

    assert not (tmp_path / "backbones").exists()


def test_load_backbone_random_weights_follow_seed() -> None:
    first = load_backbone("small_cnn", weights="none", image_size=8, seed=3)
    second = load_backbone("small_cnn", weights="none", image_size=8, seed=3)
    other = load_backbone("small_cnn", weights="none", image_size=8, seed=4)

    assert first.cache_hit is False
    assert first.weights_key == second.weights_key
    assert first.weights_key != other.weights_key
    for a, b in zip(first.cnn.get_weights(), second.cnn.get_weights()):
        np.testing.assert_array_equal(a, b)
    conv_kernels = [(a, b) for a, b in zip(first.cnn.get_weights(), other.cnn.get_weights()) if a.ndim == 4]
    assert not np.array_equal(conv_kernels[0][0], conv_kernels[0][1])


def test_load_backbone_random_logs_ignored_arguments(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="models.backbones"):
        backbone = load_backbone("small_cnn", weights="none", image_size=8, seed=0, epochs=3, cache_dir=tmp_path)

    assert backbone.cache_hit is False
    assert "Ignoring epochs, cache_dir because backbone weights are 'none'" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_load_backbone_pretrained_uses_cache(pretrained, source: Dataset) -> None:
    backbone = load_backbone(
        "small_cnn",
        weights="pretrained",
        image_size=pretrained.image_size,
        seed=pretrained.seed,
        source=source,
        epochs=pretrained.epochs,
        cache_dir=pretrained.cache_dir,
    )

    assert backbone.cache_hit is True
    assert backbone.weights_key == small_cnn_cache_key(pretrained.image_size, source, pretrained.epochs, pretrained.seed)


@pytest.mark.parametrize(
    ("name", "weights", "extra", "message"),
    [
        ("resnet50", "none", {}, r"Unknown backbone 'resnet50' \(did you mean 'ResNet50'\?\); use one of small_cnn, "),
        ("small_cnn", "imagenet", {}, "Unknown backbone weights 'imagenet' for small_cnn; use one of pretrained, none"),
        ("small_cnn", "pretrained", {"epochs": 1}, "need source, cache_dir"),
    ],
)
def test_load_backbone_rejects_invalid_arguments(name: str, weights: str, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_backbone(name, weights=weights, image_size=8, seed=0, **extra)


def test_extractor_batch_norm_in_inference_mode(extractor: keras.Model, target: Dataset) -> None:
    images = target.x_val[:64]
    weights_before = extractor.get_weights()

    full_batch = compute_embeddings(extractor, images, batch_size=64)
    small_batches = compute_embeddings(extractor, images, batch_size=5)
    alone = compute_embeddings(extractor, images[:1], batch_size=1)
    # An image next to very different images: blank ones and saturated ones.
    mixed_batch = np.concatenate([images[:1], np.zeros((8, 8, 8), np.float32), np.full((8, 8, 8), 16.0, np.float32)])
    mixed = compute_embeddings(extractor, mixed_batch, batch_size=len(mixed_batch))

    np.testing.assert_allclose(small_batches, full_batch, atol=1e-5)
    np.testing.assert_allclose(alone[0], full_batch[0], atol=1e-5)
    np.testing.assert_allclose(mixed[0], full_batch[0], atol=1e-5)
    assert extractor.trainable_weights == []
    for before, after in zip(weights_before, extractor.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_extractor_embeds_raw_images(extractor: keras.Model, target: Dataset) -> None:
    embeddings = compute_embeddings(extractor, target.x_val[:10])

    assert extractor.input_shape == (None, 8, 8)
    assert embeddings.shape == (10, 128)
    assert embeddings.dtype == np.float32
    assert np.all(np.isfinite(embeddings))
    # Different digits must not collapse onto one embedding.
    assert np.std(embeddings, axis=0).max() > 0.0


def test_extractor_rejects_mismatched_image_size(pretrained) -> None:
    wrong_size = pretrained.image_size * 2

    with pytest.raises(ValueError, match=rf"but image_size={wrong_size} gives"):
        build_feature_extractor((8, 8), (0.0, 16.0), wrong_size, pretrained.cnn)


def test_half_precision_copy_same_weights(pretrained, target: Dataset, trained_head) -> None:
    half = half_precision_copy(pretrained.cnn)
    extractor = build_feature_extractor(target.raw_shape, target.value_range, pretrained.image_size, pretrained.cnn)
    half_extractor = build_feature_extractor(target.raw_shape, target.value_range, pretrained.image_size, half)

    full = compute_embeddings(extractor, target.x_val)
    halved = compute_embeddings(half_extractor, target.x_val)

    computing = [layer for layer in half.layers if layer.weights]
    assert computing and all(layer.compute_dtype == "float16" for layer in computing)
    assert all(variable.dtype == "float32" for variable in half.weights)
    for original, copied in zip(pretrained.cnn.get_weights(), half.get_weights()):
        np.testing.assert_array_equal(original, copied)
    assert half.output.dtype == "float16"
    assert halved.dtype == np.float32
    # float16 keeps about three significant digits.
    scale = np.abs(full).max()
    assert 0 < np.abs(halved - full).max() < 1e-2 * scale
    # A head trained on float32 embeddings predicts the same classes from float16 ones.
    predictions = trained_head.head.predict(full, verbose=0).argmax(axis=1)
    half_predictions = trained_head.head.predict(halved, verbose=0).argmax(axis=1)
    assert np.mean(predictions == half_predictions) >= 0.99


def test_half_precision_copy_application_input() -> None:
    backbone = load_backbone("MobileNetV2", weights="none", image_size=32, seed=0)

    half = half_precision_copy(backbone.cnn)

    assert half.input.dtype == "float32"
    assert half.output.dtype == "float16"
    assert len(half.weights) == len(backbone.cnn.weights)
    assert backbone.cnn.output.dtype == "float32"


class _Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="subclassed_cnn")
        self.dense = keras.layers.Dense(4)

    def call(self, inputs):
        return self.dense(inputs)


def test_half_precision_copy_subclassed_model() -> None:
    model = _Subclassed()
    model(np.zeros((1, 3), np.float32))

    with pytest.raises(BackboneError, match=r"'subclassed_cnn' cannot be rebuilt to compute in mixed_float16"):
        half_precision_copy(model)
