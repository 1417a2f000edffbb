"""Fashion-MNIST from its gzip IDX files: an explicit folder, Keras' cache, Debian's package, or a download."""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from models.datasets.dataset import DatasetError
from models.datasets.keras_cache import download_with_keras, keras_home, not_found
from models.datasets.source import UINT8_VALUE_RANGE, Source, check_images_and_labels

logger = logging.getLogger(__name__)

# Label names in label order, from the dataset's documentation
# (github.com/zalandoresearch/fashion-mnist, "Labels").
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Files of the dataset, as the dataset's authors, Keras and Debian name them.
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# Folder of Debian's `dataset-fashion-mnist` package.
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")

# IDX files start with two zero bytes, a type code (0x08: unsigned bytes) and the number of dimensions.
_IDX_UNSIGNED_BYTE = 0x08


def keras_cache_folder() -> Path:
    """Return the folder where keras.datasets.fashion_mnist.load_data keeps the files."""
    return keras_home() / "datasets" / "fashion-mnist"


def read_fashion_mnist(path: Path | None, *, download: bool) -> Source:
    """Read Fashion-MNIST from `path`, else from Keras' cache, else from Debian's folder, else download it.

    Each file may be gzip-compressed (`.gz`, as distributed) or not.

    Args:
        path: Folder with the four IDX files, or None to search the usual places.
        download: Whether to download through Keras when no folder has the files.

    Returns:
        The 60,000 training and 10,000 test images, uint8 (n, 28, 28).

    Raises:
        DatasetError: when `path` is missing or lacks a file, a file is corrupt,
            or the dataset is found nowhere and cannot be downloaded.
    """
    if path is not None:
        return _read_folder(_checked_folder(path))

    searched = []
    for folder in (keras_cache_folder(), DEBIAN_FOLDER):
        searched.append(str(folder))
        if not folder.is_dir():
            continue
        missing = _missing_files(folder)
        if not missing:
            return _read_folder(folder)
        logger.warning("Skipping %s because it lacks %s.", folder, ", ".join(missing))

    if not download:
        raise not_found(
            "fashion_mnist", searched,
            "Install Debian's dataset-fashion-mnist package, set path to a folder with the four IDX files, or allow download.",
        )
    download_with_keras("fashion_mnist", _keras_load_data, searched)
    return _read_folder(_checked_folder(keras_cache_folder()))


def _keras_load_data() -> None:
    import keras

    keras.datasets.fashion_mnist.load_data()


def _checked_folder(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"fashion_mnist path {str(path)!r} not found; set path to the folder with the four IDX files.")
    if not path.is_dir():
        raise DatasetError(f"fashion_mnist path {str(path)!r} is not a folder; set path to the folder with the four IDX files.")
    missing = _missing_files(path)
    if missing:
        raise DatasetError(
            f"fashion_mnist path {str(path)!r} lacks {', '.join(missing)}; "
            f"the folder must contain {', '.join(name + '.gz' for name in FILES.values())} (gzip-compressed or not)."
        )
    return path


def _missing_files(folder: Path) -> list[str]:
    return [name + ".gz" for name in FILES.values() if _file_in(folder, name) is None]


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_folder(folder: Path) -> Source:
    arrays = {}
    for key, name in FILES.items():
        file = _file_in(folder, name)
        arrays[key] = read_idx(file, dimensions=3 if key.startswith("x") else 1)

    num_classes = len(CLASS_NAMES)
    y_train = check_images_and_labels(str(folder), "train", arrays["x_train"], arrays["y_train"], num_classes)
    y_test = check_images_and_labels(str(folder), "test", arrays["x_test"], arrays["y_test"], num_classes)
    if arrays["x_test"].shape[1:] != arrays["x_train"].shape[1:]:
        raise DatasetError(
            f"{folder}: training images have shape {arrays['x_train'].shape[1:]} but test images have shape "
            f"{arrays['x_test'].shape[1:]}; both files must hold images of one size."
        )

    return Source(
        x_train=arrays["x_train"], y_train=y_train, x_test=arrays["x_test"], y_test=y_test,
        class_names=list(CLASS_NAMES), value_range=UINT8_VALUE_RANGE, location=str(folder),
    )


def read_idx(path: Path, *, dimensions: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzip-compressed when its name ends in `.gz`.

    Args:
        path: The file.
        dimensions: Expected number of dimensions: 3 for images, 1 for labels.

    Returns:
        A read-only uint8 array of the shape the header gives.

    Raises:
        DatasetError: naming the file when it cannot be read, is not an IDX
            file of unsigned bytes, or is shorter or longer than its header gives.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                content = file.read()
        else:
            content = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read the file ({error}); it is corrupt or truncated, so replace it.") from error

    header_size = 4 + 4 * dimensions
    if len(content) < header_size or content[:2] != b"\x00\x00" or content[2] != _IDX_UNSIGNED_BYTE or content[3] != dimensions:
        raise DatasetError(
            f"{path}: not an IDX file of unsigned bytes with {dimensions} dimension(s); the file is corrupt or "
            f"not part of Fashion-MNIST, so replace it."
        )

    shape = struct.unpack(f">{dimensions}I", content[4:header_size])
    payload = memoryview(content)[header_size:]
    if len(payload) != math.prod(shape):
        raise DatasetError(
            f"{path}: the header announces shape {shape} ({math.prod(shape)} bytes) but the file contains "
            f"{len(payload)} bytes; the file is truncated or corrupt, so replace it."
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)
