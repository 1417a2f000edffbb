"""Images and labels as a source stores them, before classes are selected and split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.datasets.dataset import DatasetError

# Pixel intensities of 8-bit images: the value range of fashion_mnist, cifar10,
# image folders and uint8 npz arrays.
UINT8_VALUE_RANGE = (0.0, 255.0)


@dataclass(frozen=True, eq=False)
class Source:
    """Everything one source provides, with labels as the source numbers them.

    Attributes:
        x_train: Training images, (n, *raw_shape).
        y_train: int64 labels, indexes into class_names.
        class_names: Name of every label the source defines, index i for label i.
        value_range: (min, max) of the raw pixel intensities.
        location: Where the images were read from, for log lines and messages.
        x_val: Validation images the source provides, or None to split them off x_train.
        y_val: int64 labels of x_val, or None.
        x_test: Held-out test images, or None when the source has none.
        y_test: int64 labels of x_test, or None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    class_names: list[str]
    value_range: tuple[float, float]
    location: str
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def check_images_and_labels(where: str, part: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Check that there is one integer label in 0..num_classes-1 per image.

    Args:
        where: The file or folder, named in messages.
        part: Name of the split in messages, e.g. "train" for x_train and y_train.
        images: The images of the split.
        labels: Their labels, shape (n,) or (n, 1).
        num_classes: Number of classes the source defines.

    Returns:
        The labels as int64 of shape (n,).

    Raises:
        DatasetError: naming the split, the count or the bad labels.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{where}: y_{part} has shape {labels.shape}; expected one label per image, shape (n,).")
    if len(labels) != len(images):
        raise DatasetError(
            f"{where}: x_{part} contains {len(images)} images but y_{part} contains {len(labels)} labels; "
            f"the two must have the same length."
        )

    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DatasetError(f"{where}: y_{part} contains non-integer labels; labels must be integers 0..{num_classes - 1}.")
    elif labels.dtype.kind not in "iub":
        raise DatasetError(f"{where}: y_{part} has dtype {labels.dtype}; labels must be integers 0..{num_classes - 1}.")

    labels = labels.astype(np.int64)
    outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if len(outside):
        listed = ", ".join(str(label) for label in outside[:10])
        raise DatasetError(
            f"{where}: y_{part} contains labels out of range ({listed}); "
            f"with {num_classes} classes the labels must be in 0..{num_classes - 1}."
        )
    return labels
