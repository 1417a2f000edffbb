"""The classifier head tuned on embeddings, and export of backbone + head as one .keras file.

Example:
    >>> hyperparameters = resolve_head_hyperparameters({"learning_rate": 3e-3, "units_2": 64})
    >>> head = build_head(
    ...     embeddings.dimension,
    ...     dataset.num_classes,
    ...     mean=embeddings.train.mean(axis=0),
    ...     variance=embeddings.train.var(axis=0),
    ...     hyperparameters=hyperparameters,
    ...     steps_per_epoch=math.ceil(len(embeddings.train) / hyperparameters["batch_size"]),
    ... )
    >>> head.fit(embeddings.train, dataset.y_train, batch_size=hyperparameters["batch_size"], epochs=20)
    >>> export_model(extractor, head, dataset.class_names, Path("model.keras"))
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from models.hyperparameters import HEAD_DEFAULTS, HEAD_HYPERPARAMETERS, OPTIMIZERS
from models.optimizers import FusedAdam, FusedAdamW

logger = logging.getLogger(__name__)

# HEAD_HYPERPARAMETERS, HEAD_DEFAULTS and the optimizer names live in
# models.hyperparameters so that configuration code can import them without
# loading TensorFlow. They are re-exported here next to build_head.
HEAD_OPTIMIZERS = OPTIMIZERS

# Name of the archive entry that export_model adds to the .keras zip file.
METADATA_ENTRY = "frozen_tune.json"

__all__ = [
    "HEAD_DEFAULTS",
    "HEAD_HYPERPARAMETERS",
    "HEAD_OPTIMIZERS",
    "METADATA_ENTRY",
    "build_head",
    "export_model",
    "read_model_metadata",
    "resolve_head_hyperparameters",
]

_OPTIMIZER_CLASSES = {
    "adam": FusedAdam,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adamw": FusedAdamW,
}


def resolve_head_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Validate head hyperparameters and fill the missing ones from HEAD_DEFAULTS.

    Args:
        hyperparameters: Any subset of HEAD_HYPERPARAMETERS. units_1..3 and
            batch_size must be integers (round values from a continuous search
            space before passing them).

    Returns:
        A new dict with every name in HEAD_HYPERPARAMETERS.

    Raises:
        ValueError: If a name is unknown or a value is out of range.
    """
    unknown = sorted(set(hyperparameters) - set(HEAD_HYPERPARAMETERS))
    if unknown:
        raise ValueError(
            f"Unknown head hyperparameter {unknown[0]!r}; accepted names are {', '.join(HEAD_HYPERPARAMETERS)}."
        )

    resolved = {**HEAD_DEFAULTS, **hyperparameters}

    _check_number(resolved, "learning_rate", "a number > 0", lambda value: value > 0)
    _check_number(resolved, "decay_rate", "a number >= 0", lambda value: value >= 0)
    _check_number(resolved, "l2", "a number >= 0", lambda value: value >= 0)
    _check_number(resolved, "dropout", "a number in [0, 1)", lambda value: 0 <= value < 1)

    for name in ("units_1", "units_2", "units_3"):
        _check_integer(resolved, name, minimum=0)
    _check_integer(resolved, "batch_size", minimum=1)

    activation = resolved["activation"]
    if not isinstance(activation, str) or not _is_keras_activation(activation):
        raise ValueError(
            f"Head hyperparameter activation={activation!r} is not a Keras activation name; "
            f"use a name such as 'relu', 'gelu', 'tanh' or 'elu'."
        )

    if resolved["optimizer"] not in HEAD_OPTIMIZERS:
        raise ValueError(
            f"Head hyperparameter optimizer={resolved['optimizer']!r} is not supported; "
            f"use one of {', '.join(HEAD_OPTIMIZERS)}."
        )

    return resolved


