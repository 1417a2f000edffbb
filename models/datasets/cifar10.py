"""CIFAR-10 from its python pickle batches: a folder, the tar.gz archive, Keras' cache, or a download."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from models.datasets.dataset import DatasetError
from models.datasets.keras_cache import download_with_keras, keras_home, not_found
from models.datasets.source import UINT8_VALUE_RANGE, Source

# Label names in label order, as batches.meta of the python version lists them.
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{number}" for number in range(1, 6)]
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"

# Each row of a batch's data is one 32x32 image: 1024 red, then 1024 green, then 1024 blue values, row-major.
_IMAGE_SIDE = 32
_ROW_LENGTH = 3 * _IMAGE_SIDE * _IMAGE_SIDE

# The only globals a CIFAR-10 batch needs: numpy's array reconstruction, and
# _codecs.encode for the bytes of a protocol-2 pickle written by Python 3.
# Anything else in a file is rejected, because unpickling can run code.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never contains")
        return super().find_class(module, name)


def keras_cache_folders() -> list[Path]:
    """Return the folders where keras.datasets.cifar10.load_data leaves the batches.

    Keras 3.15 extracts into datasets/cifar-10-batches-py-target/; Keras 2 and
    early Keras 3 releases extracted straight into datasets/.
    """
    datasets = keras_home() / "datasets"
    return [datasets / "cifar-10-batches-py-target" / BATCHES_FOLDER, datasets / BATCHES_FOLDER]


def read_cifar10(path: Path | None, *, download: bool) -> Source:
    """Read CIFAR-10 from `path`, else from Keras' cache, else download it through Keras.

    Args:
        path: The `cifar-10-batches-py` folder, a folder that contains it, or
            the `cifar-10-python.tar.gz` archive; None searches Keras' cache.
        download: Whether to download through Keras when the cache has no batches.

    Returns:
        The 50,000 training and 10,000 test images, uint8 (n, 32, 32, 3).

    Raises:
        DatasetError: when `path` is missing or lacks a batch, a batch is
            corrupt, or the dataset is found nowhere and cannot be downloaded.
    """
    if path is not None:
        return _read_path(path)

    searched = []
    for folder in keras_cache_folders():
        searched.append(str(folder))
        if folder.is_dir():
            return _read_path(folder)

    if not download:
        raise not_found("cifar10", searched, "Set path to the cifar-10-batches-py folder or the cifar-10-python.tar.gz archive, or allow download.")
    download_with_keras("cifar10", _keras_load_data, searched)
    for folder in keras_cache_folders():
        if folder.is_dir():
            return _read_path(folder)
    raise DatasetError(f"Keras downloaded cifar10 but none of {', '.join(searched)} exists; set path to the extracted batches.")


def _keras_load_data() -> None:
    import keras

    keras.datasets.cifar10.load_data()


def _read_path(path: Path) -> Source:
    if not path.exists():
        raise DatasetError(
            f"cifar10 path {str(path)!r} not found; set path to the {BATCHES_FOLDER} folder or the cifar-10-python.tar.gz archive."
        )
    if path.is_file():
        return _read_archive(path)

    folder = path
    if not (folder / TRAIN_BATCHES[0]).exists() and (folder / BATCHES_FOLDER).is_dir():
        folder = folder / BATCHES_FOLDER
    missing = [name for name in [*TRAIN_BATCHES, TEST_BATCH] if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"cifar10 path {str(path)!r} lacks {', '.join(missing)}; set path to the {BATCHES_FOLDER} folder "
            f"that contains {', '.join(TRAIN_BATCHES)} and {TEST_BATCH}."
        )

    def read(name: str) -> bytes:
        try:
            return (folder / name).read_bytes()
        except OSError as error:
            raise DatasetError(f"{folder / name}: cannot read the file ({error}).") from error

    meta = read(META_FILE) if (folder / META_FILE).is_file() else None
    return _build_source({name: read(name) for name in [*TRAIN_BATCHES, TEST_BATCH]}, meta, folder)


# First bytes of gzip, bzip2 and xz files: a file that starts so but does not open as a
# tar archive is a damaged download rather than another kind of file.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _starts_compressed(path: Path) -> bool:
    """Return whether the file starts like a compressed file; True when it cannot be read, so the caller's read reports that."""
    try:
        with path.open("rb") as file:
            start = file.read(6)
    except OSError:
        return True
    return start.startswith(_COMPRESSED_MAGIC)


