"""load_dataset: read a source, keep some classes, and split off a seeded, stratified validation part."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from models.datasets.cifar10 import read_cifar10
from models.datasets.dataset import Dataset, DatasetError
from models.datasets.fashion_mnist import read_fashion_mnist
from models.datasets.image_folder import COLOR_MODES, index_image_folder, read_image_folder
from models.datasets.npz import read_npz
from models.datasets.source import Source

logger = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "image_folder", "npz")

# Datasets that need a path, and those that take one.
PATH_REQUIRED = ("image_folder", "npz")
PATH_ACCEPTED = ("fashion_mnist", "cifar10", "image_folder", "npz")

# scikit-learn's digits are 8x8 images whose pixels count the set bits of a
# 4x4 block of the original 32x32 bitmap, so the intensities run from 0 to 16.
_DIGITS_VALUE_RANGE = (0.0, 16.0)


def load_dataset(
    name: str,
    *,
    classes: Sequence[int | str] | None = None,
    validation_split: float = 0.2,
    seed: int = 0,
    path: str | Path | None = None,
    test_path: str | Path | None = None,
    image_size: int | Sequence[int] | None = None,
    color_mode: str = "rgb",
    download: bool = True,
) -> Dataset:
    """Load a dataset, keep some classes and split it for validation.

    The split is stratified, so every class keeps its share of images in both
    parts, and the same seed always gives the same split. A source's own
    validation part (npz x_val, y_val) is used as it is instead. A source's
    test part (fashion_mnist, cifar10, npz x_test, image_folder test_path)
    is kept apart as the test split, restricted to the same classes.

    Args:
        name: One of DATASETS. "digits" is scikit-learn's bundled 8x8 digits
            (1797 images, intensities 0..16). "fashion_mnist" and "cifar10"
            read the files from `path`, else from Keras' cache (and for
            fashion_mnist then Debian's /usr/share/datasets/fashion-mnist), and
            download them through Keras only when found nowhere. "image_folder"
            reads one sub-folder per class under `path`. "npz" reads the arrays
            of a numpy.savez file at `path`.
        classes: Classes to keep, at least 2 and no duplicates: integer labels
            as the source numbers them, or class names (strings). They are
            relabelled 0..k-1 in the given order, so [5, 6] makes 5 label 0.
            None (the default) keeps all classes in ascending label order.
        validation_split: Fraction of the training images that goes to
            validation, strictly between 0 and 1. Default 0.2.
        seed: Seed for the split, a non-negative integer. Default 0.
        path: The files to read; required for image_folder and npz, rejected for digits.
        test_path: image_folder only: a second folder with the same class
            sub-folders, read as the test split.
        image_size: image_folder only: (height, width) or one side for square
            images, that every image is resized to. None keeps the files' size
            when they all share one, and resizes to 256x256 otherwise.
        color_mode: image_folder only: "rgb" (default) or "grayscale".
        download: Whether fashion_mnist and cifar10 may be downloaded when no
            folder has them. Default True.

    Returns:
        The Dataset with int64 labels. Images keep the source's dtype: float32
        for digits, uint8 for fashion_mnist, cifar10 and image folders, uint8
        or float32 for npz.

    Raises:
        ValueError: If an argument is invalid, a class is missing or repeated,
            fewer than 2 classes are selected, or the split leaves a class
            without training or validation images.
        DatasetError: a ValueError for data on disk that cannot be used, with
            the file or folder in the message.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {', '.join(DATASETS)}.")

    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise ValueError(f"validation_split={validation_split!r} is invalid; expected a float in (0, 1), e.g. 0.2.")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split={validation_split!r} is invalid; expected a float in (0, 1), e.g. 0.2.")

    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid; expected an integer in 0..2**32-1.")

    _check_options(name, path, test_path, image_size, color_mode)
    path = Path(path).expanduser() if path is not None else None

    if name == "image_folder":
        index = index_image_folder(path)
        test_index = index_image_folder(Path(test_path).expanduser(), role="test_path") if test_path is not None else None
        labels = select_classes(name, classes, index.class_names, list(range(len(index.class_names))))
        source = read_image_folder(index, labels, image_size=_image_size(image_size), color_mode=color_mode, test_index=test_index)
    else:
        source = _read_source(name, path, download)

    available = sorted(int(label) for label in np.unique(source.y_train))
    selected = select_classes(name, classes, source.class_names, available)

    # Relabel in the requested order: the i-th requested class becomes label i.
    relabel = np.full(len(source.class_names), -1, dtype=np.int64)
    relabel[selected] = np.arange(len(selected))

    images, labels = _keep(source.x_train, source.y_train, relabel)
    if source.x_val is None:
        x_train, x_val, y_train, y_val = _split_stratified(images, labels, selected, validation_split, seed)
    else:
        logger.info("Using the validation images of %s; validation_split=%s is not used.", source.location, validation_split)
        x_train, y_train = images, labels
        x_val, y_val = _keep(source.x_val, source.y_val, relabel)
        _check_given_validation(source, x_val, y_val, selected)

    x_test = y_test = None
    if source.x_test is not None:
        x_test, y_test = _keep(source.x_test, source.y_test, relabel)
        if len(y_test) == 0:
            logger.warning("The test split of %s has no images of classes %s; the dataset has no test split.", source.location, selected)
            x_test = y_test = None

    dataset = Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        class_names=[source.class_names[label] for label in selected],
        value_range=source.value_range,
        x_test=x_test,
        y_test=y_test,
    )
    logger.info(
        "Loaded dataset %r from %s: classes %s, %d training, %d validation and %d test images of shape %s (seed %d).",
        name,
        source.location,
        dataset.class_names,
        len(y_train),
        len(y_val),
        len(y_test) if y_test is not None else 0,
        dataset.raw_shape,
        seed,
    )
    return dataset


