"""Embeddings of a dataset under a frozen feature extractor, and their on-disk cache.

Each cache entry is a folder cache_dir/embeddings/{key}/ with train.npy,
val.npy and manifest.json. extract_embeddings writes the .npy files batch by
batch through memory maps, so a dataset's embeddings are never held in memory
twice, and readers get memory-mapped arrays back.

Example:
    >>> key = embedding_cache_key(backbone.weights_key, dataset, 32, PREPROCESSING_VERSION)
    >>> embeddings = load_cached_embeddings(cache_dir, key)
    >>> if embeddings is None:
    ...     embeddings = extract_embeddings(extractor, dataset, cache_dir, key)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.backbone_specs import FLOAT32
from models.datasets import Dataset

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

# Errors that reading a damaged cache entry raises: missing or truncated files, a broken manifest.
UNREADABLE_ENTRY_ERRORS = (OSError, KeyError, TypeError, ValueError)

# Keys become folder names, so they may not contain path separators.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")

EMBEDDINGS_FOLDER = "embeddings"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")

# Images per forward pass. It only changes memory use and speed, because the
# extractor runs in inference mode.
DEFAULT_BATCH_SIZE = 256

# Seconds between two progress lines while embeddings are extracted.
DEFAULT_LOG_INTERVAL_SECONDS = 30.0

def embedding_cache_key(
    extractor_weights_key: str,
    dataset: Dataset,
    image_size: int,
    preprocessing_version: str,
    precision: str = FLOAT32,
) -> str:
    """Compute the cache key of a dataset's embeddings.

    Args:
        extractor_weights_key: Key of the backbone, for example
            models.backbones.Backbone.weights_key, which covers the
            architecture, the weights (a digest of their values or of the
            weights file), the cut layer and the backbone's input conversion.
        dataset: Dataset whose images are embedded.
        image_size: Side length the images are resized to, in pixels.
        preprocessing_version: models.backbones.PREPROCESSING_VERSION.
        precision: Precision the extractor computes in, "float32" or
            "mixed_float16". Float32 keys are the same as before the
            precision existed, so earlier cache entries stay valid.

    Returns:
        A sha256 hex digest that changes when any argument changes.
    """
    description = {
        "extractor_weights_key": extractor_weights_key,
        "dataset": dataset.fingerprint(),
        "image_size": int(image_size),
        "preprocessing_version": preprocessing_version,
    }
    if precision != FLOAT32:
        description["precision"] = precision
    encoded = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


# eq=False because comparing arrays field by field has no single truth value.
@dataclass(frozen=True, eq=False)
class Embeddings:
    """Embeddings of the training and validation images of one dataset.

    Attributes:
        train: float32 (n_train, D), row i embeds dataset.x_train[i].
        val: float32 (n_val, D), row i embeds dataset.x_val[i].

    Example:
        >>> Embeddings(train=np.zeros((4, 128), np.float32), val=np.zeros((2, 128), np.float32)).dimension
        128
    """

    train: np.ndarray
    val: np.ndarray

    def __post_init__(self) -> None:
        for split, array in (("train", self.train), ("val", self.val)):
            if array.ndim != 2:
                raise ValueError(f"Embeddings.{split} has shape {array.shape}; expected 2 axes (images, D).")
            if array.dtype != np.float32:
                raise ValueError(f"Embeddings.{split} has dtype {array.dtype}; convert it with .astype(np.float32).")

        if self.train.shape[1] != self.val.shape[1]:
            raise ValueError(
                f"Embeddings.train has dimension {self.train.shape[1]} but Embeddings.val has "
                f"{self.val.shape[1]}; embed both parts with the same extractor."
            )

    @property
    def dimension(self) -> int:
        """Embedding size D."""
        return int(self.train.shape[1])


def compute_embeddings(
    extractor: keras.Model,
    images: np.ndarray,
    batch_size: int = DEFAULT_BATCH_SIZE,
    out: np.ndarray | None = None,
    progress: ExtractionProgress | None = None,
) -> np.ndarray:
    """Run the feature extractor over images in batches, writing each batch into out.

    Only one batch of images, converted to float32, and its embeddings are in
    memory at a time besides out. The last batch is padded to the common batch
    size, so the compiled prediction function is traced once.

    Args:
        extractor: Model from (batch, *raw_shape) to (batch, D), for example
            from models.backbones.build_feature_extractor.
        images: Raw images (n, *raw_shape), exactly as the dataset provides them,
            of any numeric dtype.
        batch_size: Images per forward pass, at least 1. Default DEFAULT_BATCH_SIZE.
        out: float32 (n, D) array to fill, for example a memory-mapped .npy
            file. None allocates one.
        progress: Progress that is advanced after every batch.

    Returns:
        out, filled with float32 embeddings (n, D). n may be 0.

    Raises:
        ValueError: If the image shape does not match the extractor input,
            batch_size is invalid, or out has the wrong shape or dtype.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected an integer of at least 1.")

    expected_shape = tuple(extractor.input_shape[1:])
    if tuple(images.shape[1:]) != expected_shape:
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])} per image but the extractor expects "
            f"{expected_shape}; build the extractor with the dataset's raw shape."
        )

    count = len(images)
    dimension = int(extractor.output_shape[-1])
    if out is None:
        out = np.empty((count, dimension), dtype=np.float32)
    elif out.shape != (count, dimension) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}; expected float32 {(count, dimension)}.")

    step = min(int(batch_size), count)
    for start in range(0, count, max(step, 1)):
        batch = np.asarray(images[start : start + step], dtype=np.float32)
        filled = len(batch)
        if filled < step:
            padding = np.zeros((step - filled, *batch.shape[1:]), dtype=np.float32)
            batch = np.concatenate([batch, padding])

        embeddings = extractor.predict_on_batch(batch)
        out[start : start + filled] = np.asarray(embeddings, dtype=np.float32)[:filled]
        if progress is not None:
            progress.advance(filled)

    return out


