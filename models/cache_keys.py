"""Cache keys and descriptions of small_cnn weights, readable without TensorFlow.

A run whose embeddings are already cached needs only their key, so the
data-preparation task can find them without importing TensorFlow. The key of
small_cnn weights depends on the constants below, so they live here too, and
models.small_cnn imports them.

Example:
    >>> from models.datasets import load_dataset
    >>> source = load_dataset("digits", classes=[0, 1, 2, 3, 4])
    >>> len(small_cnn_cache_key(32, source, epochs=3, seed=0))
    64
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.datasets import Dataset

# Bump when models.preprocessing.build_preprocessing changes its output for the same
# input, so that cached backbone weights and embeddings built on the old output are not reused.
PREPROCESSING_VERSION = "1"

# Bump when models.small_cnn.build_small_cnn changes in a way that the constants below do not show.
SMALL_CNN_VERSION = "1"

# Output channels of the three convolution blocks. The last one is the embedding size.
SMALL_CNN_FILTERS = (32, 64, 128)
SMALL_CNN_KERNEL_SIZE = 3

# Settings of the pretraining run on the source dataset. They enter the cache
# key, so changing one retrains instead of reusing old weights.
PRETRAIN_BATCH_SIZE = 64
PRETRAIN_OPTIMIZER = "adam"
PRETRAIN_LEARNING_RATE = 1e-3


def hash_description(description: dict) -> str:
    """Hash a JSON-serializable description with sha256, independent of key order."""
    encoded = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


def small_cnn_cache_key(image_size: int, source: Dataset, epochs: int, seed: int) -> str:
    """Compute the cache key of small_cnn weights pretrained on a source dataset.

    Args:
        image_size: Input side length in pixels.
        source: Dataset the CNN is pretrained on.
        epochs: Number of pretraining epochs.
        seed: Keras global seed of the pretraining run.

    Returns:
        A sha256 hex digest over the architecture (with SMALL_CNN_VERSION and
        PREPROCESSING_VERSION), image size, source fingerprint, epochs, seed,
        batch size and optimizer settings.
    """
    description = {
        "architecture": _small_cnn_description(),
        "image_size": int(image_size),
        "weights": "pretrained",
        "source": source.fingerprint(),
        "epochs": int(epochs),
        "seed": int(seed),
        "batch_size": PRETRAIN_BATCH_SIZE,
        "batch_norm_statistics": "recomputed on the source training images",
        "optimizer": {"name": PRETRAIN_OPTIMIZER, "learning_rate": PRETRAIN_LEARNING_RATE},
    }
    return hash_description(description)


def random_small_cnn_cache_key(image_size: int, seed: int) -> str:
    """Compute the weights key of a small_cnn with seeded random weights.

    Args:
        image_size: Input side length in pixels.
        seed: Keras global seed set before building the CNN.

    Returns:
        A sha256 hex digest over the architecture, image size and seed.
    """
    description = {
        "architecture": _small_cnn_description(),
        "image_size": int(image_size),
        "weights": "none",
        "seed": int(seed),
    }
    return hash_description(description)


def pretrained_small_cnn_description(epochs: int, num_classes: int, *, from_cache: bool) -> str:
    """Describe pretrained small_cnn weights in one line for logs and reports."""
    origin = "loaded from the cache" if from_cache else "pretrained in this run"
    return f"small_cnn pretrained for {epochs} epochs on {num_classes} source classes ({origin})"


def random_small_cnn_description(seed: int) -> str:
    """Describe small_cnn weights with seeded random values in one line for logs and reports."""
    return f"small_cnn with random weights (seed {seed})"


def small_cnn_weights_path(cache_dir: Path, key: str) -> Path:
    """Return where pretrained small_cnn weights with this key are cached."""
    return Path(cache_dir) / "backbones" / f"small_cnn-{key}.weights.h5"


def _small_cnn_description() -> dict:
    return {
        "name": "small_cnn",
        "version": SMALL_CNN_VERSION,
        "filters": list(SMALL_CNN_FILTERS),
        "kernel_size": SMALL_CNN_KERNEL_SIZE,
        "preprocessing_version": PREPROCESSING_VERSION,
    }
