"""Classify image files with a model exported by a run (`best_model.keras`).

The exported model takes images in its dataset's raw form: the shape and the
intensity range stored in its metadata (for digits, 8x8 arrays of 0-16). An
image file is converted to that form here: to grayscale or RGB as the shape
requires, resized to the raw height and width, and its 0-255 pixel values
mapped linearly onto the raw intensity range.

Example:
    >>> predictions = classify(Path("runs/quickstart/best_model.keras"), [Path("seven.png")], top=3)
    >>> predictions[0]["top"][0]["class"]
    '7'
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.datasets import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Images are classified in batches of this many, so a large folder never sits in memory twice.
BATCH_SIZE = 256


class PredictError(ValueError):
    """A model or image that cannot be used; the message names the file and the fix."""


def collect_images(paths: list[Path]) -> list[Path]:
    """Expand folders into the image files below them, sorted, and check that every file exists.

    Raises:
        PredictError: for a missing path, a file that is not an image, or no images at all.
    """
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(child for child in path.rglob("*") if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise PredictError(f"folder {str(path)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise PredictError(f"{str(path)!r} is not an image file; pass files ending in {', '.join(IMAGE_EXTENSIONS)} or a folder")
            images.append(path)
        else:
            raise PredictError(f"image or folder {str(path)!r} not found")
    if not images:
        raise PredictError("no images given; pass image files or folders")
    return images


def load_image(path: Path, raw_shape: tuple[int, ...], value_range: tuple[float, float]) -> np.ndarray:
    """Read one image file and convert it to the model's raw input form (float32, `raw_shape`).

    Files are decoded exactly as image_folder datasets decode theirs
    (models.datasets.read_image), so a model sees new files as it saw its
    training images.

    Raises:
        PredictError: when the file cannot be decoded or the model expects a channel count other than 1 or 3.
    """
    from models.datasets import DatasetError, read_image

    channels = raw_shape[2] if len(raw_shape) == 3 else 1
    if channels not in (1, 3):
        raise PredictError(f"the model expects {channels} channels per pixel; predict reads grayscale (1) and RGB (3) images only")
    try:
        pixels = read_image(path, size=(raw_shape[0], raw_shape[1]), color_mode="grayscale" if channels == 1 else "rgb")
    except DatasetError as error:
        raise PredictError(str(error)) from None

    low, high = value_range
    raw = low + pixels.astype(np.float32) / 255.0 * (high - low)
    return raw.reshape(raw_shape)


def classify(model_path: Path, images: list[Path], top: int) -> list[dict[str, Any]]:
    """Return, per image, its `top` most probable classes: `{"path", "top": [{"class", "index", "probability"}]}`.

    Every image is read before anything is returned, so a bad file stops the
    command before any output.

    Raises:
        PredictError: for a missing or foreign model file, a bad image, or `top` < 1.
    """
    import keras

    from models.classifier import read_model_metadata

    if top < 1:
        raise PredictError(f"--top must be at least 1, got {top}")
    try:
        metadata = read_model_metadata(model_path)
    except (FileNotFoundError, ValueError) as error:
        raise PredictError(f"{error} Pass the best_model.keras file of a frozen-tune run.") from None
    class_names = metadata["class_names"]
    raw_shape = tuple(metadata["raw_shape"])
    value_range = tuple(metadata["value_range"])

    arrays = np.stack([load_image(path, raw_shape, value_range) for path in images])
    model = keras.models.load_model(model_path)
    probabilities = np.concatenate([
        model.predict(arrays[start:start + BATCH_SIZE], verbose=0) for start in range(0, len(arrays), BATCH_SIZE)
    ])

    count = min(top, len(class_names))
    predictions = []
    for path, row in zip(images, probabilities):
        order = np.argsort(row)[::-1][:count]
        predictions.append({
            "path": str(path),
            "top": [{"class": class_names[index], "index": int(index), "probability": float(row[index])} for index in order],
        })
    return predictions


def format_prediction(prediction: dict[str, Any]) -> str:
    """Format one prediction as `path: 7 0.981, 9 0.010, 5 0.004`."""
    ranked = ", ".join(f"{entry['class']} {entry['probability']:.3f}" for entry in prediction["top"])
    return f"{prediction['path']}: {ranked}"