class ExtractionProgress:
    """Log how many images are embedded, at most once per interval and at the end.

    Example:
        >>> progress = ExtractionProgress(total=70000, interval_seconds=30.0)
        >>> progress.advance(256)
    """

    def __init__(self, total: int, interval_seconds: float = DEFAULT_LOG_INTERVAL_SECONDS) -> None:
        self.total = int(total)
        self.done = 0
        self._interval = float(interval_seconds)
        self._started = time.monotonic()
        self._last_logged = self._started

    def advance(self, count: int) -> None:
        """Count embedded images and log a line when the interval has passed."""
        self.done += int(count)
        now = time.monotonic()
        if now - self._last_logged < self._interval and self.done < self.total:
            return

        self._last_logged = now
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        logger.info(
            "Embedded %d of %d images (%.0f%%), %.0f images/s, about %.0f s left.",
            self.done, self.total, 100.0 * self.done / max(self.total, 1), rate, remaining,
        )


def extract_embeddings(
    extractor: keras.Model,
    dataset: Dataset,
    cache_dir: Path,
    key: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log_interval_seconds: float = DEFAULT_LOG_INTERVAL_SECONDS,
    description: dict[str, Any] | None = None,
) -> Embeddings:
    """Embed a dataset's training and validation images straight into the cache.

    The .npy files are created at their full size in a temporary folder next
    to the entry and filled batch by batch through memory maps. The folder is
    renamed onto the entry when both parts are complete, so readers never see
    a partial entry. If another process stored the same key meanwhile, its
    entry is kept and this one discarded.

    Args:
        extractor: Model from (batch, *dataset.raw_shape) to (batch, D).
        dataset: Dataset whose x_train and x_val are embedded.
        cache_dir: Root of the cache; the "embeddings" folder is created if missing.
        key: Key from embedding_cache_key.
        batch_size: Images per forward pass. Default DEFAULT_BATCH_SIZE.
        log_interval_seconds: Seconds between progress lines; 0 logs every batch.
        description: Extra JSON-serializable facts stored in the manifest,
            for example the backbone's description.

    Returns:
        The stored Embeddings, as read-only memory maps of the cache files.

    Raises:
        ValueError: If the key is invalid or the images do not fit the extractor.
    """
    path = embeddings_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    dimension = int(extractor.output_shape[-1])
    parts = {"train": dataset.x_train, "val": dataset.x_val}
    progress = ExtractionProgress(sum(len(images) for images in parts.values()), log_interval_seconds)
    logger.info(
        "Extracting %d-dimensional embeddings of %d images into %s (batches of %d).",
        dimension, progress.total, path, batch_size,
    )

    staging = _new_staging_folder(path)
    try:
        for split, images in parts.items():
            array = np.lib.format.open_memmap(
                staging / f"{split}.npy", mode="w+", dtype=np.float32, shape=(len(images), dimension),
            )
            compute_embeddings(extractor, images, batch_size=batch_size, out=array, progress=progress)
            array.flush()
            del array

        _write_manifest(staging, key, dimension, {split: len(images) for split, images in parts.items()}, description)
        # A readable entry that another process stored meanwhile contains the same numbers and is kept.
        # An unreadable one, for example with a damaged file, is replaced.
        _move_into_place(staging, path, replace=path.exists() and not _entry_readable(path))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    embeddings = _read_entry(path)
    logger.info(
        "Stored embeddings at %s (%d training, %d validation, %.1f MB).",
        path, len(embeddings.train), len(embeddings.val), cache_entry_size(path) / 1e6,
    )
    return embeddings


