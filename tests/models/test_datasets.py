from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from models.datasets import DATASETS, Dataset, load_dataset


def _original_digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target


def test_digits_all_classes_by_default() -> None:
    dataset = load_dataset("digits")
    images, labels = _original_digits()

    assert DATASETS == ("digits", "fashion_mnist", "cifar10", "image_folder", "npz")
    assert dataset.class_names == [str(digit) for digit in range(10)]
    assert len(dataset.x_train) + len(dataset.x_val) == len(images)
    assert dataset.raw_shape == (8, 8)
    assert dataset.num_classes == 10
    assert dataset.value_range == (0.0, 16.0)
    assert dataset.x_test is None
    assert dataset.has_test is False


def test_digits_raw_dtypes_and_values() -> None:
    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9])

    assert dataset.x_train.dtype == np.float32
    assert dataset.x_val.dtype == np.float32
    assert dataset.y_train.dtype == np.int64
    assert dataset.y_val.dtype == np.int64
    assert dataset.x_train.shape[1:] == (8, 8)
    # Raw intensities, not rescaled: preprocessing does that later.
    assert dataset.x_train.min() == 0.0
    assert dataset.x_train.max() == 16.0
    assert sorted(np.unique(dataset.y_train)) == [0, 1, 2, 3, 4]
    assert sorted(np.unique(dataset.y_val)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "classes",
    [
        [5, 6, 7, 8, 9],
        [9, 5, 7],
        [1, 0],
    ],
)
def test_digits_relabel_follows_class_order(classes: list[int]) -> None:
    dataset = load_dataset("digits", classes=classes, seed=3)
    images, labels = _original_digits()

    assert dataset.class_names == [str(digit) for digit in classes]
    assert len(dataset.x_train) + len(dataset.x_val) == int(np.isin(labels, classes).sum())

    # Every image with new label i must be an original image of digit classes[i].
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val)):
        for new_label, original in enumerate(classes):
            originals = {image.tobytes() for image in images[labels == original]}
            relabelled = x[y == new_label]
            assert len(relabelled) > 0
            assert all(image.tobytes() in originals for image in relabelled)


@pytest.mark.parametrize("validation_split", [0.2, 0.5, 0.1])
def test_digits_split_is_stratified(validation_split: float) -> None:
    dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], validation_split=validation_split, seed=0)

    train_counts = np.bincount(dataset.y_train, minlength=5)
    val_counts = np.bincount(dataset.y_val, minlength=5)
    totals = train_counts + val_counts

    # Each class keeps its share of the validation part, up to rounding of one image.
    expected_val_counts = validation_split * totals
    assert np.all(np.abs(val_counts - expected_val_counts) <= 1.0), (val_counts, expected_val_counts)
    assert abs(len(dataset.y_val) - validation_split * totals.sum()) <= 1.0


def test_digits_split_same_seed_is_identical() -> None:
    first = load_dataset("digits", classes=[0, 1, 2], seed=7)
    second = load_dataset("digits", classes=[0, 1, 2], seed=7)

    assert np.array_equal(first.x_train, second.x_train)
    assert np.array_equal(first.y_train, second.y_train)
    assert np.array_equal(first.x_val, second.x_val)
    assert np.array_equal(first.y_val, second.y_val)
    assert first.fingerprint() == second.fingerprint()


def test_digits_split_other_seed_differs() -> None:
    first = load_dataset("digits", classes=[0, 1, 2], seed=7)
    second = load_dataset("digits", classes=[0, 1, 2], seed=8)

    assert first.x_val.shape == second.x_val.shape
    assert not np.array_equal(first.x_val, second.x_val)
    assert first.fingerprint() != second.fingerprint()


def test_fingerprint_depends_on_class_order() -> None:
    ordered = load_dataset("digits", classes=[5, 6])
    swapped = load_dataset("digits", classes=[6, 5])

    assert len(ordered.fingerprint()) == 64
    assert ordered.fingerprint() != swapped.fingerprint()


def test_fingerprint_depends_on_value_range() -> None:
    dataset = load_dataset("digits", classes=[5, 6])
    rescaled = Dataset(
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_val=dataset.x_val,
        y_val=dataset.y_val,
        class_names=dataset.class_names,
        value_range=(0.0, 255.0),
    )

    assert dataset.fingerprint() != rescaled.fingerprint()


