"""The small CNN backbone: architecture, seeded random init and cached pretraining.

Example:
    >>> from pathlib import Path
    >>> from models.datasets import load_dataset
    >>> source = load_dataset("digits", classes=[0, 1, 2, 3, 4])
    >>> cnn, cache_hit = pretrain_small_cnn(32, source, epochs=3, seed=0, cache_dir=Path("cache"))
    >>> cnn.output_shape
    (None, 128)
"""

from __future__ import annotations

import logging
import os
import tempfile
from numbers import Integral
from pathlib import Path

import keras
import numpy as np
from keras import layers

from models.cache_keys import (
    PRETRAIN_BATCH_SIZE,
    PRETRAIN_LEARNING_RATE,
    PRETRAIN_OPTIMIZER,
    SMALL_CNN_FILTERS,
    SMALL_CNN_KERNEL_SIZE,
    random_small_cnn_cache_key,
    small_cnn_cache_key,
    small_cnn_weights_path,
)
from models.datasets import Dataset
from models.preprocessing import build_preprocessing

logger = logging.getLogger(__name__)

# Two 2x2 max-pooling steps halve the image twice, so 8 pixels leave a 2x2 map
# for the last block. Smaller images lose almost all spatial structure.
MIN_IMAGE_SIZE = 8

# Images per forward pass when the BatchNormalization statistics are recomputed
# after pretraining. It only changes memory use, not the result.
STATISTICS_BATCH_SIZE = 256


def build_small_cnn(image_size: int) -> keras.Model:
    """Build the small CNN backbone with fresh random weights.

    Bump SMALL_CNN_VERSION in models.cache_keys when this changes in a way
    that the constants there do not show, so cached weights are not reused.

    Three blocks of 3x3 convolution, BatchNormalization and ReLU, with 2x2 max
    pooling after the first two, then global average pooling. The weights depend
    on Keras' global seed; call keras.utils.set_random_seed first to repeat them.

    Args:
        image_size: Side length of the square RGB input in pixels, at least
            MIN_IMAGE_SIZE.

    Returns:
        A model from (batch, image_size, image_size, 3) in [0, 1] to a float32
        embedding (batch, SMALL_CNN_FILTERS[-1]).

    Raises:
        ValueError: If image_size is invalid.
    """
    _validate_image_size(image_size)

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    features = inputs

    for block, filters in enumerate(SMALL_CNN_FILTERS, start=1):
        # The bias is redundant because BatchNormalization adds its own offset.
        features = layers.Conv2D(
            filters,
            SMALL_CNN_KERNEL_SIZE,
            padding="same",
            use_bias=False,
            name=f"block{block}_conv",
        )(features)
        features = layers.BatchNormalization(name=f"block{block}_bn")(features)
        features = layers.ReLU(name=f"block{block}_relu")(features)

        if block < len(SMALL_CNN_FILTERS):
            features = layers.MaxPooling2D(2, name=f"block{block}_pool")(features)

    embedding = layers.GlobalAveragePooling2D(name="embedding")(features)
    return keras.Model(inputs, embedding, name="small_cnn")


def build_random_small_cnn(image_size: int, seed: int) -> keras.Model:
    """Set Keras' global seed and build the small CNN with random weights.

    Args:
        image_size: Side length of the square RGB input in pixels, at least
            MIN_IMAGE_SIZE.
        seed: Value passed to keras.utils.set_random_seed, in 0..2**32-1. The
            same seed gives the same weights.

    Returns:
        The CNN, as from build_small_cnn.

    Raises:
        ValueError: If image_size or seed is invalid.
    """
    _validate_image_size(image_size)
    _validate_seed(seed)

    keras.utils.set_random_seed(seed)
    return build_small_cnn(image_size)


