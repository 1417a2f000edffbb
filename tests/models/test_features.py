from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from models.backbones import PREPROCESSING_VERSION
from models.datasets import Dataset, load_dataset
from models.features import (
    MANIFEST_FILE,
    Embeddings,
    cache_entry_size,
    compute_embeddings,
    embedding_cache_key,
    embeddings_path,
    extract_embeddings,
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


def test_save_removes_abandoned_staging_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = tmp_path / "embeddings"
    parent.mkdir()
    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    abandoned = parent / f".key.{host}-{dead_pid}.abcd1234.tmp"
    running = parent / f".key.{host}-{os.getpid()}.efgh5678.tmp"
    other_host = parent / f".key.other.host.example-{dead_pid}.ijkl9012.tmp"
    other_key = parent / f".key2.{host}-{dead_pid}.mnop3456.tmp"
    for folder in (abandoned, running, other_host, other_key):
        folder.mkdir()
        (folder / "train.npy").write_bytes(b"partial")

    with caplog.at_level(logging.INFO, logger="models.features"):
        save_embeddings(tmp_path, "key", _random_embeddings())

    assert sorted(entry.name for entry in parent.iterdir()) == sorted(["key", running.name, other_host.name, other_key.name])
    assert f"Removing {abandoned}, left by process {dead_pid}, which no longer runs." in caplog.text


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
        "precision": embedding_cache_key(WEIGHTS_KEY, dataset, 16, PREPROCESSING_VERSION, "mixed_float16"),
    }

    assert embedding_cache_key(WEIGHTS_KEY, load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0), 16, PREPROCESSING_VERSION) == base
    for name, key in variants.items():
        assert key != base, name
    assert len(set(variants.values())) == len(variants)


def test_float32_cache_key_unchanged() -> None:
    # Entries cached before the key had a precision are float32 ones and stay valid.
    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0)
    earlier = {
        "extractor_weights_key": WEIGHTS_KEY, "dataset": dataset.fingerprint(), "image_size": 16,
        "preprocessing_version": PREPROCESSING_VERSION,
    }
    expected = hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()

    assert embedding_cache_key(WEIGHTS_KEY, dataset, 16, PREPROCESSING_VERSION, "float32") == expected


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


def test_extract_embeddings_streams_into_cache(
    extractor: keras.Model, target: Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = embedding_cache_key(WEIGHTS_KEY, target, 16, PREPROCESSING_VERSION)

    with caplog.at_level(logging.INFO, logger="models.features"):
        stored = extract_embeddings(
            extractor, target, tmp_path, key, batch_size=64, log_interval_seconds=0.0, description={"backbone": "small_cnn"},
        )
    in_memory = compute_embeddings(extractor, np.concatenate([target.x_train, target.x_val]), batch_size=100)
    entry = embeddings_path(tmp_path, key)
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    total = len(target.x_train) + len(target.x_val)

    assert isinstance(stored.train, np.memmap)
    assert stored.train.shape == (len(target.x_train), 128)
    assert stored.val.shape == (len(target.x_val), 128)
    np.testing.assert_allclose(stored.train, in_memory[: len(target.x_train)], atol=1e-5)
    np.testing.assert_allclose(stored.val, in_memory[len(target.x_train) :], atol=1e-5)
    assert manifest["counts"] == {"train": len(target.x_train), "val": len(target.x_val)}
    assert manifest["dimension"] == 128
    assert manifest["description"] == {"backbone": "small_cnn"}
    # No temporary folder is left beside the entry.
    assert [path.name for path in entry.parent.iterdir()] == [key]
    assert cache_entry_size(entry) > 4 * 128 * total

    progress_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Embedded ")]
    # One line per batch of 64, with the interval at 0 seconds; the last one reports all images.
    assert len(progress_lines) == -(-len(target.x_train) // 64) + -(-len(target.x_val) // 64)
    assert progress_lines[-1].startswith(f"Embedded {total} of {total} images (100%)")
    assert f"Stored embeddings at {entry}" in caplog.text
    assert " MB)" in caplog.text


def test_extract_embeddings_keeps_entry_stored_first(extractor: keras.Model, target: Dataset, tmp_path: Path) -> None:
    first = _random_embeddings(seed=3)
    save_embeddings(tmp_path, "shared", first)
    small = Dataset(
        x_train=target.x_train[:30], y_train=np.arange(30) % 5, x_val=target.x_val[:7], y_val=np.arange(7) % 5,
        class_names=target.class_names, value_range=target.value_range,
    )
    # extract_embeddings does not look the key up first, so this is what it
    # finds when another run sharing the cache stores the key during its extraction.
    staging_parent = embeddings_path(tmp_path, "shared").parent

    stored = extract_embeddings(extractor, small, tmp_path, "shared", batch_size=16)

    # The existing entry has dimension 12, the extractor gives 128: the first entry was kept.
    assert stored.dimension == 12
    np.testing.assert_array_equal(stored.train, first.train)
    assert [path.name for path in staging_parent.iterdir()] == ["shared"]


def test_compute_embeddings_fills_given_array(extractor: keras.Model, target: Dataset, tmp_path: Path) -> None:
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(11, 128))

    filled = compute_embeddings(extractor, target.x_val[:11], batch_size=4, out=out)
    expected = compute_embeddings(extractor, target.x_val[:11], batch_size=11)

    assert filled is out
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"out has shape \(11, 128\) and dtype float32; expected float32 \(10, 128\)"):
        compute_embeddings(extractor, target.x_val[:10], out=out)


def test_compute_embeddings_accepts_integer_images(extractor: keras.Model, target: Dataset) -> None:
    images = np.rint(target.x_val[:6]).astype(np.uint8)

    from_integers = compute_embeddings(extractor, images, batch_size=4)
    from_floats = compute_embeddings(extractor, images.astype(np.float32), batch_size=4)

    np.testing.assert_array_equal(from_integers, from_floats)