def build_head(
    embedding_dim: int,
    num_classes: int,
    mean: np.ndarray,
    variance: np.ndarray,
    hyperparameters: dict[str, Any],
    steps_per_epoch: int,
    steps_per_execution: int = 1,
) -> keras.Model:
    """Build and compile the classifier head that maps embeddings to class probabilities.

    Layers: Normalization with the given statistics, then for units_1, units_2
    and units_3 in order a Dense(units, activation, L2(l2)) followed by
    Dropout(dropout), skipped where units is 0, then Dense(num_classes, softmax).
    The learning rate follows InverseTimeDecay, so after t optimizer steps it is
    learning_rate / (1 + decay_rate * t / steps_per_epoch), smooth within an epoch.

    Args:
        embedding_dim: Embedding size D, at least 1.
        num_classes: Number of classes, at least 2.
        mean: Feature-wise mean of the training embeddings, shape (D,). Without
            this standardization a head on raw pooled CNN features trains badly.
        variance: Feature-wise variance of the training embeddings, shape (D,).
        hyperparameters: Subset of HEAD_HYPERPARAMETERS; missing ones take
            HEAD_DEFAULTS. batch_size is validated here but used by the caller's fit.
        steps_per_epoch: Optimizer steps per epoch, at least 1, normally
            ceil(n_train / batch_size). It is the decay_steps of the schedule.
        steps_per_execution: Training steps per call into TensorFlow's compiled
            function (Keras' `steps_per_execution`). More steps per call cut the
            Python work between small batches.

    Returns:
        The head, compiled with sparse categorical cross-entropy and accuracy.

    Raises:
        ValueError: If a hyperparameter name or value, a size, or the shape of
            mean or variance is invalid.
    """
    resolved = resolve_head_hyperparameters(hyperparameters)

    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, Integral) or embedding_dim < 1:
        raise ValueError(f"embedding_dim={embedding_dim!r} is invalid; expected an integer of at least 1.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an integer of at least 2.")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, Integral) or steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch!r} is invalid; expected an integer of at least 1, "
            f"normally ceil(n_train / batch_size)."
        )

    mean = np.asarray(mean, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    for name, statistic in (("mean", mean), ("variance", variance)):
        if statistic.shape != (embedding_dim,):
            raise ValueError(
                f"{name} has shape {statistic.shape} but embedding_dim is {embedding_dim}; "
                f"pass the feature-wise {name} of the training embeddings, shape ({embedding_dim},)."
            )
        if not np.all(np.isfinite(statistic)):
            raise ValueError(f"{name} contains NaN or infinite values; check the training embeddings.")
    if np.any(variance < 0):
        raise ValueError("variance contains negative values; pass embeddings.var(axis=0) of the training embeddings.")

    inputs = keras.Input(shape=(int(embedding_dim),), name="embedding")
    features = layers.Normalization(mean=mean, variance=variance, name="standardize")(inputs)

    for index, name in enumerate(("units_1", "units_2", "units_3"), start=1):
        units = int(resolved[name])
        if units == 0:
            continue
        features = layers.Dense(
            units,
            activation=resolved["activation"],
            kernel_regularizer=keras.regularizers.L2(float(resolved["l2"])),
            name=f"dense_{index}",
        )(features)
        features = layers.Dropout(float(resolved["dropout"]), name=f"dropout_{index}")(features)

    probabilities = layers.Dense(int(num_classes), activation="softmax", name="class_probabilities")(features)
    head = keras.Model(inputs, probabilities, name="head")

    schedule = keras.optimizers.schedules.InverseTimeDecay(
        initial_learning_rate=float(resolved["learning_rate"]),
        decay_steps=int(steps_per_epoch),
        decay_rate=float(resolved["decay_rate"]),
    )
    optimizer = _OPTIMIZER_CLASSES[resolved["optimizer"]](learning_rate=schedule)
    head.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"], steps_per_execution=int(steps_per_execution))
    return head


def export_model(
    extractor: keras.Model,
    head: keras.Model,
    class_names: list[str],
    path: Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save the frozen extractor and the head as one model from raw images to class probabilities.

    The saved model needs no frozen-tune code: keras.models.load_model(path)
    followed by model.predict(raw_images) is enough. The class names and the
    metadata are stored as the archive entry METADATA_ENTRY; read them back
    with read_model_metadata. The file is saved under a temporary name in the
    same folder and renamed, so a crash never leaves a partial file.

    Args:
        extractor: Model from (batch, *raw_shape) to (batch, D). It is set to
            trainable = False.
        head: Model from (batch, D) to (batch, len(class_names)) probabilities.
        class_names: Name of each class, index i for output i.
        path: Target file; it must end in ".keras". Missing parent folders are
            created and an existing file is replaced.
        metadata: Extra JSON-serializable fields stored next to the class names,
            for example the hyperparameters. NumPy scalars and arrays are
            stored as Python numbers and lists. It may not contain "class_names".

    Returns:
        The path of the saved file.

    Raises:
        ValueError: If the path suffix, the shapes, the class names or the
            metadata are invalid.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model path {path} must end in '.keras'; Keras saves the full model only in that format.")

    embedding_dim = extractor.output_shape[-1]
    head_input_dim = head.input_shape[-1]
    if embedding_dim != head_input_dim:
        raise ValueError(
            f"The extractor outputs {embedding_dim} features but the head expects {head_input_dim}; "
            f"build the head with embedding_dim={embedding_dim}."
        )

    class_names = [str(name) for name in class_names]
    num_outputs = head.output_shape[-1]
    if len(class_names) != num_outputs:
        raise ValueError(
            f"{len(class_names)} class names were given but the head has {num_outputs} outputs; "
            f"pass one name per class, in label order."
        )

    metadata = dict(metadata or {})
    if "class_names" in metadata:
        raise ValueError("metadata contains the key 'class_names'; pass the class names as the class_names argument.")
    try:
        metadata_json = json.dumps(
            {"class_names": class_names, **metadata}, indent=2, sort_keys=True, default=_numpy_to_python
        )
    except TypeError as error:
        raise ValueError(f"metadata is not JSON-serializable: {error}; pass only str, numbers, lists and dicts.") from error

    extractor.trainable = False
    # An uncompiled copy of the head, so the file carries no optimizer and loads without
    # frozen-tune's optimizer classes. keras.models.clone_model (Keras 3.15) compiles its
    # copy like the original, and a compiled nested model makes Keras warn at load time.
    inference_head = keras.Model.from_config(head.get_config())
    inference_head.set_weights(head.get_weights())
    inputs = keras.Input(shape=extractor.input_shape[1:], dtype="float32", name="raw_image")
    embeddings = extractor(inputs, training=False)
    probabilities = inference_head(embeddings)
    model = keras.Model(inputs, probabilities, name="frozen_tune_classifier")

    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".keras")
    os.close(file_descriptor)
    # mkstemp creates the file readable by its owner only; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary_name, 0o666 & ~umask)

    try:
        model.save(temporary_name)
        # keras.models.load_model (Keras 3.15) reads only the archive entries it
        # expects, so this extra entry does not affect loading.
        with zipfile.ZipFile(temporary_name, mode="a") as archive:
            archive.writestr(METADATA_ENTRY, metadata_json)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise

    logger.info("Exported model with %d classes to %s (%.2f MB).", len(class_names), path, path.stat().st_size / 1e6)
    return path


def read_model_metadata(path: Path) -> dict[str, Any]:
    """Read the class names and metadata that export_model stored in a .keras file.

    Args:
        path: A .keras file written by export_model.

    Returns:
        {"class_names": [...], **metadata}.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a .keras archive or has no frozen-tune metadata.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model file {path} not found.")

    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY not in archive.namelist():
                raise ValueError(
                    f"Model file {path} has no {METADATA_ENTRY} entry; it was not written by export_model. "
                    f"Export it again with models.classifier.export_model."
                )
            return json.loads(archive.read(METADATA_ENTRY))
    except zipfile.BadZipFile as error:
        raise ValueError(f"Model file {path} is not a .keras archive: {error}.") from error


def _check_number(resolved: dict[str, Any], name: str, accepted: str, is_in_range: Callable[[float], bool]) -> None:
    value = resolved[name]
    is_number = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    if not is_number or not is_in_range(value):
        raise ValueError(f"Head hyperparameter {name}={value!r} is invalid; expected {accepted}.")


def _check_integer(resolved: dict[str, Any], name: str, *, minimum: int) -> None:
    value = resolved[name]
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(
            f"Head hyperparameter {name}={value!r} is invalid; expected an integer >= {minimum} "
            f"(round values from a continuous search space first)."
        )


def _numpy_to_python(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _is_keras_activation(name: str) -> bool:
    try:
        keras.activations.get(name)
    except ValueError:
        return False
    return True
