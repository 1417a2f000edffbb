"""Preprocessing that turns raw dataset images into the RGB input of a backbone."""

from __future__ import annotations

from numbers import Integral

import keras
from keras import layers


def build_preprocessing(
    raw_shape: tuple[int, ...],
    value_range: tuple[float, float],
    image_size: int,
) -> keras.Model:
    """Build the model that turns raw images into backbone input.

    It adds a channel axis to (h, w) images, rescales value_range linearly to
    [0, 1], resizes bilinearly to (image_size, image_size) and repeats a gray
    channel three times. Only built-in Keras layers are used, so a saved model
    that contains it loads with keras.models.load_model in safe mode. Bump
    PREPROCESSING_VERSION in models.cache_keys when the output for the same
    input changes, so cached weights and embeddings are not reused.

    Args:
        raw_shape: Shape of one raw image: (h, w), (h, w, 1) or (h, w, 3).
        value_range: (min, max) of the raw intensities, for example (0.0, 16.0)
            for digits. Values outside it map outside [0, 1] and are not clipped.
        image_size: Side length of the output in pixels, at least 1.

    Returns:
        A model from raw images (batch, *raw_shape) to float32
        (batch, image_size, image_size, 3).

    Raises:
        ValueError: If raw_shape, value_range or image_size is invalid.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} is invalid; expected an integer of at least 1 pixel.")
    raw_shape = tuple(int(side) for side in raw_shape)

    if len(raw_shape) == 2:
        height, width = raw_shape
        channels = 1
    elif len(raw_shape) == 3 and raw_shape[2] in (1, 3):
        height, width, channels = raw_shape
    else:
        raise ValueError(
            f"raw_shape={raw_shape} is not supported; expected (h, w) or (h, w, c) with 1 or 3 channels."
        )
    if height < 1 or width < 1:
        raise ValueError(f"raw_shape={raw_shape} is invalid; height and width must be at least 1.")

    low, high = (float(value) for value in value_range)
    if not low < high:
        raise ValueError(f"value_range={value_range} is invalid; expected (min, max) with min < max.")

    inputs = keras.Input(shape=raw_shape, dtype="float32", name="raw_image")
    images = inputs

    if len(raw_shape) == 2:
        images = layers.Reshape((height, width, 1), name="add_channel_axis")(images)

    # x -> (x - low) / (high - low), written as Rescaling's x * scale + offset.
    scale = 1.0 / (high - low)
    images = layers.Rescaling(scale=scale, offset=-low * scale, name="rescale_to_unit_range")(images)
    images = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(images)

    if channels == 1:
        images = layers.Concatenate(axis=-1, name="gray_to_rgb")([images, images, images])

    return keras.Model(inputs, images, name="preprocessing")