def _read_archive(path: Path) -> Source:
    if path.is_file() and not tarfile.is_tarfile(path) and not _starts_compressed(path):
        raise DatasetError(
            f"cifar10 path {str(path)!r} is not a tar archive; use cifar-10-python.tar.gz or the "
            f"{BATCHES_FOLDER} folder extracted from it."
        )
    try:
        with tarfile.open(path, "r:*") as archive:
            # Only the named members are read, into memory; nothing is extracted to disk.
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            missing = [name for name in [*TRAIN_BATCHES, TEST_BATCH] if name not in members]
            if missing:
                raise DatasetError(f"cifar10 archive {str(path)!r} lacks {', '.join(missing)}; use cifar-10-python.tar.gz.")
            contents = {name: archive.extractfile(members[name]).read() for name in [*TRAIN_BATCHES, TEST_BATCH]}
            meta = archive.extractfile(members[META_FILE]).read() if META_FILE in members else None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DatasetError(f"{path}: cannot read the archive ({error}); it is corrupt or truncated, so replace it.") from error
    return _build_source(contents, meta, path)


def _build_source(contents: dict[str, bytes], meta: bytes | None, location: Path) -> Source:
    train = [_parse_batch(contents[name], location / name) for name in TRAIN_BATCHES]
    x_test, y_test = _parse_batch(contents[TEST_BATCH], location / TEST_BATCH)
    class_names = _parse_meta(meta, location / META_FILE) if meta is not None else list(CLASS_NAMES)

    return Source(
        x_train=np.concatenate([images for images, _ in train]),
        y_train=np.concatenate([labels for _, labels in train]),
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
        value_range=UINT8_VALUE_RANGE,
        location=str(location),
    )


def _unpickle(content: bytes, where: Path) -> dict[str, Any]:
    try:
        # The original batches were pickled by Python 2, so their strings load as bytes.
        loaded = _ArrayUnpickler(io.BytesIO(content), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DatasetError(f"{where}: not a readable CIFAR-10 pickle batch ({error}); the file is corrupt, so replace it.") from error
    if not isinstance(loaded, dict):
        raise DatasetError(f"{where}: contains a {type(loaded).__name__}, not the dictionary of a CIFAR-10 batch; replace the file.")
    return {key.decode("utf-8") if isinstance(key, bytes) else str(key): value for key, value in loaded.items()}


def _parse_batch(content: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(content, where)
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{where}: the batch has keys {sorted(batch)} but needs 'data' and 'labels'; replace the file.")

    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        shape = getattr(data, "shape", None)
        raise DatasetError(
            f"{where}: data has shape {shape} and dtype {getattr(data, 'dtype', type(data).__name__)}; "
            f"a CIFAR-10 batch stores uint8 rows of {_ROW_LENGTH} values (32x32 RGB), shape (n, {_ROW_LENGTH})."
        )

    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{where}: the batch has {len(data)} images but labels of shape {labels.shape} and dtype {labels.dtype}; "
            f"it needs one integer label per image."
        )
    outside = np.unique(labels[(labels < 0) | (labels >= len(CLASS_NAMES))])
    if len(outside):
        raise DatasetError(
            f"{where}: labels out of range ({', '.join(str(label) for label in outside[:10])}); "
            f"CIFAR-10 labels are 0..{len(CLASS_NAMES) - 1}."
        )

    images = data.reshape(-1, 3, _IMAGE_SIDE, _IMAGE_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _parse_meta(content: bytes, where: Path) -> list[str]:
    meta = _unpickle(content, where)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES):
        raise DatasetError(f"{where}: label_names must list {len(CLASS_NAMES)} class names, got {names!r}; replace the file.")
    return [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]
