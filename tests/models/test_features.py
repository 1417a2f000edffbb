from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from models.backbones import PREPROCESSING_VERSION
from models.datasets import Dataset, load_dataset
from models.features import (
    MANIFEST_FILE,
    Embeddings,
    compute_embeddings,
    embedding_cache_key,
    load_cached_embeddings,
    save_embeddings,
)

WEIGHTS_KEY = "a" * 64


def _random_embeddings(seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(
        train=rng.normal(size=(30, 12)).astype(np.float32),
        val=rng.normal(size=(7, 12)).astype(np.float32),
    )


def test_embedding_cache_round_trip(tmp_path: Path) -> None:
    embeddings = _random_embeddings()
    key = embedding_cache_key(WEIGHTS_KEY, load_dataset("digits", classes=[0, 1]), 16, PREPROCESSING_VERSION)

    path = save_embeddings(tmp_path, key, embeddings)
    loaded = load_cached_embeddings(tmp_path, key)

    assert path == tmp_path / "embeddings" / key
    assert sorted(entry.name for entry in path.iterdir()) == [MANIFEST_FILE, "train.npy", "val.npy"]
    assert loaded is not None
    assert isinstance(loaded.train, np.memmap)
    assert loaded.train.dtype == np.float32
    assert loaded.val.dtype == np.float32
    np.testing.assert_array_equal(loaded.train, embeddings.train)
    np.testing.assert_array_equal(loaded.val, embeddings.val)
    # The temporary folder was renamed onto the final one.
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]


def test_save_embeddings_replaces_existing_file(tmp_path: Path) -> None:
    save_embeddings(tmp_path, "key", _random_embeddings(seed=0))
    newer = _random_embeddings(seed=1)

    save_embeddings(tmp_path, "key", newer)
    loaded = load_cached_embeddings(tmp_path, "key")

    assert loaded is not None
    np.testing.assert_array_equal(loaded.train, newer.train)
    # The replaced entry was deleted, and no temporary folder is left.
    assert [entry.name for entry in (tmp_path / "embeddings").iterdir()] == ["key"]


def test_load_cached_embeddings_missing_returns_none(tmp_path: Path) -> None:
    assert load_cached_embeddings(tmp_path, "0123abcd") is None


@pytest.mark.parametrize("damage", ["manifest", "array", "shape"])
def test_load_cached_embeddings_corrupt_returns_none(damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_embeddings(tmp_path, "broken", _random_embeddings())
    if damage == "manifest":
        (path / MANIFEST_FILE).write_text("{not json")
    elif damage == "array":
        (path / "train.npy").write_bytes(b"not a numpy file")
    else:
        np.save(path / "val.npy", np.zeros((3, 12), np.float32))

    with caplog.at_level(logging.WARNING, logger="models.features"):
        loaded = load_cached_embeddings(tmp_path, "broken")

    assert loaded is None
    assert "Ignoring unreadable cached embeddings" in caplog.text
    assert str(path) in caplog.text


@pytest.mark.parametrize("key", ["../escape", "a/b", "", "key with space"])
def test_embedding_cache_rejects_unsafe_keys(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Embedding cache key .* is invalid"):
        save_embeddings(tmp_path, key, _random_embeddings())

    with pytest.raises(ValueError, match="Embedding cache key .* is invalid"):
        load_cached_embeddings(tmp_path, key)


def test_embedding_cache_key_changes_with_each_input() -> None:
    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0)
    base = embedding_cache_key(WEIGHTS_KEY, dataset, 16, PREPROCESSING_VERSION)

    variants = {
        "weights key": embedding_cache_key("b" * 64, dataset, 16, PREPROCESSING_VERSION),
        "dataset seed": embedding_cache_key(WEIGHTS_KEY, load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=1), 16, PREPROCESSING_VERSION),
        "dataset classes": embedding_cache_key(WEIGHTS_KEY, load_dataset("digits", classes=[5, 6, 7, 8], seed=0), 16, PREPROCESSING_VERSION),
        "image size": embedding_cache_key(WEIGHTS_KEY, dataset, 32, PREPROCESSING_VERSION),
        "preprocessing version": embedding_cache_key(WEIGHTS_KEY, dataset, 16, PREPROCESSING_VERSION + "-next"),
    }

    assert embedding_cache_key(WEIGHTS_KEY, load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0), 16, PREPROCESSING_VERSION) == base
    for name, key in variants.items():
        assert key != base, name
    assert len(set(variants.values())) == len(variants)


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        (np.zeros((4, 8), np.float64), np.zeros((2, 8), np.float32), "dtype float64"),
        (np.zeros((4, 8), np.float32), np.zeros((2, 9), np.float32), "dimension 8 but Embeddings.val has 9"),
        (np.zeros((4,), np.float32), np.zeros((2, 8), np.float32), r"shape \(4,\)"),
    ],
)
def test_embeddings_reject_invalid_arrays(train: np.ndarray, val: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Embeddings(train=train, val=val)


def test_compute_embeddings_shapes(extractor: keras.Model, target: Dataset) -> None:
    embeddings = compute_embeddings(extractor, target.x_val[:20], batch_size=8)
    empty = compute_embeddings(extractor, target.x_val[:0])

    assert embeddings.shape == (20, 128)
    assert embeddings.dtype == np.float32
    assert empty.shape == (0, 128)
    assert empty.dtype == np.float32


@pytest.mark.parametrize(
    ("images", "batch_size", "message"),
    [
        (np.zeros((3, 16, 16), np.float32), 8, r"shape \(16, 16\) per image but the extractor expects \(8, 8\)"),
        (np.zeros((3, 8, 8), np.float32), 0, "batch_size=0 is invalid"),
    ],
)
def test_compute_embeddings_rejects_invalid_input(
    extractor: keras.Model, images: np.ndarray, batch_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compute_embeddings(extractor, images, batch_size=batch_size)
