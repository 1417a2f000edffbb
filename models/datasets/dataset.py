"""The Dataset every loader returns, and the error for data that cannot be used."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """Data on disk that cannot be loaded: a missing or empty folder, a corrupt file, bad labels or shapes."""


# eq=False because comparing arrays field by field has no single truth value.
# The identity-based hash that comes with it keeps instances usable as dict keys.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images split into training, validation and, when the source has one, test parts.

    Attributes:
        x_train: Training images exactly as the source provides them, shape
            (n_train, *raw_shape). For digits: float32 (n, 8, 8) in 0..16. For
            fashion_mnist: uint8 (n, 28, 28). For cifar10: uint8 (n, 32, 32, 3).
        y_train: int64 training labels in 0..k-1.
        x_val: Validation images, same raw shape as x_train.
        y_val: int64 validation labels in 0..k-1.
        class_names: Name of each label, index i for label i. For digits the
            original digit as a string.
        value_range: (min, max) of the raw pixel intensities. Preprocessing
            maps this range linearly to [0, 1].
        x_test: Held-out test images with the raw shape of x_train, or None
            when the source has no test split. They take no part in training
            or model selection.
        y_test: int64 test labels in 0..k-1, or None together with x_test.

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
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.x_test is None) != (self.y_test is None):
            raise ValueError("x_test and y_test must be given together; pass both or neither.")

        parts = [("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val)]
        if self.x_test is not None:
            parts.append(("test", self.x_test, self.y_test))

        for split, x, y in parts[1:]:
            if x.shape[1:] != self.x_train.shape[1:]:
                raise ValueError(
                    f"x_train images have shape {self.x_train.shape[1:]} but x_{split} images have shape "
                    f"{x.shape[1:]}; all parts must hold images of one raw shape."
                )

        for split, x, y in parts:
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

    @property
    def has_test(self) -> bool:
        """Whether the dataset has a held-out test split."""
        return self.x_test is not None

    def fingerprint(self) -> str:
        """Hash the images, labels, class names and value range.

        The test split enters the hash only when there is one.

        Returns:
            The sha256 hex digest. Two datasets with the same digest hold the same
            numbers, so cache keys built from it change whenever the data does.
        """
        digest = hashlib.sha256()

        arrays = [self.x_train, self.y_train, self.x_val, self.y_val]
        if self.x_test is not None:
            arrays += [self.x_test, self.y_test]
        for array in arrays:
            contiguous = np.ascontiguousarray(array)
            digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
            digest.update(contiguous.tobytes())

        # The unit separator cannot appear in a class name typed by a user, so
        # ["ab", "c"] and ["a", "bc"] hash differently.
        digest.update("\x1f".join(self.class_names).encode())
        digest.update(repr(tuple(float(value) for value in self.value_range)).encode())
        return digest.hexdigest()
