"""Fashion-MNIST from Debian's package folder, from Keras' cache and from an explicit folder, and its bad files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from models.datasets import DatasetError, load_dataset
from models.datasets.fashion_mnist import CLASS_NAMES, DEBIAN_FOLDER

needs_debian_package = pytest.mark.skipif(
    not (DEBIAN_FOLDER / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian's dataset-fashion-mnist package is not installed ({DEBIAN_FOLDER} is missing); "
    "install it with apt-get install dataset-fashion-mnist",
)


def _read_idx_independently(path: Path) -> np.ndarray:
    # A second reader for the test: the header gives the shape, the rest is uint8 data.
    with gzip.open(path, "rb") as file:
        content = file.read()
    dimensions = content[3]
    shape = struct.unpack(f">{dimensions}I", content[4 : 4 + 4 * dimensions])
    return np.frombuffer(content[4 + 4 * dimensions :], dtype=np.uint8).reshape(shape)


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as file:
            file.write(content)
    else:
        path.write_bytes(content)


def write_small_fashion_mnist(folder: Path, *, per_class: int = 6, compress: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four IDX files with `per_class` training and 2 test images per class."""
    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "y_train": np.repeat(np.arange(10, dtype=np.uint8), per_class),
        "y_test": np.repeat(np.arange(10, dtype=np.uint8), 2),
    }
    arrays["x_train"] = generator.integers(0, 256, (len(arrays["y_train"]), 28, 28), dtype=np.uint8)
    arrays["x_test"] = generator.integers(0, 256, (len(arrays["y_test"]), 28, 28), dtype=np.uint8)
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    for key, name in names.items():
        _write_idx(folder / (name + (".gz" if compress else "")), arrays[key], compress=compress)
    return arrays


@needs_debian_package
def test_debian_folder_full_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty Keras home makes the search fall through to Debian's folder.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))

    dataset = load_dataset("fashion_mnist", download=False)

    assert dataset.class_names == CLASS_NAMES
    assert dataset.raw_shape == (28, 28)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.value_range == (0.0, 255.0)
    assert len(dataset.y_train) == 48000
    assert len(dataset.y_val) == 12000
    assert dataset.x_test.shape == (10000, 28, 28)
    assert np.bincount(dataset.y_test).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([dataset.y_train, dataset.y_val])).tolist() == [6000] * 10


@needs_debian_package
def test_debian_folder_classes_and_test_split() -> None:
    dataset = load_dataset("fashion_mnist", classes=[5, 6, 7, 8, 9], path=DEBIAN_FOLDER, seed=0)
    test_images = _read_idx_independently(DEBIAN_FOLDER / "t10k-images-idx3-ubyte.gz")
    test_labels = _read_idx_independently(DEBIAN_FOLDER / "t10k-labels-idx1-ubyte.gz")

    assert dataset.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(dataset.y_test) == 5000
    assert sorted(np.unique(dataset.y_train).tolist()) == [0, 1, 2, 3, 4]
    # The test split keeps the file's order, relabelled: original label 5 becomes 0.
    keep = test_labels >= 5
    assert np.array_equal(dataset.x_test, test_images[keep])
    assert np.array_equal(dataset.y_test, test_labels[keep].astype(np.int64) - 5)


@needs_debian_package
def test_debian_folder_class_names_select() -> None:
    dataset = load_dataset("fashion_mnist", classes=["Bag", "Sandal"], path=DEBIAN_FOLDER, validation_split=0.5, seed=3)

    assert dataset.class_names == ["Bag", "Sandal"]
    assert len(dataset.y_train) == 6000
    assert len(dataset.y_val) == 6000
    assert np.bincount(dataset.y_test).tolist() == [1000, 1000]


def test_keras_cache_preferred(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    arrays = write_small_fashion_mnist(tmp_path / "keras" / "datasets" / "fashion-mnist")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    dataset = load_dataset("fashion_mnist", classes=[0, 1], validation_split=0.5, download=False)

    assert len(dataset.y_train) + len(dataset.y_val) == 12
    assert np.array_equal(dataset.x_test, arrays["x_test"][arrays["y_test"] < 2])


def test_explicit_folder_uncompressed(tmp_path: Path) -> None:
    arrays = write_small_fashion_mnist(tmp_path / "fashion", compress=False)

    dataset = load_dataset("fashion_mnist", classes=[9, 3], path=tmp_path / "fashion", validation_split=0.5)

    assert dataset.class_names == ["Ankle boot", "Dress"]
    assert np.array_equal(dataset.y_test, [1, 1, 0, 0])
    assert np.array_equal(dataset.x_test, arrays["x_test"][[6, 7, 18, 19]])


def _corrupt(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)


@pytest.mark.parametrize(
    ("damage", "message_parts"),
    [
        ("missing path", ["fashion_mnist path", "not found"]),
        ("missing file", ["lacks t10k-labels-idx1-ubyte.gz"]),
        ("not gzip", ["train-images-idx3-ubyte.gz: cannot read the file", "corrupt or truncated"]),
        ("truncated", ["train-images-idx3-ubyte.gz: the header announces shape (60, 28, 28)", "truncated or corrupt"]),
        ("wrong magic", ["t10k-images-idx3-ubyte.gz: not an IDX file of unsigned bytes"]),
        ("labels out of range", ["y_train contains labels out of range (12)", "0..9"]),
        ("count mismatch", ["x_test contains 20 images but y_test contains 19 labels"]),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, damage: str, message_parts: list[str]) -> None:
    folder = tmp_path / "fashion"
    arrays = write_small_fashion_mnist(folder)
    if damage == "missing path":
        folder = tmp_path / "elsewhere"
    elif damage == "missing file":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    elif damage == "not gzip":
        _corrupt(folder, "train-images-idx3-ubyte.gz", b"this is not gzip data")
    elif damage == "truncated":
        _write_idx(folder / "train-images-idx3-ubyte.gz", arrays["x_train"])
        content = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
        _corrupt(folder, "train-images-idx3-ubyte.gz", gzip.compress(content[:-100]))
    elif damage == "wrong magic":
        _corrupt(folder, "t10k-images-idx3-ubyte.gz", gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)))
    elif damage == "labels out of range":
        labels = arrays["y_train"].copy()
        labels[4] = 12
        _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    elif damage == "count mismatch":
        _write_idx(folder / "t10k-labels-idx1-ubyte.gz", arrays["y_test"][:-1])

    with pytest.raises(DatasetError) as error:
        load_dataset("fashion_mnist", path=folder)

    for part in message_parts:
        assert part in str(error.value), str(error.value)
