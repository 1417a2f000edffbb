"""Any saved Keras model as a frozen backbone, cut at one of its layers and pooled to a vector.

Example:
    >>> backbone = load_saved_model_backbone(Path("team_model.keras"), layer="embedding")
    >>> backbone.cnn.output_shape
    (None, 256)
"""

from __future__ import annotations

import logging
from numbers import Integral
from pathlib import Path

import keras
import numpy as np
from keras import layers

from models.backbone_common import Backbone, build_input_conversion, file_digest
from models.backbone_specs import (
    DEFAULT_SAVED_MODEL_INPUT_RANGE,
    SAVED_MODEL_SUFFIXES,
    BackboneError,
    inspect_saved_model,
    unknown_layer_message,
)
from models.cache_keys import hash_description

logger = logging.getLogger(__name__)

# Bump when the cut, pooling or input conversion changes the embeddings of the
# same file, layer and image size.
SAVED_MODEL_WRAPPER_VERSION = "1"

# Luma weights of ITU-R BT.601, the ones tf.image.rgb_to_grayscale uses, for
# models that take one gray channel. They sum to 1, so a gray image repeated
# over three channels converts back to itself.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Layers at the output that only squash the classifier's logits; the default
# cut skips them to reach the classifier itself.
_OUTPUT_ACTIVATIONS = (layers.Activation, layers.Softmax)

# Pooling to a vector by the rank of the cut layer's output, batch axis included.
_POOLING = {3: layers.GlobalAveragePooling1D, 4: layers.GlobalAveragePooling2D, 5: layers.GlobalAveragePooling3D}


def load_saved_model_backbone(
    path: Path,
    *,
    layer: str | None = None,
    image_size: int | None = None,
    input_range: tuple[float, float] = DEFAULT_SAVED_MODEL_INPUT_RANGE,
) -> Backbone:
    """Load a saved Keras model, cut it at a layer and pool that layer's output to a vector.

    The model is loaded with keras.models.load_model in safe mode, so a model
    with Lambda layers or unregistered custom classes is rejected.

    Args:
        path: A .keras archive or a legacy whole-model .h5 file, with one image
            input of shape (height, width, 1 or 3).
        layer: Name of a top-level layer whose output becomes the embedding.
            None takes the layer before the classifier: the output layer,
            after skipping trailing Activation or Softmax layers, is the
            classifier, and the layer that feeds it (past any Dropout) is cut at.
        image_size: Side in pixels the images are resized to. None takes the
            model's own input size, which must then be fixed and square.
        input_range: (low, high) pixel range the model expects; [0, 1] images
            are mapped linearly onto it. Default (0, 255), the range of Keras'
            image loaders.

    Returns:
        The Backbone. Its cnn maps (batch, image_size, image_size, 3) images in
        [0, 1] to (batch, D) embeddings, where 4-D feature maps are averaged
        over their spatial axes.

    Raises:
        BackboneError: If the file is missing or not a Keras model, the model
            cannot be loaded, its input is not an image, the image size does not
            fit, or the layer is unknown or cannot be cut at.
    """
    path = Path(path)
    if not path.name.endswith(SAVED_MODEL_SUFFIXES):
        raise BackboneError(f"Saved model {str(path)!r} must be a .keras or .h5 file.")
    info = inspect_saved_model(path)
    low, high = (float(value) for value in input_range)
    if not low < high:
        raise BackboneError(f"input_range={tuple(input_range)} is invalid; expected (low, high) with low < high.")

    try:
        model = keras.models.load_model(path, compile=False)
    except (TypeError, ValueError, OSError, KeyError) as error:
        raise BackboneError(
            f"Could not load the saved model {str(path)!r}: {_first_line(error)}. Models with Lambda layers or "
            f"custom classes cannot be loaded in Keras' safe mode; rebuild them from built-in layers."
        ) from error

    channels, image_size = _check_input(model, path, image_size)
    cut_layer = _find_layer(model, path, layer, info)
    try:
        cut = keras.Model(model.inputs[0], cut_layer.output, name=f"{model.name}_cut")
    except (ValueError, AttributeError) as error:
        raise BackboneError(
            f"Cannot cut the saved model {str(path)!r} at layer {cut_layer.name!r}: {_first_line(error)}. "
            f"Choose a layer that is used once and has one output."
        ) from error

    kernel = np.zeros((3, channels), dtype=np.float32)
    if channels == 3:
        kernel[:] = np.eye(3, dtype=np.float32) * (high - low)
    else:
        kernel[:, 0] = np.asarray(_GRAY_WEIGHTS, dtype=np.float32) * (high - low)
    bias = np.full(channels, low, dtype=np.float32)

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    converted = build_input_conversion(kernel, bias, name="input_conversion")(inputs)
    try:
        features = cut(converted)
    except ValueError as error:
        raise BackboneError(
            f"image_size={image_size} does not fit the saved model {str(path)!r}: {_first_line(error)}. "
            f"Use a larger image_size."
        ) from error
    embeddings = _pool(features, path, cut_layer.name)
    cnn = keras.Model(inputs, embeddings, name="saved_model_backbone")
    cnn.trainable = False

    description = {
        "kind": "saved_model",
        "wrapper_version": SAVED_MODEL_WRAPPER_VERSION,
        "keras_version": keras.__version__,
        "sha256": file_digest(path),
        "layer": cut_layer.name,
        "image_size": int(image_size),
        "input_range": [low, high],
    }
    summary = (
        f"saved model {path} cut at layer {cut_layer.name!r} ({cnn.output_shape[-1]} features) "
        f"at {image_size}x{image_size} pixels"
    )
    logger.info("Built %s.", summary)
    return Backbone(cnn=cnn, weights_key=hash_description(description), cache_hit=False, description=summary)


