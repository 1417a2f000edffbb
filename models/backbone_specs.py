"""What each backbone accepts, readable without TensorFlow.

The experiment file schema (tuning.config) checks backbone names, weights,
image sizes and saved-model layers before Ray or TensorFlow start. The facts it
needs therefore live here: the table of Keras Applications, the weights
keywords and a reader for the layer names and input shape of a saved Keras model.

Example:
    >>> APPLICATIONS["MobileNetV2"].min_image_size
    32
    >>> "ResNet50" in BACKBONE_NAMES
    True
"""

from __future__ import annotations

import difflib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMALL_CNN = "small_cnn"

# Weights keywords. A path ending in one of WEIGHTS_FILE_SUFFIXES is the third
# choice for Keras Applications.
PRETRAINED = "pretrained"
IMAGENET = "imagenet"
NO_WEIGHTS = "none"
SMALL_CNN_WEIGHTS = (PRETRAINED, NO_WEIGHTS)
APPLICATION_WEIGHTS = (IMAGENET, NO_WEIGHTS)
WEIGHTS_FILE_SUFFIXES = (".h5", ".hdf5")

# Saved whole models: Keras 3 archives and legacy HDF5 files.
SAVED_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")

# Keras loaders such as image_dataset_from_directory yield pixels in 0..255,
# so models trained on their output expect that range by default.
DEFAULT_SAVED_MODEL_INPUT_RANGE = (0.0, 255.0)

# Precisions an extractor can compute in. MIXED_FLOAT16 is Keras' policy of
# float16 arithmetic on float32 weights, which GPUs with tensor cores run faster.
FLOAT32 = "float32"
MIXED_FLOAT16 = "mixed_float16"


class BackboneError(ValueError):
    """A backbone that cannot be built from the given name, weights, file or layer.

    It is a ValueError, so callers that catch invalid input keep working; the
    experiment runner reports it as an invalid experiment file.
    """


@dataclass(frozen=True)
class ApplicationSpec:
    """A Keras Application used as a frozen feature extractor.

    Attributes:
        name: Attribute of keras.applications that builds it, for example "MobileNetV2".
        module: Submodule of keras.applications whose preprocess_input matches it.
        min_image_size: Smallest input side in pixels that Keras accepts.
        default_image_size: Input side in pixels of its ImageNet weights.
        embedding_size: Length of the globally average-pooled feature vector.
    """

    name: str
    module: str
    min_image_size: int
    default_image_size: int
    embedding_size: int


# Keras 3.15 rejects inputs below 32x32 for every one of these networks; the
# default sizes are those their ImageNet weights were trained at.
APPLICATIONS: dict[str, ApplicationSpec] = {
    spec.name: spec
    for spec in (
        ApplicationSpec("MobileNetV2", "mobilenet_v2", 32, 224, 1280),
        ApplicationSpec("MobileNetV3Small", "mobilenet_v3", 32, 224, 576),
        ApplicationSpec("MobileNetV3Large", "mobilenet_v3", 32, 224, 960),
        ApplicationSpec("EfficientNetB0", "efficientnet", 32, 224, 1280),
        ApplicationSpec("EfficientNetB1", "efficientnet", 32, 240, 1280),
        ApplicationSpec("EfficientNetB2", "efficientnet", 32, 260, 1408),
        ApplicationSpec("EfficientNetB3", "efficientnet", 32, 300, 1536),
        ApplicationSpec("EfficientNetV2B0", "efficientnet_v2", 32, 224, 1280),
        ApplicationSpec("ResNet50", "resnet50", 32, 224, 2048),
        ApplicationSpec("DenseNet121", "densenet", 32, 224, 1024),
        ApplicationSpec("ConvNeXtTiny", "convnext", 32, 224, 768),
    )
}

BACKBONE_NAMES: tuple[str, ...] = (SMALL_CNN, *APPLICATIONS)

# The small CNN pools twice by 2x2, so 8 pixels leave a 2x2 map for its last block.
SMALL_CNN_MIN_IMAGE_SIZE = 8
SMALL_CNN_DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class SavedModelInfo:
    """Structure of a saved Keras model, read from its stored configuration.

    Attributes:
        class_name: "Functional", "Sequential" or "Model".
        layer_names: Names of the top-level layers in order, without input layers.
        input_shape: Shape of one input image; None marks a side of any size.
        nested_layer_names: For each top-level layer that is itself a model,
            the names of its own layers.
    """

    class_name: str
    layer_names: tuple[str, ...]
    input_shape: tuple[int | None, ...] | None
    nested_layer_names: dict[str, tuple[str, ...]]

    def nested_model_containing(self, layer: str) -> str | None:
        """Return the top-level nested model that has a layer of this name, or None."""
        for model_name, names in self.nested_layer_names.items():
            if layer in names:
                return model_name
        return None


