"""Image classification datasets with a seeded, stratified train/validation split.

Example:
    >>> from models.datasets import load_dataset
    >>> dataset = load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=0)
    >>> dataset.class_names
    ['5', '6', '7', '8', '9']
    >>> dataset.x_train.shape[1:]
    (8, 8)
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)

DATASETS = ("digits",)

# scikit-learn's digits are 8x8 images whose pixels count the set bits of a
# 4x4 block of the original 32x32 bitmap, so the intensities run from 0 to 16.
_DIGITS_VALUE_RANGE = (0.0, 16.0)


# eq=False because comparing arrays field by field has no single truth value.
# The identity-based hash that comes with it keeps instances usable as dict keys.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images split into a training and a validation part.

    Attributes:
        x_train: Training images exactly as the source provides them, shape
            (n_train, *raw_shape). For digits: float32 (n, 8, 8) in 0..16.
        y_train: int64 training labels in 0..k-1.
        x_val: Validation images, same raw shape and dtype as x_train.
        y_val: int64 validation labels in 0..k-1.
        class_names: Name of each label, index i for label i. For digits the
            original digit as a string.
        value_range: (min, max) of the raw pixel intensities. Preprocessing
            maps this range linearly to [0, 1].

    Example:
        >>> dataset = load_dataset("digits", classes=[0, 1])
        >>> len(dataset.fingerprint())
        64
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list[str]
    value_range: tuple[float, float]

    def __post_init__(self) -> None:
        if self.x_train.shape[1:] != self.x_val.shape[1:]:
            raise ValueError(
                f"x_train images have shape {self.x_train.shape[1:]} but x_val images have shape "
                f"{self.x_val.shape[1:]}; both parts must hold images of one raw shape."
            )

        for split, x, y in (("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val)):
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"y_{split} has shape {y.shape} but x_{split} contains {len(x)} images; "
                    f"pass one integer label per image."
                )
            if len(y) and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise ValueError(
                    f"y_{split} contains labels from {y.min()} to {y.max()} but there are "
                    f"{len(self.class_names)} class names; labels must be in 0..{len(self.class_names) - 1}."
                )

        low, high = self.value_range
        if not low < high:
            raise ValueError(f"value_range={self.value_range} is invalid; expected (min, max) with min < max.")

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape of one raw image, for example (8, 8) for digits."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes k."""
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Hash the images, labels, class names and value range.

        Returns:
            The sha256 hex digest. Two datasets with the same digest hold the same
            numbers, so cache keys built from it change whenever the data does.
        """
        digest = hashlib.sha256()

        for array in (self.x_train, self.y_train, self.x_val, self.y_val):
            contiguous = np.ascontiguousarray(array)
            digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
            digest.update(contiguous.tobytes())

        # The unit separator cannot appear in a class name typed by a user, so
        # ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update("\x1f".join(self.class_names).encode())
        digest.update(repr(tuple(float(value) for value in self.value_range)).encode())
        return digest.hexdigest()


def load_dataset(
    name: str,
    *,
    classes: Sequence[int] | None = None,
    validation_split: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a bundled dataset, keep some classes and split it for validation.

    The split is stratified, so every class keeps its share of images in both
    parts, and the same seed always gives the same split. No file is downloaded.

    Args:
        name: One of DATASETS. "digits" is scikit-learn's bundled 8x8 digits
            (1797 images, intensities 0..16).
        classes: Original labels to keep, at least 2 and no duplicates. They are
            relabelled 0..k-1 in the given order, so [5, 6] makes 5 label 0.
            None (the default) keeps all classes in ascending order.
        validation_split: Fraction of the images that goes to validation,
            strictly between 0 and 1. Default 0.2.
        seed: Seed for the split, a non-negative integer. Default 0.

    Returns:
        The Dataset with float32 images and int64 labels.

    Raises:
        ValueError: If the name is unknown, a class is missing or repeated,
            fewer than 2 classes are requested, validation_split is outside
            (0, 1), or the split leaves a class without training or validation
            images.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {', '.join(DATASETS)}.")

    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise ValueError(f"validation_split={validation_split!r} is invalid; expected a float in (0, 1), e.g. 0.2.")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split={validation_split!r} is invalid; expected a float in (0, 1), e.g. 0.2.")

    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid; expected an integer in 0..2**32-1.")

    images, labels = _load_digits()
    available = sorted(int(label) for label in np.unique(labels))
    selected = _validate_classes(name, classes, available)

    keep = np.isin(labels, selected)
    images = images[keep]
    original_labels = labels[keep]

    # Relabel in the requested order: the i-th requested class becomes label i.
    relabel = {original: index for index, original in enumerate(selected)}
    new_labels = np.array([relabel[int(label)] for label in original_labels], dtype=np.int64)

    x_train, x_val, y_train, y_val = _split_stratified(images, new_labels, selected, validation_split, seed)

    dataset = Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        class_names=[str(original) for original in selected],
        value_range=_DIGITS_VALUE_RANGE,
    )
    logger.info(
        "Loaded dataset %r: classes %s, %d training and %d validation images of shape %s (seed %d).",
        name,
        dataset.class_names,
        len(y_train),
        len(y_val),
        dataset.raw_shape,
        seed,
    )
    return dataset


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _validate_classes(name: str, classes: Sequence[int] | None, available: list[int]) -> list[int]:
    if classes is None:
        return available

    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes={classes!r} is invalid; pass a list of labels such as [5, 6, 7, 8, 9].")

    selected = list(classes)
    for label in selected:
        if isinstance(label, bool) or not isinstance(label, Integral):
            raise ValueError(f"classes contains {label!r}, which is not an integer label; pass labels from {available}.")

    selected = [int(label) for label in selected]
    missing = [label for label in selected if label not in available]
    if missing:
        raise ValueError(f"classes {missing} are not in dataset {name!r}; pass labels from {available}.")

    duplicates = sorted({label for label in selected if selected.count(label) > 1})
    if duplicates:
        raise ValueError(f"classes={selected} lists {duplicates} more than once; list each class once.")

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