def default_cut_layer(model: keras.Model) -> keras.layers.Layer:
    """Find the layer before a model's classifier.

    Raises:
        BackboneError: If the model has several outputs, or nothing precedes its classifier.
    """
    if len(model.outputs) != 1:
        raise BackboneError(f"The model has {len(model.outputs)} outputs; name the layer to cut at with layer:.")

    classifier = _producer(model.outputs[0])
    while isinstance(classifier, _OUTPUT_ACTIVATIONS):
        classifier = _input_producer(classifier)

    before = _input_producer(classifier) if classifier is not None else None
    while isinstance(before, layers.Dropout):
        before = _input_producer(before)

    if before is None or isinstance(before, layers.InputLayer):
        raise BackboneError(
            f"The model has no layer before its classifier {getattr(classifier, 'name', None)!r}; "
            f"name the layer to cut at with layer:."
        )
    return before


def _producer(tensor) -> keras.layers.Layer | None:
    history = getattr(tensor, "_keras_history", None)
    return history.operation if history is not None else None


def _input_producer(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    # The layer's first call in the model graph; a layer reused at several
    # places has no single producer, and the caller reports that.
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
        return None
    return _producer(nodes[0].input_tensors[0])


def _check_input(model: keras.Model, path: Path, image_size: int | None) -> tuple[int, int]:
    if len(model.inputs) != 1:
        raise BackboneError(f"Saved model {str(path)!r} has {len(model.inputs)} inputs; a backbone takes one image input.")

    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise BackboneError(
            f"Saved model {str(path)!r} takes inputs of shape {shape}; a backbone takes images of shape "
            f"(height, width, 1) or (height, width, 3)."
        )

    height, width, channels = shape
    if height is not None or width is not None:
        if height != width:
            raise BackboneError(
                f"Saved model {str(path)!r} takes {height}x{width} images, but images are resized to a square; "
                f"save the model with a square or variable input size."
            )
        if image_size is None:
            image_size = int(height)
        elif image_size != height:
            raise BackboneError(
                f"Saved model {str(path)!r} takes {height}x{width} images but image_size={image_size}; "
                f"set image_size to {height} or leave it out."
            )
    elif image_size is None:
        raise BackboneError(f"Saved model {str(path)!r} accepts images of any size; set image_size.")

    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < 1:
        raise BackboneError(f"image_size={image_size!r} is invalid; expected an integer of at least 1 pixel.")
    return int(channels), int(image_size)


def _find_layer(model: keras.Model, path: Path, layer: str | None, info) -> keras.layers.Layer:
    if layer is None:
        chosen = default_cut_layer(model)
        logger.info("Cutting the saved model %s at %r, the layer before its classifier.", path, chosen.name)
        return chosen

    matches = [candidate for candidate in model.layers if candidate.name == layer]
    if not matches or isinstance(matches[0], layers.InputLayer):
        message = unknown_layer_message(path, layer, info)
        raise BackboneError(message[0].upper() + message[1:] + ".")
    return matches[0]


def _pool(features, path: Path, layer_name: str):
    rank = len(features.shape)
    if rank == 2:
        return features
    if rank not in _POOLING:
        raise BackboneError(
            f"Layer {layer_name!r} of {str(path)!r} outputs shape {tuple(features.shape)}, which cannot be "
            f"pooled to a vector; choose a layer with a 2-D to 5-D output."
        )
    return _POOLING[rank](name="pool_to_vector")(features)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