def pretrain_small_cnn(
    image_size: int,
    source: Dataset,
    *,
    epochs: int,
    seed: int,
    cache_dir: Path,
) -> tuple[keras.Model, bool]:
    """Pretrain the small CNN on a source dataset, or load it from the cache.

    On a cache miss this sets Keras' global seed, trains preprocessing + CNN +
    a softmax layer on source.x_train, and stores the CNN weights at
    cache_dir/"backbones"/"small_cnn-{key}.weights.h5". The file is written
    under a temporary name and renamed, so a crash never leaves a partial file.
    On a hit it builds the CNN and loads that file without training.

    Args:
        image_size: Input side length in pixels, at least MIN_IMAGE_SIZE.
        source: Dataset to pretrain on, with at least 2 classes.
        epochs: Pretraining epochs, at least 1.
        seed: Keras global seed (keras.utils.set_random_seed) for the run.
        cache_dir: Root of the cache; the "backbones" folder is created if missing.

    Returns:
        (the CNN with pretrained weights, whether the weights came from the cache).

    Raises:
        ValueError: If image_size, epochs or seed is invalid, or the cached
            file cannot be loaded.
    """
    _validate_image_size(image_size)
    _validate_positive_int("epochs", epochs)
    _validate_seed(seed)

    key = small_cnn_cache_key(image_size, source, epochs, seed)
    weights_path = small_cnn_weights_path(cache_dir, key)

    if weights_path.exists():
        cnn = build_small_cnn(image_size)
        try:
            cnn.load_weights(weights_path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cached backbone weights {weights_path} could not be loaded: {error}. "
                f"Delete the file to pretrain again."
            ) from error
        logger.info("Reused pretrained small_cnn weights from %s.", weights_path)
        return cnn, True

    logger.info(
        "Pretraining small_cnn (image size %d, %d epochs, seed %d) on %d images of %d classes.",
        image_size,
        epochs,
        seed,
        len(source.y_train),
        source.num_classes,
    )
    cnn = _train_small_cnn(image_size, source, epochs=epochs, seed=seed)

    _save_weights_atomically(cnn, weights_path)
    logger.info("Stored pretrained small_cnn weights at %s.", weights_path)
    return cnn, False


def _train_small_cnn(image_size: int, source: Dataset, *, epochs: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)

    preprocessing = build_preprocessing(source.raw_shape, source.value_range, image_size)
    cnn = build_small_cnn(image_size)

    inputs = keras.Input(shape=source.raw_shape, dtype="float32", name="raw_image")
    embeddings = cnn(preprocessing(inputs))
    probabilities = layers.Dense(source.num_classes, activation="softmax", name="source_classes")(embeddings)
    model = keras.Model(inputs, probabilities, name="small_cnn_pretraining")

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=PRETRAIN_LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        source.x_train,
        source.y_train,
        batch_size=PRETRAIN_BATCH_SIZE,
        epochs=epochs,
        validation_data=(source.x_val, source.y_val),
        verbose=0,
    )

    # The frozen backbone runs BatchNormalization in inference mode, on the
    # moving averages kept during training. Those lag behind the weights: at
    # Keras' default momentum of 0.99, 70% of the initial values remain after
    # 36 steps (3 epochs on 720 images). So they are replaced by the exact
    # statistics of the final weights on the source training images.
    _recompute_batch_norm_statistics(cnn, preprocessing, source.x_train)
    _, source_val_accuracy = model.evaluate(source.x_val, source.y_val, batch_size=STATISTICS_BATCH_SIZE, verbose=0)

    logger.info(
        "Pretrained small_cnn for %d epochs: source training accuracy %.4f (batch statistics), "
        "source validation accuracy %.4f (recomputed moving statistics).",
        epochs,
        history.history["accuracy"][-1],
        source_val_accuracy,
    )
    return cnn


def _recompute_batch_norm_statistics(cnn: keras.Model, preprocessing: keras.Model, raw_images: np.ndarray) -> None:
    # One layer at a time, because each layer's input depends on the
    # statistics of the layers before it.
    for layer in cnn.layers:
        if not isinstance(layer, layers.BatchNormalization):
            continue

        probe = keras.Model(cnn.input, layer.input)
        total = np.zeros(layer.moving_mean.shape, dtype=np.float64)
        total_of_squares = np.zeros(layer.moving_mean.shape, dtype=np.float64)
        count = 0

        for start in range(0, len(raw_images), STATISTICS_BATCH_SIZE):
            images = preprocessing(raw_images[start : start + STATISTICS_BATCH_SIZE], training=False)
            activations = np.asarray(probe(images, training=False))
            activations = activations.astype(np.float64).reshape(-1, activations.shape[-1])
            total += activations.sum(axis=0)
            total_of_squares += np.square(activations).sum(axis=0)
            count += len(activations)

        mean = total / count
        # Keras normalizes with the biased variance of the batch in training mode.
        variance = np.maximum(total_of_squares / count - np.square(mean), 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))


def _save_weights_atomically(cnn: keras.Model, weights_path: Path) -> None:
    weights_path.parent.mkdir(parents=True, exist_ok=True)

    # Keras requires the ".weights.h5" suffix. The temporary file lives in the
    # same folder so that os.replace is an atomic rename on one file system.
    file_descriptor, temporary_name = tempfile.mkstemp(
        dir=weights_path.parent,
        prefix=f".{weights_path.name}.",
        suffix=".tmp.weights.h5",
    )
    os.close(file_descriptor)

    try:
        cnn.save_weights(temporary_name)
        os.replace(temporary_name, weights_path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def _validate_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r} is invalid; expected an integer of at least {MIN_IMAGE_SIZE} pixels.")


def _validate_positive_int(argument: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{argument}={value!r} is invalid; expected an integer of at least 1.")


def _validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid; expected an integer in 0..2**32-1.")