def _check_options(
    name: str,
    path: str | Path | None,
    test_path: str | Path | None,
    image_size: int | Sequence[int] | None,
    color_mode: str,
) -> None:
    if path is None and name in PATH_REQUIRED:
        raise ValueError(f"Dataset {name!r} needs a path; set path to the {_PATH_DESCRIPTIONS[name]}.")
    if path is not None and name not in PATH_ACCEPTED:
        raise ValueError(f"Dataset {name!r} takes no path; it ships with scikit-learn, so remove path.")

    image_folder_only = [
        option
        for option, is_set in (("test_path", test_path is not None), ("image_size", image_size is not None), ("color_mode", color_mode != "rgb"))
        if is_set
    ]
    if name != "image_folder" and image_folder_only:
        verb = "applies" if len(image_folder_only) == 1 else "apply"
        raise ValueError(f"{', '.join(image_folder_only)} {verb} only to image_folder datasets; remove them for {name!r}.")
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode={color_mode!r} is invalid; use one of {', '.join(COLOR_MODES)}.")
    if image_size is not None:
        _image_size(image_size)


_PATH_DESCRIPTIONS = {
    "image_folder": "folder with one sub-folder of images per class",
    "npz": "file written by numpy.savez with x_train and y_train",
}


def _image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    sides = [image_size, image_size] if isinstance(image_size, Integral) else list(image_size)
    if len(sides) != 2 or any(isinstance(side, bool) or not isinstance(side, Integral) or side < 1 for side in sides):
        raise ValueError(f"image_size={image_size!r} is invalid; expected (height, width) or one side, in pixels of at least 1.")
    return int(sides[0]), int(sides[1])


def _read_source(name: str, path: Path | None, download: bool) -> Source:
    if name == "digits":
        bunch = load_digits()
        return Source(
            x_train=bunch.images.astype(np.float32),
            y_train=bunch.target.astype(np.int64),
            class_names=[str(digit) for digit in range(10)],
            value_range=_DIGITS_VALUE_RANGE,
            location="scikit-learn's bundled digits",
        )
    if name == "fashion_mnist":
        return read_fashion_mnist(path, download=download)
    if name == "cifar10":
        return read_cifar10(path, download=download)
    return read_npz(path)


