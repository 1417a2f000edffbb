"""Images and labels saved with numpy.savez: x_train, y_train and optional validation, test, names and value range."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from models.datasets.dataset import DatasetError
from models.datasets.source import UINT8_VALUE_RANGE, Source, check_images_and_labels

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("x_train", "y_train")
OPTIONAL_KEYS = ("x_val", "y_val", "x_test", "y_test", "class_names", "value_range")


def read_npz(path: Path) -> Source:
    """Read a dataset from an .npz file.

    Keys:
        x_train: images (n, h, w) or (n, h, w, c) with c = 1 or 3, any real dtype.
        y_train: integer labels (n,) or (n, 1).
        x_val, y_val: validation images and labels; without them the
            validation part is split off the training images.
        x_test, y_test: held-out test images and labels.
        class_names: one name per label; without it label i is named "i".
        value_range: (min, max) of the pixel intensities. Without it, uint8
            images get (0, 255), and other images (0, 1) when x_train lies in
            [0, 1] or (0, 255) when it lies in [0, 255].

    Images of dtype uint8 stay uint8; other dtypes are stored as float32.

    Raises:
        DatasetError: when the file is missing or corrupt, a key is missing,
            shapes do not match, labels are out of range, or the value range
            cannot be inferred.
    """
    if not path.exists():
        raise DatasetError(f"npz path {str(path)!r} not found; set path to a file written by numpy.savez.")
    if not path.is_file():
        raise DatasetError(f"npz path {str(path)!r} is not a file; set path to a file written by numpy.savez.")

    arrays = _load_arrays(path)
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)}; the file contains {sorted(arrays) or 'no arrays'}.")
    for images_key, labels_key in (("x_val", "y_val"), ("x_test", "y_test")):
        if (images_key in arrays) != (labels_key in arrays):
            raise DatasetError(f"{path}: contains only one of {images_key} and {labels_key}; save both or neither.")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        logger.warning("Ignoring arrays %s in %s; the keys used are %s.", unknown, path, ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS))

    parts = [part for part in ("train", "val", "test") if f"x_{part}" in arrays]
    images = {part: _checked_images(path, part, arrays[f"x_{part}"]) for part in parts}
    if len(images["train"]) == 0:
        raise DatasetError(f"{path}: x_train contains no images; save at least one image per class.")
    for part in parts[1:]:
        if images[part].shape[1:] != images["train"].shape[1:]:
            raise DatasetError(
                f"{path}: x_train images have shape {images['train'].shape[1:]} but x_{part} images have shape "
                f"{images[part].shape[1:]}; every part must hold images of one shape."
            )

    class_names = _class_names(path, arrays, parts)
    labels = {part: check_images_and_labels(str(path), part, images[part], arrays[f"y_{part}"], len(class_names)) for part in parts}
    value_range = _value_range(path, arrays.get("value_range"), images["train"])

    return Source(
        x_train=images["train"], y_train=labels["train"],
        x_val=images.get("val"), y_val=labels.get("val"),
        x_test=images.get("test"), y_test=labels.get("test"),
        class_names=class_names, value_range=value_range, location=str(path),
    )


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: contains a single array, not the named arrays of numpy.savez; save x_train and y_train by name.")
        with loaded as archive:
            return {key: archive[key] for key in archive.files}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: cannot read the arrays ({error}); the file is corrupt or not written by numpy.savez.") from error


def _checked_images(path: Path, part: str, images: np.ndarray) -> np.ndarray:
    shape_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
    if not shape_ok:
        raise DatasetError(
            f"{path}: x_{part} has shape {images.shape}; expected (n, height, width) or (n, height, width, channels) "
            f"with 1 or 3 channels."
        )
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: x_{part} has dtype {images.dtype}; images must hold real numbers.")
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise DatasetError(f"{path}: x_{part} contains NaN or infinite values; replace them before training.")
    return images


def _class_names(path: Path, arrays: dict[str, np.ndarray], parts: list[str]) -> list[str]:
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
            raise DatasetError(f"{path}: class_names must be a 1-D array of strings, got shape {names.shape} and dtype {names.dtype}.")
        names = [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names.tolist()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DatasetError(f"{path}: class_names lists {repeated} more than once; give each class a distinct name.")
        return names

    # Without names, the labels themselves name the classes: label 7 is class "7".
    largest = 0
    for part in parts:
        labels = np.asarray(arrays[f"y_{part}"])
        if labels.size and labels.dtype.kind in "iuf" and np.all(np.isfinite(labels)):
            largest = max(largest, int(labels.max()))
    return [str(label) for label in range(largest + 1)]


def _value_range(path: Path, stored: np.ndarray | None, x_train: np.ndarray) -> tuple[float, float]:
    if stored is not None:
        values = np.asarray(stored, dtype=np.float64).ravel()
        if len(values) != 2 or not values[0] < values[1]:
            raise DatasetError(f"{path}: value_range must hold (min, max) with min < max, got {values.tolist()}.")
        return float(values[0]), float(values[1])
    if x_train.dtype == np.uint8:
        return UINT8_VALUE_RANGE

    low, high = float(x_train.min()), float(x_train.max())
    if low >= 0.0 and high <= 1.0:
        inferred = (0.0, 1.0)
    elif low >= 0.0 and high <= 255.0:
        inferred = UINT8_VALUE_RANGE
    else:
        raise DatasetError(
            f"{path}: x_train ranges from {low} to {high}, so the value range cannot be inferred; "
            f"save value_range=(min, max) with the intensity range of the images."
        )
    logger.info("Inferred value range %s for %s from x_train (%s to %s).", inferred, path, low, high)
    return inferred
