"""Keras' dataset cache folder, and downloads through Keras as the last resort."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from models.datasets.dataset import DatasetError

logger = logging.getLogger(__name__)


def keras_home() -> Path:
    """Return the folder Keras caches downloads in.

    Keras 3 uses $KERAS_HOME when it is set, else ~/.keras, and /tmp/.keras when
    the home folder is not writable (keras/src/backend/config.py).
    """
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    if not os.access(home, os.W_OK):
        return Path("/tmp/.keras")
    return home / ".keras"


def download_with_keras(dataset: str, load_data: Callable[[], object], searched: list[str]) -> None:
    """Download a dataset into Keras' cache with Keras' own `load_data`.

    Args:
        dataset: The dataset's name, for messages.
        load_data: A function that imports Keras and calls its `load_data`.
        searched: The places already searched, listed in the error.

    Raises:
        DatasetError: when the download fails, listing where the files may be put instead.
    """
    logger.info("%s not found in %s; downloading it with Keras into %s.", dataset, ", ".join(searched), keras_home() / "datasets")
    try:
        load_data()
    # Keras' get_file raises a bare Exception for network errors (keras/src/utils/file_utils.py).
    except Exception as error:  # noqa: BLE001
        raise DatasetError(
            f"{dataset} was not found in {', '.join(searched)} and the download failed ({error}). "
            f"Copy the files to one of those folders or set the dataset's path."
        ) from error


def not_found(dataset: str, searched: list[str], hint: str) -> DatasetError:
    """Build the error for a dataset found nowhere while downloads are off."""
    return DatasetError(
        f"{dataset} was not found in {', '.join(searched)} and download is off. {hint}"
    )