@pytest.mark.parametrize(
    ("arguments", "message_parts"),
    [
        ({"name": "mnist"}, ["'mnist'", "digits"]),
        ({"name": "digits", "classes": [5, 10]}, ["[10]", "not in dataset 'digits'", "[0, 1, 2"]),
        ({"name": "digits", "classes": [5, 5, 6]}, ["[5]", "more than once"]),
        ({"name": "digits", "classes": [3]}, ["[3]", "fewer than 2 classes"]),
        ({"name": "digits", "classes": []}, ["[]", "fewer than 2 classes"]),
        ({"name": "digits", "classes": [1.5, 2]}, ["1.5", "not an integer"]),
        ({"name": "digits", "classes": "56"}, ["'56'", "list of labels"]),
        ({"name": "digits", "validation_split": 0.0}, ["validation_split=0.0", "(0, 1)"]),
        ({"name": "digits", "validation_split": 1.0}, ["validation_split=1.0", "(0, 1)"]),
        ({"name": "digits", "validation_split": -0.1}, ["validation_split=-0.1", "(0, 1)"]),
        ({"name": "digits", "validation_split": "0.2"}, ["validation_split='0.2'", "(0, 1)"]),
        ({"name": "digits", "validation_split": 0.001}, ["validation_split=0.001", "try a split between"]),
        ({"name": "digits", "classes": [0, 1], "validation_split": 0.999}, ["validation_split=0.999", "try a split"]),
        ({"name": "digits", "seed": -1}, ["seed=-1", "0..2**32-1"]),
    ],
)
def test_load_dataset_rejects_invalid_arguments(arguments: dict, message_parts: list[str]) -> None:
    name = arguments.pop("name")

    with pytest.raises(ValueError) as error:
        load_dataset(name, **arguments)

    for part in message_parts:
        assert part.lower() in str(error.value).lower(), str(error.value)


def test_dataset_rejects_labels_beyond_class_names() -> None:
    images = np.zeros((4, 8, 8), dtype=np.float32)

    with pytest.raises(ValueError, match="labels must be in 0..1"):
        Dataset(
            x_train=images,
            y_train=np.array([0, 1, 2, 0]),
            x_val=images,
            y_val=np.array([0, 1, 0, 1]),
            class_names=["a", "b"],
            value_range=(0.0, 1.0),
        )


def test_digits_classes_by_name() -> None:
    by_name = load_dataset("digits", classes=["7", "2"], seed=0)
    by_label = load_dataset("digits", classes=[7, 2], seed=0)

    assert by_name.class_names == ["7", "2"]
    assert by_name.fingerprint() == by_label.fingerprint()


@pytest.mark.parametrize(
    ("arguments", "message_parts"),
    [
        ({"classes": ["5", "x"]}, ["'x'", "not a class name", "'0', '1'"]),
        ({"classes": [5, "5"]}, ["[5]", "more than once"]),
        ({"path": "/tmp"}, ["'digits' takes no path"]),
        ({"image_size": 16}, ["image_size applies only to image_folder"]),
        ({"color_mode": "grayscale", "test_path": "/tmp"}, ["test_path, color_mode apply only to image_folder"]),
    ],
)
def test_digits_rejects_other_sources_options(arguments: dict, message_parts: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        load_dataset("digits", **arguments)

    for part in message_parts:
        assert part in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("name", "arguments", "message_parts"),
    [
        ("image_folder", {}, ["'image_folder' needs a path", "one sub-folder of images per class"]),
        ("npz", {}, ["'npz' needs a path", "numpy.savez"]),
        ("image_folder", {"path": "/tmp", "color_mode": "cmyk"}, ["color_mode='cmyk'", "rgb, grayscale"]),
        ("image_folder", {"path": "/tmp", "image_size": (0, 4)}, ["image_size=(0, 4)", "(height, width)"]),
        ("image_folder", {"path": "/tmp", "image_size": (4, 4, 4)}, ["image_size=(4, 4, 4)"]),
    ],
)
def test_load_dataset_rejects_source_options(name: str, arguments: dict, message_parts: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        load_dataset(name, **arguments)

    for part in message_parts:
        assert part in str(error.value), str(error.value)


def _with_test_split(dataset: Dataset, x_test: np.ndarray, y_test: np.ndarray) -> Dataset:
    return Dataset(
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_val=dataset.x_val,
        y_val=dataset.y_val,
        class_names=dataset.class_names,
        value_range=dataset.value_range,
        x_test=x_test,
        y_test=y_test,
    )


def test_fingerprint_depends_on_test_split() -> None:
    dataset = load_dataset("digits", classes=[5, 6])
    with_test = _with_test_split(dataset, dataset.x_val[:4], dataset.y_val[:4])
    other_test = _with_test_split(dataset, dataset.x_val[:4], dataset.y_val[[1, 0, 2, 3]])

    assert with_test.has_test
    assert with_test.fingerprint() != dataset.fingerprint()
    assert with_test.fingerprint() != other_test.fingerprint()


@pytest.mark.parametrize(
    ("x_test", "y_test", "message"),
    [
        (np.zeros((3, 8, 9), dtype=np.float32), np.zeros(3, dtype=np.int64), "x_test images have shape (8, 9)"),
        (np.zeros((3, 8, 8), dtype=np.float32), np.zeros(2, dtype=np.int64), "x_test contains 3 images"),
        (np.zeros((3, 8, 8), dtype=np.float32), np.array([0, 1, 2]), "y_test contains labels from 0 to 2"),
        (np.zeros((3, 8, 8), dtype=np.float32), None, "x_test and y_test must be given together"),
    ],
)
def test_dataset_rejects_bad_test_split(x_test: np.ndarray, y_test: np.ndarray | None, message: str) -> None:
    dataset = load_dataset("digits", classes=[5, 6])

    with pytest.raises(ValueError) as error:
        _with_test_split(dataset, x_test, y_test)

    assert message in str(error.value)