def _keep(images: np.ndarray, labels: np.ndarray, relabel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new_labels = relabel[labels]
    keep = new_labels >= 0
    return images[keep], new_labels[keep]


def _check_given_validation(source: Source, x_val: np.ndarray, y_val: np.ndarray, selected: list[int]) -> None:
    if len(y_val) == 0:
        raise DatasetError(
            f"{source.location}: x_val contains no images of the selected classes "
            f"{[source.class_names[label] for label in selected]}; add some or remove x_val and y_val to split them off x_train."
        )
    counts = np.bincount(y_val, minlength=len(selected))
    absent = [source.class_names[selected[index]] for index in np.flatnonzero(counts == 0)]
    if absent:
        logger.warning("The validation images of %s include no images of classes %s.", source.location, absent)


def select_classes(name: str, classes: Sequence[int | str] | None, class_names: list[str], available: list[int]) -> list[int]:
    """Turn the `classes` argument into labels of the source, in the given order.

    Args:
        name: The dataset's name, for messages.
        classes: Integer labels or class names, or None for every available class.
        class_names: Name of every label of the source.
        available: Labels that have training images.

    Returns:
        The selected labels.

    Raises:
        ValueError: If a class is unknown, repeated or not an integer or a
            name, or fewer than 2 classes are selected.
    """
    if classes is None:
        if len(available) < 2:
            names = [class_names[label] for label in available]
            raise DatasetError(f"dataset {name!r} has a single class {names}; a classifier needs at least 2.")
        return available

    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes={classes!r} is invalid; pass a list of labels such as [5, 6, 7, 8, 9].")

    selected = []
    for item in classes:
        if isinstance(item, str):
            if item not in class_names:
                raise ValueError(
                    f"classes contains {item!r}, which is not a class name of dataset {name!r}; "
                    f"the names are {[class_names[label] for label in available]}."
                )
            selected.append(class_names.index(item))
        elif isinstance(item, bool) or not isinstance(item, Integral):
            raise ValueError(
                f"classes contains {item!r}, which is not an integer label or a class name; pass labels from {available}."
            )
        else:
            selected.append(int(item))

    missing = [label for label in selected if label not in available]
    if missing:
        raise ValueError(f"classes {missing} are not in dataset {name!r}; pass labels from {available}.")

    duplicates = sorted({label for label in selected if selected.count(label) > 1})
    if duplicates:
        raise ValueError(f"classes={list(classes)} lists {duplicates} more than once; list each class once.")

    if len(selected) < 2:
        raise ValueError(f"classes={selected} selects fewer than 2 classes; a classifier needs at least 2.")

    return selected


def _split_stratified(
    images: np.ndarray,
    labels: np.ndarray,
    selected: list[int],
    validation_split: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        x_train, x_val, y_train, y_val = train_test_split(
            images,
            labels,
            test_size=validation_split,
            stratify=labels,
            random_state=seed,
        )
    except ValueError as error:
        # scikit-learn rejects splits whose smaller part has fewer images than
        # there are classes. Restate that with the argument the caller controls.
        counts = np.bincount(labels, minlength=len(selected))
        raise ValueError(
            f"validation_split={validation_split} cannot give every class a training and a validation image "
            f"({len(labels)} images, {len(selected)} classes, at least {counts.min()} per class). "
            f"scikit-learn reported: {str(error).rstrip('.')}. "
            f"Try a split between about {_feasible_split_bounds(counts)}."
        ) from error

    for part, part_labels in (("validation", y_val), ("training", y_train)):
        counts = np.bincount(part_labels, minlength=len(selected))
        empty = [selected[index] for index in np.flatnonzero(counts == 0)]
        if empty:
            all_counts = np.bincount(labels, minlength=len(selected))
            raise ValueError(
                f"validation_split={validation_split} leaves classes {empty} with no {part} image; "
                f"try a split between about {_feasible_split_bounds(all_counts)}."
            )

    return x_train, x_val, y_train, y_val


def _feasible_split_bounds(counts: np.ndarray) -> str:
    # Each class needs one image on each side, so the smallest class bounds the split.
    smallest = int(counts.min())
    if smallest < 2:
        return "none (a class has a single image)"
    low = 1.0 / smallest
    high = 1.0 - low
    return f"{math.ceil(low * 1000) / 1000} and {math.floor(high * 1000) / 1000}"
