"""Datasets saved with numpy.savez: the optional arrays, value ranges, and every way the arrays can disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.datasets import DatasetError, load_dataset


def _arrays(seed: int = 0, per_class: int = 6, classes: int = 3, shape: tuple[int, ...] = (6, 5)) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(classes), per_class)
    y_test = np.arange(classes)
    return {
        "x_train": generator.integers(0, 256, (len(y_train), *shape), dtype=np.uint8),
        "y_train": y_train,
        "x_test": generator.integers(0, 256, (len(y_test), *shape), dtype=np.uint8),
        "y_test": y_test,
    }


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_train_and_test_arrays(tmp_path: Path) -> None:
    arrays = _arrays()
    path = _save(tmp_path / "data.npz", **arrays)

    dataset = load_dataset("npz", path=path, validation_split=0.5, seed=0)

    assert dataset.class_names == ["0", "1", "2"]
    assert dataset.raw_shape == (6, 5)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.value_range == (0.0, 255.0)
    assert np.bincount(dataset.y_train).tolist() == [3, 3, 3]
    assert np.array_equal(dataset.x_test, arrays["x_test"])
    assert np.array_equal(dataset.y_test, [0, 1, 2])


def test_given_validation_and_class_names(tmp_path: Path) -> None:
    arrays = _arrays(shape=(4, 4, 3))
    path = _save(
        tmp_path / "data.npz",
        x_train=arrays["x_train"], y_train=arrays["y_train"].reshape(-1, 1),
        x_val=arrays["x_test"], y_val=arrays["y_test"],
        class_names=np.array(["ant", "bee", "cow"]),
    )

    dataset = load_dataset("npz", path=path, classes=["cow", "ant"], validation_split=0.3)

    assert dataset.class_names == ["cow", "ant"]
    # The file's own validation part is used whole, in file order, relabelled.
    assert np.array_equal(dataset.x_val, arrays["x_test"][[0, 2]])
    assert dataset.y_val.tolist() == [1, 0]
    assert len(dataset.y_train) == 12
    assert dataset.x_test is None


def test_labels_name_classes_without_class_names(tmp_path: Path) -> None:
    arrays = _arrays()
    labels = np.array([0, 4, 7])[arrays["y_train"]]
    path = _save(tmp_path / "data.npz", x_train=arrays["x_train"], y_train=labels)

    everything = load_dataset("npz", path=path, validation_split=0.5)
    selected = load_dataset("npz", path=path, classes=[7, 4], validation_split=0.5)

    assert everything.class_names == ["0", "4", "7"]
    assert selected.class_names == ["7", "4"]


@pytest.mark.parametrize(
    ("images", "stored", "expected"),
    [
        (np.linspace(0.0, 1.0, 18 * 30, dtype=np.float64).reshape(18, 6, 5), None, (0.0, 1.0)),
        (np.linspace(0.0, 200.0, 18 * 30, dtype=np.float32).reshape(18, 6, 5), None, (0.0, 255.0)),
        (np.linspace(-3.0, 3.0, 18 * 30).reshape(18, 6, 5), np.array([-3.0, 3.0]), (-3.0, 3.0)),
        (np.arange(18 * 30, dtype=np.int64).reshape(18, 6, 5) % 17, np.array([0, 16]), (0.0, 16.0)),
    ],
    ids=["unit floats", "byte floats", "stored range", "integers with stored range"],
)
def test_value_range(tmp_path: Path, images: np.ndarray, stored: np.ndarray | None, expected: tuple[float, float]) -> None:
    extra = {} if stored is None else {"value_range": stored}
    path = _save(tmp_path / "data.npz", x_train=images, y_train=_arrays()["y_train"], **extra)

    dataset = load_dataset("npz", path=path, validation_split=0.5)

    assert dataset.value_range == expected
    assert dataset.x_train.dtype == np.float32


def _bad_file(tmp_path: Path, damage: str) -> Path:
    arrays = _arrays()
    path = tmp_path / "data.npz"
    if damage == "missing path":
        return tmp_path / "absent.npz"
    if damage == "folder":
        return tmp_path
    if damage == "not npz":
        path.write_bytes(b"PK\x03\x04 truncated zip")
        return path
    if damage == "single array":
        path = tmp_path / "single.npy"
        np.save(path, arrays["x_train"])
        return path
    if damage == "missing y_train":
        return _save(path, x_train=arrays["x_train"])
    if damage == "x_val without y_val":
        return _save(path, **arrays, x_val=arrays["x_test"])
    if damage == "length mismatch":
        return _save(path, x_train=arrays["x_train"], y_train=arrays["y_train"][:-2])
    if damage == "shape mismatch":
        return _save(path, **{**arrays, "x_test": np.zeros((3, 6, 6), dtype=np.uint8)})
    if damage == "bad image shape":
        return _save(path, x_train=arrays["x_train"].reshape(18, 30), y_train=arrays["y_train"])
    if damage == "labels above class names":
        return _save(path, **arrays, class_names=np.array(["a", "b"]))
    if damage == "negative labels":
        return _save(path, x_train=arrays["x_train"], y_train=arrays["y_train"] - 1)
    if damage == "fractional labels":
        return _save(path, x_train=arrays["x_train"], y_train=arrays["y_train"] + 0.5)
    if damage == "single class":
        return _save(path, x_train=arrays["x_train"], y_train=np.zeros(18, dtype=np.int64))
    if damage == "unknown range":
        return _save(path, x_train=arrays["x_train"].astype(np.float32) - 1000.0, y_train=arrays["y_train"])
    if damage == "not finite":
        images = arrays["x_train"].astype(np.float32)
        images[2, 1, 1] = np.nan
        return _save(path, x_train=images, y_train=arrays["y_train"])
    if damage == "repeated class names":
        return _save(path, **arrays, class_names=np.array(["a", "b", "a"]))
    raise AssertionError(damage)


@pytest.mark.parametrize(
    ("damage", "message_parts"),
    [
        ("missing path", ["npz path", "absent.npz", "not found"]),
        ("folder", ["is not a file"]),
        ("not npz", ["data.npz: cannot read the arrays", "corrupt"]),
        ("single array", ["contains a single array"]),
        ("missing y_train", ["missing y_train", "['x_train']"]),
        ("x_val without y_val", ["only one of x_val and y_val"]),
        ("length mismatch", ["x_train contains 18 images but y_train contains 16 labels"]),
        ("shape mismatch", ["x_train images have shape (6, 5) but x_test images have shape (6, 6)"]),
        ("bad image shape", ["x_train has shape (18, 30)", "(n, height, width)"]),
        ("labels above class names", ["y_train contains labels out of range (2)", "0..1"]),
        ("negative labels", ["y_train contains labels out of range (-1)"]),
        ("fractional labels", ["y_train contains non-integer labels"]),
        ("single class", ["has a single class ['0']", "at least 2"]),
        ("unknown range", ["x_train ranges from -1000.0", "save value_range"]),
        ("not finite", ["x_train contains NaN or infinite values"]),
        ("repeated class names", ["class_names lists ['a'] more than once"]),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, damage: str, message_parts: list[str]) -> None:
    path = _bad_file(tmp_path, damage)

    with pytest.raises(DatasetError) as error:
        load_dataset("npz", path=path, validation_split=0.5)

    for part in message_parts:
        assert part in str(error.value), str(error.value)


def test_validation_without_selected_classes(tmp_path: Path) -> None:
    arrays = _arrays()
    path = _save(tmp_path / "data.npz", x_train=arrays["x_train"], y_train=arrays["y_train"], x_val=arrays["x_test"][:1], y_val=arrays["y_test"][:1])

    with pytest.raises(DatasetError) as error:
        load_dataset("npz", path=path, classes=[1, 2])

    assert "x_val contains no images of the selected classes ['1', '2']" in str(error.value)