def inspect_saved_model(path: Path) -> SavedModelInfo:
    """Read the layer names and input shape of a saved Keras model without loading it.

    Args:
        path: A Keras 3 archive (.keras) or a legacy whole-model HDF5 file (.h5).

    Returns:
        The SavedModelInfo. input_shape is None when the file does not record it.

    Raises:
        BackboneError: If the file is missing, is not a Keras model file, or
            is a weights-only file.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"saved model {str(path)!r} not found; give the path of a .keras or .h5 model file.")

    if path.name.endswith(".weights.h5"):
        raise BackboneError(
            f"{str(path)!r} is a weights-only file; use it as weights: with a backbone name, "
            f"or give a whole saved model (.keras) as path."
        )

    if path.suffix == ".keras":
        config = _read_keras_archive_config(path)
    else:
        config = _read_hdf5_model_config(path)

    class_name = str(config.get("class_name", ""))
    layers = (config.get("config") or {}).get("layers") or []
    names = []
    nested = {}
    input_shape = None

    for layer in layers:
        layer_config = layer.get("config") or {}
        name = layer.get("name") or layer_config.get("name")
        if layer_config.get("layers"):
            nested[str(name)] = tuple(
                str(inner.get("name") or (inner.get("config") or {}).get("name")) for inner in layer_config["layers"]
            )
        if layer.get("class_name") == "InputLayer":
            shape = layer_config.get("batch_shape") or layer_config.get("batch_input_shape")
            if input_shape is None and shape is not None:
                input_shape = tuple(shape[1:])
            continue
        if input_shape is None and layer_config.get("batch_input_shape") is not None:
            input_shape = tuple(layer_config["batch_input_shape"][1:])
        names.append(str(name))

    if input_shape is None:
        build_shape = ((config.get("config") or {}).get("build_input_shape")
                       or (config.get("build_config") or {}).get("input_shape"))
        if build_shape is not None:
            input_shape = tuple(build_shape[1:])

    if not names:
        raise BackboneError(f"saved model {str(path)!r} has no layers in its configuration; save the whole model with model.save().")
    return SavedModelInfo(
        class_name=class_name, layer_names=tuple(names), input_shape=input_shape, nested_layer_names=nested,
    )


def _read_keras_archive_config(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        raise BackboneError(
            f"{str(path)!r} is not a Keras model archive ({error}); save the model with model.save('model.keras')."
        ) from None


def _read_hdf5_model_config(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            stored = file.attrs.get("model_config")
    except OSError as error:
        raise BackboneError(f"{str(path)!r} is not an HDF5 file ({error}); give a .keras or .h5 model file.") from None

    if stored is None:
        raise BackboneError(
            f"{str(path)!r} contains no model configuration, so it is a weights-only file; use it as weights: "
            f"with a backbone name, or give a whole saved model (.keras) as path."
        )
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8")
    return json.loads(stored)


def closest_name(name: object, options: tuple[str, ...] | list[str]) -> str | None:
    """Return the option a mistyped name most likely meant, or None.

    Case, underscores and hyphens are ignored first, so "mobilenet_v2" finds
    "MobileNetV2"; then difflib's similarity ratio must reach 0.6.
    """
    def normalize(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    by_normal_form = {normalize(option): option for option in options}
    typed = normalize(str(name))
    if typed in by_normal_form:
        return by_normal_form[typed]
    matches = difflib.get_close_matches(typed, list(by_normal_form), n=1, cutoff=0.6)
    return by_normal_form[matches[0]] if matches else None


# Layers listed when a requested layer is not found: the last ones before the
# output, where a feature extractor is usually cut.
_LISTED_LAYERS = 8


def unknown_layer_message(path: Path, layer: str, info: SavedModelInfo) -> str:
    """Describe a layer name that the saved model does not have at its top level.

    Returns:
        A message that names a close match, the nested model that contains
        the layer if one does, and the model's last layer names.
    """
    last_layers = ", ".join(info.layer_names[-_LISTED_LAYERS:])
    nested_model = info.nested_model_containing(layer)
    if nested_model is not None:
        return (
            f"layer {layer!r} is inside the nested model {nested_model!r} of {str(path)!r}, and only top-level "
            f"layers can be cut at; use layer: {nested_model!r} or one of the last top-level layers: {last_layers}"
        )

    suggestion = closest_name(layer, info.layer_names)
    hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
    return (
        f"layer {layer!r} not found in {str(path)!r}{hint}; its last layers are: {last_layers} "
        f"({len(info.layer_names)} layers in all)"
    )
