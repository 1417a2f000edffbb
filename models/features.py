"""Embeddings of a dataset under a frozen feature extractor, and their on-disk cache.

Example:
    >>> key = embedding_cache_key(backbone.weights_key, dataset, 32, PREPROCESSING_VERSION)
    >>> embeddings = load_cached_embeddings(cache_dir, key)
    >>> if embeddings is None:
    ...     embeddings = Embeddings(
    ...         train=compute_embeddings(extractor, dataset.x_train),
    ...         val=compute_embeddings(extractor, dataset.x_val),
    ...     )
    ...     save_embeddings(cache_dir, key, embeddings)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import keras
import numpy as np

from models.datasets import Dataset

logger = logging.getLogger(__name__)

# Keys become file names, so they may not contain path separators.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


def embedding_cache_key(
    extractor_weights_key: str,
    dataset: Dataset,
    image_size: int,
    preprocessing_version: str,
) -> str:
    """Compute the cache key of a dataset's embeddings.

    Args:
        extractor_weights_key: Key of the backbone weights, for example
            models.backbones.Backbone.weights_key.
        dataset: Dataset whose images are embedded.
        image_size: Side length the images are resized to, in pixels.
        preprocessing_version: models.backbones.PREPROCESSING_VERSION.

    Returns:
        A sha256 hex digest that changes when any argument changes.
    """
    description = {
        "extractor_weights_key": extractor_weights_key,
        "dataset": dataset.fingerprint(),
        "image_size": int(image_size),
        "preprocessing_version": preprocessing_version,
    }
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


def compute_embeddings(extractor: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the feature extractor over images in batches.

    Args:
        extractor: Model from (batch, *raw_shape) to (batch, D), for example
            from models.backbones.build_feature_extractor.
        images: Raw images (n, *raw_shape), exactly as the dataset provides them.
        batch_size: Images per forward pass, at least 1. Default 256. It only
            changes memory use, because the extractor runs in inference mode.

    Returns:
        float32 embeddings (n, D). n may be 0.

    Raises:
        ValueError: If the image shape does not match the extractor input or
            batch_size is invalid.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected an integer of at least 1.")

    expected_shape = tuple(extractor.input_shape[1:])
    if tuple(images.shape[1:]) != expected_shape:
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])} per image but the extractor expects "
            f"{expected_shape}; build the extractor with the dataset's raw shape."
        )

    if len(images) == 0:
        return np.zeros((0, extractor.output_shape[-1]), dtype=np.float32)

    embeddings = extractor.predict(np.asarray(images, dtype=np.float32), batch_size=int(batch_size), verbose=0)
    return np.asarray(embeddings, dtype=np.float32)


def load_cached_embeddings(cache_dir: Path, key: str) -> Embeddings | None:
    """Load embeddings stored by save_embeddings.

    Args:
        cache_dir: Root of the cache.
        key: Key from embedding_cache_key.

    Returns:
        The Embeddings, or None when cache_dir/"embeddings"/"{key}.npz" is
        missing or unreadable. An unreadable file is logged and left in place,
        and the next save_embeddings call replaces it.

    Raises:
        ValueError: If the key contains characters other than letters, digits, "_", "." and "-".
    """
    path = _embeddings_path(cache_dir, key)
    if not path.exists():
        logger.info("No cached embeddings at %s.", path)
        return None

    try:
        with np.load(path, allow_pickle=False) as stored:
            embeddings = Embeddings(train=stored["train"], val=stored["val"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        logger.warning("Ignoring unreadable cached embeddings at %s: %s", path, error)
        return None

    logger.info(
        "Reused cached embeddings from %s (%d training, %d validation, dimension %d).",
        path,
        len(embeddings.train),
        len(embeddings.val),
        embeddings.dimension,
    )
    return embeddings


def save_embeddings(cache_dir: Path, key: str, embeddings: Embeddings) -> Path:
    """Store embeddings at cache_dir/"embeddings"/"{key}.npz".

    The file is written under a temporary name in the same folder and renamed,
    so readers never see a partial file. An existing file is replaced.

    Args:
        cache_dir: Root of the cache; the "embeddings" folder is created if missing.
        key: Key from embedding_cache_key.
        embeddings: Embeddings to store.

    Returns:
        Path of the stored file.

    Raises:
        ValueError: If the key contains characters other than letters, digits, "_", "." and "-".
    """
    path = _embeddings_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)

    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".npz.tmp")
    try:
        with os.fdopen(file_descriptor, "wb") as file:
            np.savez(file, train=embeddings.train, val=embeddings.val)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise

    size_mb = path.stat().st_size / 1e6
    logger.info("Stored embeddings at %s (%.2f MB).", path, size_mb)
    return path


def _embeddings_path(cache_dir: Path, key: str) -> Path:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"Embedding cache key {key!r} is invalid; use embedding_cache_key, which returns a hex digest."
        )
    return Path(cache_dir) / "embeddings" / f"{key}.npz"