def load_cached_embeddings(cache_dir: Path, key: str) -> Embeddings | None:
    """Load embeddings stored by extract_embeddings or save_embeddings.

    Args:
        cache_dir: Root of the cache.
        key: Key from embedding_cache_key.

    Returns:
        The Embeddings as read-only memory maps, or None when the entry
        cache_dir/"embeddings"/key is missing or unreadable. An unreadable
        entry is logged and left in place, and the next store replaces it.

    Raises:
        ValueError: If the key contains characters other than letters, digits, "_", "." and "-".
    """
    path = embeddings_path(cache_dir, key)
    if not path.is_dir():
        logger.info("No cached embeddings at %s.", path)
        return None

    try:
        embeddings = _read_entry(path)
    except UNREADABLE_ENTRY_ERRORS as error:
        logger.warning("Ignoring unreadable cached embeddings at %s: %s", path, error)
        return None

    logger.info(
        "Reused cached embeddings from %s (%d training, %d validation, dimension %d, %.1f MB).",
        path,
        len(embeddings.train),
        len(embeddings.val),
        embeddings.dimension,
        cache_entry_size(path) / 1e6,
    )
    return embeddings


def save_embeddings(cache_dir: Path, key: str, embeddings: Embeddings) -> Path:
    """Store embeddings that are already in memory as the cache entry cache_dir/"embeddings"/key.

    The entry is written under a temporary name in the same folder and
    renamed, so readers never see a partial entry. An existing entry is replaced.

    Args:
        cache_dir: Root of the cache; the "embeddings" folder is created if missing.
        key: Key from embedding_cache_key.
        embeddings: Embeddings to store.

    Returns:
        Path of the entry's folder.

    Raises:
        ValueError: If the key contains characters other than letters, digits, "_", "." and "-".
    """
    path = embeddings_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)

    staging = _new_staging_folder(path)
    try:
        for split in SPLITS:
            np.save(staging / f"{split}.npy", getattr(embeddings, split), allow_pickle=False)
        counts = {split: len(getattr(embeddings, split)) for split in SPLITS}
        _write_manifest(staging, key, embeddings.dimension, counts, None)
        _move_into_place(staging, path, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("Stored embeddings at %s (%.1f MB).", path, cache_entry_size(path) / 1e6)
    return path


def embeddings_path(cache_dir: Path, key: str) -> Path:
    """Return the folder of a cache entry.

    Raises:
        ValueError: If the key contains characters other than letters, digits, "_", "." and "-".
    """
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"Embedding cache key {key!r} is invalid; use embedding_cache_key, which returns a hex digest."
        )
    return Path(cache_dir) / EMBEDDINGS_FOLDER / key


def cache_entry_size(path: Path) -> int:
    """Return the total size in bytes of the files in a cache entry's folder."""
    return sum(entry.stat().st_size for entry in Path(path).iterdir() if entry.is_file())


def _new_staging_folder(path: Path) -> Path:
    """Create the temporary folder an entry is written in, after removing those abandoned by killed processes.

    The folder's name carries the host and process ID of its writer. A folder
    of this host whose process is gone was left by a writer that was killed
    before it could clean up (SIGKILL, out of memory) and can hold hundreds of
    megabytes. Folders of other hosts sharing the cache are left alone.
    """
    host = socket.gethostname()
    for folder in path.parent.glob(f".{path.name}.*.tmp"):
        # The name is ".{key}.{host}-{pid}.{random}.tmp", and host names may contain dots.
        owner = folder.name.removeprefix(f".{path.name}.").removesuffix(".tmp").rpartition(".")[0]
        owner_host, _, owner_pid = owner.rpartition("-")
        if owner_host == host and owner_pid.isdigit() and not _process_exists(int(owner_pid)):
            logger.info("Removing %s, left by process %s, which no longer runs.", folder, owner_pid)
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{host}-{os.getpid()}.", suffix=".tmp"))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True


def _read_entry(path: Path) -> Embeddings:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    arrays = {split: np.load(path / f"{split}.npy", mmap_mode="r", allow_pickle=False) for split in SPLITS}
    for split in SPLITS:
        expected = (int(manifest["counts"][split]), int(manifest["dimension"]))
        if arrays[split].shape != expected:
            raise ValueError(f"{split}.npy has shape {arrays[split].shape} but the manifest says {expected}")
    return Embeddings(train=arrays["train"], val=arrays["val"])


def _write_manifest(folder: Path, key: str, dimension: int, counts: dict[str, int], description: dict | None) -> None:
    manifest = {"key": key, "dimension": int(dimension), "dtype": "float32", "counts": counts}
    if description:
        manifest["description"] = description
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def _entry_readable(path: Path) -> bool:
    """Return whether the cache entry at `path` reads without error."""
    try:
        _read_entry(path)
    except UNREADABLE_ENTRY_ERRORS:
        return False
    return True


def _move_into_place(staging: Path, path: Path, *, replace: bool) -> None:
    # mkdtemp creates the folder readable by its owner only; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)

    if path.exists() and replace:
        # A rename onto a non-empty folder fails, so the old entry is first
        # renamed out of the way and deleted once the new one is in place.
        retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, retired / path.name)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
        return

    try:
        os.replace(staging, path)
    except OSError:
        if not path.exists():
            raise
        # Another process stored the same key first, and its entry contains the same numbers.
        logger.info("Another process stored embeddings at %s meanwhile; keeping those.", path)
        shutil.rmtree(staging, ignore_errors=True)
