"""Experiment file schema: YAML parsed into validated, immutable objects.

Every check on user input lives here, so the rest of the code trusts what it
receives. `load_experiment` raises `ConfigError`, whose message lists each
problem with its field path, the offending value and what is accepted. This
module imports neither Ray nor TensorFlow, so errors appear within a second.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator, model_validator

from models.backbone_specs import (
    APPLICATION_WEIGHTS,
    APPLICATIONS,
    BACKBONE_NAMES,
    DEFAULT_SAVED_MODEL_INPUT_RANGE,
    IMAGENET,
    NO_WEIGHTS,
    PRETRAINED,
    SAVED_MODEL_SUFFIXES,
    SMALL_CNN,
    SMALL_CNN_DEFAULT_IMAGE_SIZE,
    SMALL_CNN_MIN_IMAGE_SIZE,
    SMALL_CNN_WEIGHTS,
    WEIGHTS_FILE_SUFFIXES,
    BackboneError,
    closest_name,
    inspect_saved_model,
    unknown_layer_message,
)
from models.hyperparameters import ACTIVATIONS, HEAD_DEFAULTS, HEAD_HYPERPARAMETERS, OPTIMIZERS
from tuning.dataset_config import DATASET_PATH_HINTS, DATASETS_NEEDING_PATH, DatasetConfig, DatasetSource, Number

# Largest image side a backbone may resize to, in pixels.
MAX_IMAGE_SIZE = 1024
# Metrics every trial reports each epoch, in the column order of results.csv.
REPORTED_METRICS: tuple[str, ...] = ("val_loss", "val_accuracy", "loss", "accuracy")
DEFAULT_CACHE_DIR = Path("~/.cache/frozen-tune")
CACHE_DIR_VARIABLE = "FROZEN_TUNE_CACHE"

# Hyperparameters whose values must be whole numbers, and their smallest valid value.
INTEGER_HYPERPARAMETERS: dict[str, int] = {"units_1": 0, "units_2": 0, "units_3": 0, "batch_size": 1}
CATEGORICAL_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {"activation": ACTIVATIONS, "optimizer": OPTIMIZERS}


class ConfigError(ValueError):
    """An experiment file that cannot be used, with one line per problem."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated in one mapping, where PyYAML keeps the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                # PyYAML's own construct_mapping reports an unhashable key with its position.
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key {key!r} appears twice (first on line {seen[key].line + 1}); merge the two entries into one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainConfig(_Strict):
    dataset: DatasetSource = DatasetSource()
    classes: list[int | str] | None = None
    epochs: StrictInt = Field(10, ge=1)
    seed: StrictInt = 0
    validation_split: Number = Field(0.2, gt=0.0, lt=1.0)

    @field_validator("dataset", mode="before")
    @classmethod
    def _name_only(cls, dataset: Any) -> Any:
        # `dataset: fashion_mnist` is short for `dataset: {name: fashion_mnist}`.
        if isinstance(dataset, str):
            return {"name": dataset}
        return dataset

    _distinct_classes = field_validator("classes")(DatasetConfig._distinct_classes.__func__)


class BackboneConfig(_Strict):
    """The frozen backbone: small_cnn, a Keras Application by name, or a saved model by path.

    Validation fills unset fields with the chosen backbone's defaults. Weights
    are "pretrained" for small_cnn and "imagenet" for Keras Applications. The
    image_size is 32 for small_cnn, the ImageNet size for Keras Applications
    and the model's own input size for a saved model. Paths are resolved
    against the current folder. `precision` is what the embeddings are
    computed in: "auto" picks mixed_float16 when the extraction has a GPU and
    float32 otherwise.
    """

    name: str | None = Field(None, validate_default=True)
    path: str | None = None
    layer: str | None = None
    weights: str | None = Field(None, validate_default=True)
    input_range: list[float] | None = Field(None, validate_default=True)
    image_size: StrictInt | None = Field(None, validate_default=True)
    pretrain: PretrainConfig = PretrainConfig()
    precision: Literal["auto", "float32", "mixed_float16"] = "auto"

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, name: str | None) -> str | None:
        if name is not None and name not in BACKBONE_NAMES:
            suggestion = closest_name(name, BACKBONE_NAMES)
            hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
            raise ValueError(f"unknown backbone {name!r}{hint}; accepted: {', '.join(BACKBONE_NAMES)}")
        return name

    @field_validator("path")
    @classmethod
    def _saved_model_file(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        if info.data.get("name") is not None:
            raise ValueError(
                f"set either name (a backbone from the registry) or path (a saved model), not both; "
                f"got name {info.data['name']!r} and path {path!r}"
            )
        if not path.endswith(SAVED_MODEL_SUFFIXES):
            raise ValueError(f"path {path!r} must be a saved Keras model ending in .keras or .h5")
        resolved = Path(path).expanduser().resolve()
        try:
            inspect_saved_model(resolved)
        except BackboneError as error:
            raise ValueError(_lower_first(str(error)).rstrip(".")) from None
        return str(resolved)

    @field_validator("weights")
    @classmethod
    def _weights_for_backbone(cls, weights: str | None, info: ValidationInfo) -> str | None:
        kind = _backbone_kind(info.data)
        if kind == "saved_model":
            if weights is not None:
                raise ValueError(
                    f"weights {weights!r} does not apply to a saved model backbone, whose weights come from its "
                    f"file; remove weights"
                )
            return None

        if kind == "small_cnn":
            if weights is None:
                return PRETRAINED
            if weights not in SMALL_CNN_WEIGHTS:
                note = "; imagenet and weights files apply to Keras Applications such as MobileNetV2"
                raise ValueError(f"small_cnn takes weights {' or '.join(SMALL_CNN_WEIGHTS)}, got {weights!r}{note}")
            return weights

        if kind == "application":
            return _application_weights(info.data["name"], weights)
        return weights

    @field_validator("layer")
    @classmethod
    def _layer_in_saved_model(cls, layer: str | None, info: ValidationInfo) -> str | None:
        if layer is None:
            return None
        kind = _backbone_kind(info.data)
        if kind in ("small_cnn", "application"):
            raise ValueError(f"layer {layer!r} applies only to a saved model backbone (backbone.path); remove it")
        if kind == "saved_model":
            path = Path(info.data["path"])
            saved = inspect_saved_model(path)
            if layer not in saved.layer_names:
                raise ValueError(unknown_layer_message(path, layer, saved))
        return layer

    @field_validator("input_range")
    @classmethod
    def _input_range_of_saved_model(cls, input_range: list[float] | None, info: ValidationInfo) -> list[float] | None:
        kind = _backbone_kind(info.data)
        if input_range is None:
            return list(DEFAULT_SAVED_MODEL_INPUT_RANGE) if kind == "saved_model" else None
        if kind in ("small_cnn", "application"):
            raise ValueError(
                "input_range applies only to a saved model backbone (backbone.path); registry backbones "
                "convert images with their own preprocessing; remove it"
            )
        if len(input_range) != 2:
            raise ValueError(f"input_range must be [low, high], got {input_range}")
        low, high = input_range
        if not low < high:
            raise ValueError(f"input_range must be [low, high] with low < high, got {list(input_range)}")
        return input_range

    @field_validator("image_size")
    @classmethod
    def _image_size_for_backbone(cls, image_size: int | None, info: ValidationInfo) -> int | None:
        if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be between 1 and {MAX_IMAGE_SIZE} pixels, got {image_size}")

        kind = _backbone_kind(info.data)
        if kind == "small_cnn":
            return _sized(image_size, SMALL_CNN, SMALL_CNN_DEFAULT_IMAGE_SIZE, SMALL_CNN_MIN_IMAGE_SIZE)
        if kind == "application":
            spec = APPLICATIONS[info.data["name"]]
            return _sized(image_size, spec.name, spec.default_image_size, spec.min_image_size)
        if kind == "saved_model":
            return _saved_model_image_size(Path(info.data["path"]), image_size)
        return image_size

    @field_validator("pretrain")
    @classmethod
    def _pretrain_for_small_cnn(cls, pretrain: PretrainConfig, info: ValidationInfo) -> PretrainConfig:
        # Runs only when the file sets pretrain, because the default is not validated.
        kind = _backbone_kind(info.data)
        if kind in ("application", "saved_model"):
            raise ValueError(
                "pretrain applies only to small_cnn, which the project pretrains itself; "
                "remove it or use name: small_cnn"
            )
        return pretrain

    @model_validator(mode="after")
    def _default_name(self) -> BackboneConfig:
        if self.name is None and self.path is None:
            object.__setattr__(self, "name", SMALL_CNN)
        return self

    @property
    def label(self) -> str:
        """The backbone in one phrase for logs and reports: its name, or the saved model's file and layer."""
        if self.path is None:
            return str(self.name)
        layer = f"layer {self.layer}" if self.layer else "the layer before its classifier"
        return f"{Path(self.path).name} cut at {layer}"


def _backbone_kind(data: dict[str, Any]) -> str | None:
    """Classify the backbone from the fields validated so far; None when name or path is invalid."""
    if "name" not in data or "path" not in data:
        return None
    if data["path"] is not None:
        return "saved_model"
    if data["name"] in (None, SMALL_CNN):
        return "small_cnn"
    return "application"


def _application_weights(name: str, weights: str | None) -> str:
    if weights is None:
        return IMAGENET
    if weights in APPLICATION_WEIGHTS:
        return weights
    if weights == PRETRAINED:
        raise ValueError(
            f"weights 'pretrained' applies only to small_cnn; {name} takes {IMAGENET}, {NO_WEIGHTS} "
            f"or the path of a .h5 or .weights.h5 file"
        )
    if weights.endswith(SAVED_MODEL_SUFFIXES) and not weights.endswith(WEIGHTS_FILE_SUFFIXES):
        raise ValueError(
            f"weights {weights!r} is a whole saved model; give it as backbone.path instead of name and weights"
        )
    if not weights.endswith(WEIGHTS_FILE_SUFFIXES):
        suggestion = closest_name(weights, APPLICATION_WEIGHTS)
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        raise ValueError(
            f"unknown weights {weights!r}{hint}; {name} takes {IMAGENET}, {NO_WEIGHTS} "
            f"or the path of a .h5 or .weights.h5 file"
        )

    resolved = Path(weights).expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(
            f"weights file {weights!r} not found (looked at {resolved}); give the path of a {name} weights file, "
            f"or use {IMAGENET} on a machine with internet access"
        )
    return str(resolved)


def _sized(image_size: int | None, name: str, default: int, minimum: int) -> int:
    if image_size is None:
        return default
    if image_size < minimum:
        raise ValueError(f"{name} needs an image_size of at least {minimum} pixels, got {image_size}")
    return image_size


def _saved_model_image_size(path: Path, image_size: int | None) -> int:
    shape = inspect_saved_model(path).input_shape
    if shape is None or len(shape) != 3 or shape[2] not in (1, 3):
        raise ValueError(
            f"the saved model at {str(path)!r} takes inputs of shape {shape}; a backbone takes images of shape "
            f"(height, width, 1) or (height, width, 3)"
        )

    height, width, _ = shape
    if height is None and width is None:
        if image_size is None:
            raise ValueError(f"the saved model at {str(path)!r} accepts images of any size; set image_size")
        return image_size
    if height != width:
        raise ValueError(
            f"the saved model at {str(path)!r} takes {height}x{width} images, but images are resized to a square; "
            f"save it with a square or variable input size"
        )
    if image_size is not None and image_size != height:
        raise ValueError(
            f"the saved model at {str(path)!r} takes {height}x{width} images; set image_size to {height} or remove it"
        )
    return int(height)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


class _Bounded(_Strict):
    low: Number
    high: Number

    @model_validator(mode="after")
    def _low_below_high(self) -> _Bounded:
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        return self


class UniformParameter(_Bounded):
    type: Literal["uniform"]


class LogUniformParameter(_Bounded):
    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive_low(self) -> LogUniformParameter:
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}; use uniform for ranges that include 0")
        return self


class IntParameter(_Strict):
    type: Literal["int"]
    low: StrictInt
    high: StrictInt
    log: bool = False

    @model_validator(mode="after")
    def _valid_range(self) -> IntParameter:
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low < 1:
            raise ValueError(f"a log-spaced int needs low >= 1, got low={self.low}")
        return self


class ChoiceParameter(_Strict):
    type: Literal["choice"]
    values: list[Union[int, float, str, bool]] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct_values(cls, values: list[Any]) -> list[Any]:
        if len({repr(value) for value in values}) != len(values):
            raise ValueError(f"choice values must be distinct, got {values}")
        return values


ParameterConfig = Annotated[
    Union[UniformParameter, LogUniformParameter, IntParameter, ChoiceParameter],
    Field(discriminator="type"),
]


class SearchConfig(_Strict):
    metric: str = "val_loss"
    mode: Literal["min", "max"] | None = None
    num_trials: StrictInt = Field(30, ge=1)
    max_concurrent: StrictInt = Field(2, ge=1)
    initial_points: StrictInt = Field(5, ge=0)
    acquisition: Literal["ei", "ucb", "pi"] = "ei"
    seed: StrictInt | None = Field(0, ge=0)
    space: dict[str, ParameterConfig] = Field(min_length=1)
    points_to_evaluate: list[dict[str, Any]] = []
    warm_start: str | None = None

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, metric: str) -> str:
        if metric not in REPORTED_METRICS:
            raise ValueError(f"unknown metric {metric!r}; trials report: {', '.join(REPORTED_METRICS)}")
        return metric

    @field_validator("space")
    @classmethod
    def _head_hyperparameters(cls, space: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for name, parameter in space.items():
            problems.extend(_hyperparameter_problems(name, parameter, in_space=True))
        if problems:
            raise FieldProblems(problems)
        return space

    @field_validator("warm_start")
    @classmethod
    def _warm_start_named(cls, warm_start: str | None) -> str | None:
        if warm_start is not None and not warm_start.strip():
            raise ValueError("warm_start is empty; give the results.csv of an earlier run or remove warm_start")
        return warm_start

    @property
    def distinct_configurations(self) -> int | None:
        """Number of configurations of a space of `int` and `choice` parameters; None when any parameter is continuous."""
        total = 1
        for parameter in self.space.values():
            if isinstance(parameter, ChoiceParameter):
                total *= len(parameter.values)
            elif isinstance(parameter, IntParameter):
                total *= parameter.high - parameter.low + 1
            else:
                return None
        return total

    @model_validator(mode="after")
    def _default_mode(self) -> SearchConfig:
        if self.mode is None:
            object.__setattr__(self, "mode", "min" if self.metric.endswith("loss") else "max")
        return self

    @model_validator(mode="after")
    def _points_inside_space(self) -> SearchConfig:
        problems = []
        for index, point in enumerate(self.points_to_evaluate):
            missing = sorted(set(self.space) - set(point))
            unknown = sorted(set(point) - set(self.space))
            if missing or unknown:
                raise ValueError(
                    f"points_to_evaluate[{index}] must set exactly the parameters of the space; "
                    f"missing: {missing}, unknown: {unknown}"
                )
            for name, parameter in self.space.items():
                problem = _value_problem(point[name], parameter)
                if problem:
                    problems.append(f"points_to_evaluate[{index}].{name}: {problem}")
        if problems:
            raise ValueError("; ".join(problems) + "; give values inside search.space")
        return self


def _value_problem(value: Any, parameter: Any) -> str | None:
    """Describe why `value` is not a value of the search-space parameter, or return None when it is."""
    if isinstance(parameter, ChoiceParameter):
        same_kind = [choice for choice in parameter.values if isinstance(choice, bool) == isinstance(value, bool)]
        if value in same_kind:
            return None
        return f"{value!r} is not one of the choices {parameter.values}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if isinstance(parameter, IntParameter) and value != int(value):
        return f"{value!r} is not a whole number"
    if not parameter.low <= value <= parameter.high:
        return f"{value!r} is outside the {parameter.type} range [{parameter.low}, {parameter.high}]"
    return None


class TrainingConfig(_Strict):
    max_epochs: StrictInt = Field(30, ge=1)
    patience: StrictInt = Field(5, ge=1)
    # Retries of a trial whose worker or node died, each from its last checkpoint.
    max_failures: StrictInt = Field(2, ge=0)
    # Seconds between checkpoints of a running trial's best weights (0: at every improving
    # epoch). Every trial also checkpoints its last epoch, and ASHA checkpoints every improvement.
    checkpoint_seconds: Number = Field(10.0, ge=0.0, allow_inf_nan=False)


class SchedulerConfig(_Strict):
    name: Literal["fifo", "asha"] = "fifo"
    grace_period: StrictInt = Field(3, ge=1)
    reduction_factor: Number = Field(3.0, gt=1.0)


class ResourcesConfig(_Strict):
    cpus_per_trial: Number = Field(1.0, gt=0.0)
    gpus_per_trial: Number = Field(0.0, ge=0.0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus_per_trial above 1 must be a whole number, got {gpus}")
        return gpus


class ExperimentConfig(_Strict):
    """A whole experiment file."""

    name: str
    dataset: DatasetConfig = DatasetConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: dict[str, Any] = {}
    search: SearchConfig
    training: TrainingConfig = TrainingConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: str = "./runs"
    cache_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError(
                f"name {name!r} must start with a letter or digit and contain only letters, digits, '_', '.' and '-' "
                "(it becomes a folder name)"
            )
        return name

    @field_validator("storage")
    @classmethod
    def _storage_not_blank(cls, storage: str) -> str:
        # An empty path would resolve to the current folder without anyone asking for it.
        if not storage.strip():
            raise ValueError("storage is empty; give a folder such as ./runs or a URI such as s3://bucket/runs")
        return storage

    @field_validator("head")
    @classmethod
    def _fixed_hyperparameters(cls, head: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for name, value in head.items():
            problems.extend(_hyperparameter_problems(name, ChoiceParameter(type="choice", values=[value]), in_space=False))
        if problems:
            raise FieldProblems(problems)
        return head

    @model_validator(mode="after")
    def _head_not_in_space(self) -> ExperimentConfig:
        both = sorted(set(self.head) & set(self.search.space))
        if both:
            raise ValueError(f"{both} are both fixed in head and tuned in search.space; keep each in one place")
        return self

    @property
    def is_remote_storage(self) -> bool:
        return "://" in self.storage

    def storage_path(self) -> str:
        """Return the storage location as Ray expects it: a URI, or an absolute local path."""
        if self.is_remote_storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())

    def run_dir(self) -> str:
        return f"{self.storage_path().rstrip('/')}/{self.name}"

    def cache_path(self) -> Path:
        """Folder for pretrained backbones and embeddings: `cache_dir`, else $FROZEN_TUNE_CACHE, else ~/.cache/frozen-tune."""
        chosen = self.cache_dir or os.environ.get(CACHE_DIR_VARIABLE) or str(DEFAULT_CACHE_DIR)
        return Path(chosen).expanduser().resolve()

    def pretrain_dataset(self) -> DatasetConfig:
        """Return the pretraining source as a DatasetConfig with backbone.pretrain's classes, split and seed.

        When backbone.pretrain.dataset names the same dataset as `dataset`, each
        option it leaves unset (path, image_size, color_mode, download) comes
        from `dataset`, so `pretrain: {dataset: fashion_mnist, ...}` reads the same
        files as the tuned dataset. The test_path is never inherited because
        pretraining uses no test split.
        """
        pretrain = self.backbone.pretrain
        options = pretrain.dataset.model_dump(include=pretrain.dataset.model_fields_set)
        if pretrain.dataset.name == self.dataset.name:
            inherited = self.dataset.model_dump(include={"path", "image_size", "color_mode", "download"} & self.dataset.model_fields_set)
            options = {**inherited, **options}
        # model_construct skips validation, so a missing path is left for
        # check_datasets, which reports it with the field path.
        split = {"classes": pretrain.classes, "validation_split": pretrain.validation_split, "seed": pretrain.seed}
        return DatasetConfig.model_construct(**{**DatasetConfig().model_dump(), **options, **split})

    def head_hyperparameters(self, tuned: dict[str, Any]) -> dict[str, Any]:
        """Return the head's full hyperparameters for one trial: defaults, then fixed values, then tuned values."""
        return {**HEAD_DEFAULTS, **self.head, **tuned}


class FieldProblems(ValueError):
    """Problems that one validator found, each with its key path below the validated field (such as `dropout.high`)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


def _hyperparameter_problems(name: str, parameter: Any, in_space: bool) -> list[tuple[str, str]]:
    """List what is wrong with `parameter`'s range or values for the head hyperparameter `name`.

    Returns (key path below the section, message) pairs. In `search.space` the
    path names the bound or `values`; in `head` it is the name alone.
    """
    if name not in HEAD_HYPERPARAMETERS:
        # Reported by _unknown_hyperparameters, which runs even when other fields are invalid.
        return []

    values_key = f"{name}.values" if in_space else name
    if name in CATEGORICAL_HYPERPARAMETERS:
        accepted = CATEGORICAL_HYPERPARAMETERS[name]
        if not isinstance(parameter, ChoiceParameter):
            return [(f"{name}.type", f"{name} must be a choice of {', '.join(accepted)}")]
        unknown = [value for value in parameter.values if value not in accepted]
        return [(values_key, f"{value!r} is not accepted for {name}; accepted: {', '.join(accepted)}") for value in unknown]

    if isinstance(parameter, ChoiceParameter):
        keyed_values = [(values_key, value) for value in parameter.values]
    else:
        keyed_values = [(f"{name}.low", parameter.low), (f"{name}.high", parameter.high)]
    problems = []
    for key, value in keyed_values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((key, f"{name} must be a number, got {value!r}"))
        elif name in INTEGER_HYPERPARAMETERS and (value != int(value) or value < INTEGER_HYPERPARAMETERS[name]):
            problems.append((key, f"{name} must be a whole number >= {INTEGER_HYPERPARAMETERS[name]}, got {value!r}"))
        elif name in ("learning_rate",) and value <= 0:
            problems.append((key, f"{name} must be > 0, got {value!r}"))
        elif name in ("decay_rate", "l2") and value < 0:
            problems.append((key, f"{name} must be >= 0, got {value!r}"))
        elif name == "dropout" and not 0 <= value < 1:
            problems.append((key, f"{name} must be in [0, 1), got {value!r}"))
    if name in INTEGER_HYPERPARAMETERS and isinstance(parameter, (UniformParameter, LogUniformParameter)):
        problems.append((f"{name}.type", f"{name} takes whole numbers: use type int or choice, not {parameter.type}"))
    return problems


def _did_you_mean(name: str, options: tuple[str, ...] | list[str]) -> str:
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


PARAMETER_MODELS: dict[str, type[BaseModel]] = {
    "uniform": UniformParameter,
    "loguniform": LogUniformParameter,
    "int": IntParameter,
    "choice": ChoiceParameter,
}


def _format_validation_error(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        location = [part for part in item["loc"] if part not in PARAMETER_MODELS]
        path = ".".join(str(part) for part in location) or "(top level)"
        problems = item.get("ctx", {}).get("error")
        if isinstance(problems, FieldProblems):
            lines.extend(f"{path}.{key}: {message}" for key, message in problems.problems)
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            accepted = _accepted_keys(item["loc"][:-1])
            message = f"unknown key{_did_you_mean(str(location[-1]), accepted)}; accepted keys here: {', '.join(accepted)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = item.get("ctx", {}).get("tag")
            problem = f"unknown parameter type {tag!r}; " if tag is not None else "missing key 'type'; "
            message = f"{problem}the type must be one of {', '.join(PARAMETER_MODELS)}"

        value = item.get("input")
        if item["type"] == "int_type" and isinstance(value, float) and value.is_integer():
            message = f"must be a whole number written without a decimal point: write {int(value)}"
        elif item["type"] == "too_short":
            minimum = item.get("ctx", {}).get("min_length", 1)
            message = "must not be empty" if minimum == 1 else f"must have at least {minimum} entries"
        value_note = ""
        # Our own validators already quote the value as "got ...", and pydantic's built-in messages do not.
        if item["type"] != "missing" and not isinstance(value, dict) and "got " not in message:
            value_note = f" (got {value!r})"
        lines.append(f"{path}: {message}{value_note}")
    return lines


def _accepted_keys(location: tuple[Any, ...]) -> list[str]:
    """Names of the keys accepted at `location`, following nested models and parameter types."""
    current: Any = ExperimentConfig
    for part in location:
        if part in PARAMETER_MODELS:
            current = PARAMETER_MODELS[part]
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unknown_hyperparameters(data: dict[str, Any]) -> list[str]:
    """List the names in `search.space` and `head` that are not head hyperparameters."""
    lines = []
    search = data.get("search")
    sections = [("search.space", search.get("space") if isinstance(search, dict) else None), ("head", data.get("head"))]
    for prefix, section in sections:
        if not isinstance(section, dict):
            continue
        for name in section:
            if name not in HEAD_HYPERPARAMETERS:
                lines.append(
                    f"{prefix}.{name}: unknown hyperparameter{_did_you_mean(str(name), HEAD_HYPERPARAMETERS)}; "
                    f"the head accepts: {', '.join(HEAD_HYPERPARAMETERS)}"
                )
    return lines


def parse_experiment(data: Any, source: str = "experiment", option_names: dict[str, str] | None = None) -> ExperimentConfig:
    """Validate already-parsed YAML data.

    Args:
        data: The parsed YAML document.
        source: Name of the file, used in messages.
        option_names: Dotted keys that came from command-line options, mapped
            to the option (e.g. `{"name": "--name"}`), so their errors name the option.

    Raises:
        ConfigError: listing every problem with its field path.
    """
    if data is None:
        raise ConfigError(f"{source} is empty; an experiment file needs at least name and search (see examples/quickstart.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the experiment file must be a mapping of keys (name, dataset, search, ...), got {type(data).__name__}")

    lines = _unknown_hyperparameters(data)
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as error:
        lines += _format_validation_error(error)
        config = None
    if lines:
        for dotted, option in (option_names or {}).items():
            lines = [f"{line} (set by {option})" if line.startswith(f"{dotted}:") else line for line in lines]
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"  {line}" for line in lines))
    return config


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None, option_names: dict[str, str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment file.

    Args:
        path: The YAML file.
        overrides: Dotted keys to replace before validation, e.g.
            `{"search.num_trials": 4, "storage": "/tmp/runs"}`; None values are skipped.
        option_names: The command-line option behind each override, named in errors.

    Raises:
        ConfigError: for a missing or unreadable file, invalid YAML or any schema error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} not found; pass the path of a YAML file such as examples/quickstart.yaml")
    try:
        # Reading from the open file lets YAML's error marks name it instead of "<unicode string>".
        with path.open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read experiment file {str(path)!r}: {error}") from None

    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            target = data
            *parents, last = dotted.split(".")
            for part in parents:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{path}: {part} must be a mapping to override {dotted}")
            target[last] = value
    # An option that was not given did not set the value, so errors name the file's key alone.
    given_options = {dotted: option for dotted, option in (option_names or {}).items() if (overrides or {}).get(dotted) is not None}
    return parse_experiment(data, source=str(path), option_names=given_options)


def check_storage_writable(config: ExperimentConfig) -> None:
    """Check that the local storage folder can be created and written, and leave the file system as it was.

    Permission bits alone are not enough: root passes every permission check,
    and /proc rejects new folders whatever its bits are. So the probe creates
    the missing folders and writes a file, then removes what it created; the
    run creates the folders again when it writes its outputs.

    Raises:
        ConfigError: naming the storage value and the fix.
    """
    if config.is_remote_storage:
        _check_storage_uri(config.storage)
        return
    check_storage_not_file(config)
    folder = Path(config.storage_path())
    try:
        with temporary_folders(folder), tempfile.NamedTemporaryFile(dir=folder, prefix=".frozen-tune-probe-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"storage: {config.storage!r} is not writable ({error.strerror or error}); "
            "set storage (or --storage) to a folder you can write to"
        ) from None


@contextmanager
def temporary_folders(folder: Path) -> Iterator[None]:
    """Create `folder` and its missing parents for the block, then remove the ones this created.

    A folder that is no longer empty when the block ends, because another
    process wrote into it meanwhile, stays with its parents.

    Raises:
        OSError: when a folder cannot be created.
    """
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    finally:
        # Deepest first, so each folder is empty when its turn comes.
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break


def _check_storage_uri(uri: str) -> None:
    """Open the URI with pyarrow and look up its location, so that a bad URI fails before Ray starts.

    Raises:
        ConfigError: naming the URI and the first line of pyarrow's error, or
            the time limit when the storage service does not respond in time.
    """
    import pyarrow
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        if not path.strip("/"):
            scheme = uri.split("://", 1)[0]
            raise ConfigError(f"storage: {uri!r} names no bucket; set storage (or --storage) to a bucket and a folder in it, such as {scheme}://bucket/runs")
        file_info_within(filesystem, path, STORAGE_URI_TIMEOUT_SECONDS)
    except pyarrow.ArrowInvalid as error:
        raise ConfigError(
            f"storage: {uri!r} is not a URI that pyarrow can open ({str(error).splitlines()[0]}); "
            "set storage (or --storage) to a folder or a URI such as s3://bucket/runs or gs://bucket/runs"
        ) from None
    except TimeoutError:
        raise ConfigError(
            f"storage: looking up {uri!r} timed out after {STORAGE_URI_TIMEOUT_SECONDS:.0f} s; "
            "check the URI, the network and the credentials, or set storage (or --storage) to a folder"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"storage: cannot reach {uri!r} ({str(error).splitlines()[0]}); "
            "check the URI, the network and the credentials, or set storage (or --storage) to a folder"
        ) from None


# Seconds a storage URI gets to respond to its first lookup. Without a network, pyarrow's GCS
# client kept retrying for more than 100 s.
STORAGE_URI_TIMEOUT_SECONDS = 30.0


def file_info_within(filesystem: Any, path: str, seconds: float) -> Any:
    """Return `filesystem.get_file_info(path)`, run in a daemon thread so that a hung lookup cannot block the caller.

    Raises:
        TimeoutError: when the lookup has not returned after `seconds`. Its thread is then left to finish or hang.
        Exception: the lookup's own error, such as OSError.
    """
    outcome: dict[str, Any] = {}

    def look_up() -> None:
        try:
            outcome["info"] = filesystem.get_file_info(path)
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=look_up, name="storage-lookup", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"looking up {path!r} timed out after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["info"]


def check_storage_not_file(config: ExperimentConfig) -> None:
    """Reject local storage whose path is, or runs through, a file.

    Raises:
        ConfigError: naming the storage value and the file.
    """
    if config.is_remote_storage:
        return
    blocker = _file_on_path(Path(config.storage_path()))
    if blocker is not None:
        raise ConfigError(
            f"storage: {config.storage!r} is not a folder because {str(blocker)!r} is a file; "
            "set storage (or --storage) to a folder you can write to"
        )


def _file_on_path(folder: Path) -> Path | None:
    """Return the first of `folder` and its parents that is a file, or None.

    A folder that cannot be searched ends the scan, and the write probe then reports it.
    """
    for path in (folder, *folder.parents):
        try:
            if path.exists() and not path.is_dir():
                return path
        except OSError:
            return None
    return None


def check_datasets(config: ExperimentConfig) -> None:
    """Load the tuned dataset and the pretraining source once, so bad data stops the run before Ray starts.

    This catches wrong classes or splits, missing paths, empty folders, classes
    without images, corrupt files, labels out of range and mismatched shapes.

    NOTE: every image is decoded here and again when the embeddings are
    prepared, so a large image folder is read twice per run.

    Raises:
        ConfigError: naming the dataset field and the problem.
    """
    checks = [("dataset", config.dataset)]
    if config.backbone.weights == "pretrained":
        pretrain = config.pretrain_dataset()
        # The schema checks the tuned dataset's path; the pretraining source may
        # inherit its path from the tuned dataset, so its check happens here.
        if pretrain.path is None and pretrain.name in DATASETS_NEEDING_PATH:
            raise ConfigError(f"backbone.pretrain.dataset: {pretrain.name} needs path: {DATASET_PATH_HINTS[pretrain.name]}")
        checks.append(("backbone.pretrain", pretrain))
    for field, dataset in checks:
        try:
            dataset.load()
        except (ValueError, OSError) as error:
            raise ConfigError(f"{field}: {error}") from None


def load_warm_start(config: ExperimentConfig) -> list[tuple[dict[str, Any], float]]:
    """Read the finished trials of an earlier run's results.csv named by `search.warm_start`.

    The file must have a column for every parameter of the current search
    space and `best_<metric>`. It must not tune a head hyperparameter that
    the current space leaves out, and every value must lie inside the current
    bounds. When the earlier run's experiment.json lies beside the file, that
    run must have optimised the same metric in the same mode.

    Returns:
        (configuration, metric value) pairs, in the metric's own sign. A
        failed trial, or one without a finite value, has NaN, so the
        searcher can count it as a failure.

    Raises:
        ConfigError: naming the file and the difference from the current space.
    """
    if config.search.warm_start is None:
        return []
    import pandas as pd

    from tuning.report import STATUS_COMPLETED, STATUS_FAILED

    path = Path(config.search.warm_start).expanduser()
    field = f"search.warm_start: {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{field} is a folder; give the results.csv inside it, such as {str(path / 'results.csv')!r}")
    if not path.is_file():
        raise ConfigError(f"{field} not found; give the results.csv of an earlier run")
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{field} is not a readable CSV file: {error}") from None

    space = config.search.space
    _check_earlier_search(path, config.search, field)
    metric_column = f"best_{config.search.metric}"
    missing = [name for name in [*space, metric_column] if name not in frame.columns]
    if missing:
        raise ConfigError(f"{field} has no column {', '.join(missing)}; the search space or metric changed since that run")
    extra = [name for name in HEAD_HYPERPARAMETERS if name in frame.columns and name not in space]
    if extra:
        raise ConfigError(
            f"{field} tuned {', '.join(extra)}, which the current search space does not; "
            "add them to search.space or start without warm_start"
        )

    if "status" in frame.columns:
        frame = frame[frame["status"].isin([STATUS_COMPLETED, STATUS_FAILED])]
    observations, problems = [], []
    for index, row in frame.iterrows():
        value = float(row[metric_column])
        if "status" in frame.columns and row["status"] == STATUS_FAILED:
            value = math.nan
        point = {}
        for name, parameter in space.items():
            try:
                point[name] = _warm_start_value(row[name], parameter, f"row {index + 2}, {name}")
            except ValueError as error:
                problems.append(str(error))
        observations.append((point, value))
    if problems:
        raise ConfigError(
            f"{field} does not fit the current search space (it changed since that run); widen search.space to cover "
            "these values, or remove warm_start:\n" + "\n".join(f"  {problem}" for problem in problems)
        )
    size = config.search.distinct_configurations
    if size is not None and distinct_points(observations) >= size and not config.search.points_to_evaluate:
        raise ConfigError(
            f"{field} has tried every one of the {size} configurations of the search space, so no trial is left to run; "
            "widen search.space or remove warm_start"
        )
    return observations


def distinct_points(observations: list[tuple[dict[str, Any], float]]) -> int:
    """Count the distinct configurations among warm-start observations, failed ones included."""
    return len({tuple(point.values()) for point, _ in observations})


def _check_earlier_search(path: Path, search: SearchConfig, field: str) -> None:
    """Check that the run whose experiment.json lies beside `path`, if any, optimised the same metric in the same mode.

    A results.csv records each metric at the epoch that was best for the
    earlier run's metric and mode, so its values mean something else under
    another metric or mode. Parameter types may change: the values
    themselves are checked against the current space.

    Raises:
        ConfigError: naming the difference, or the snapshot when it cannot be read.
    """
    snapshot = path.parent / "experiment.json"
    if not snapshot.exists():
        return
    try:
        earlier = json.loads(snapshot.read_text())["search"]
        metric, mode = earlier["metric"], earlier["mode"]
        if metric not in REPORTED_METRICS or mode not in ("min", "max"):
            raise ValueError(f"search.metric {metric!r} and search.mode {mode!r} are not a metric and a mode")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{field}: {str(snapshot)!r} beside it is not a frozen-tune run's experiment.json ({type(error).__name__}: {error}); "
            "restore it from the earlier run or move the results.csv to a folder of its own"
        ) from None
    if metric != search.metric:
        reason = f"its best_ columns hold each metric at the epoch that was best for {metric}"
    elif mode != search.mode:
        reason = f"its best_{metric} column holds each trial's {'lowest' if mode == 'min' else 'highest'} value"
    else:
        return
    raise ConfigError(
        f"{field} comes from a run that optimised {metric} ({mode}), and this experiment optimises "
        f"{search.metric} ({search.mode}); {reason}, so warm-start from a run with the same metric and mode, or remove warm_start"
    )


def _warm_start_value(value: Any, parameter: Any, where: str) -> Any:
    """Convert one cell to the parameter's type and check it against the current bounds.

    Raises:
        ValueError: naming the row and column, when the value does not fit.
    """
    if isinstance(parameter, ChoiceParameter):
        for option in parameter.values:
            if str(option) == str(value) or (not isinstance(option, (str, bool)) and _is_number(value) and float(option) == float(value)):
                return option
        raise ValueError(f"{where}: {value!r} is not one of the current choices {parameter.values}")
    if not _is_number(value):
        raise ValueError(f"{where}: {value!r} is not a number")
    if not math.isfinite(float(value)):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    if isinstance(parameter, IntParameter) and float(value) != round(float(value)):
        raise ValueError(f"{where}: {value!r} is not a whole number")
    number = int(round(float(value))) if isinstance(parameter, IntParameter) else float(value)
    if not parameter.low <= number <= parameter.high:
        raise ValueError(f"{where}: {number!r} is outside the current range [{parameter.low}, {parameter.high}]")
    return number


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def check_cluster_paths(config: ExperimentConfig) -> None:
    """Reject a relative storage or cache_dir in an experiment submitted to a cluster.

    A submitted run starts in the job's working directory, a temporary folder
    that Ray deletes after the job, so a relative path would put the run's
    outputs or the cache there and lose them.

    Raises:
        ConfigError: naming the field and what to use instead.
    """
    if not config.is_remote_storage and not _is_absolute(config.storage):
        raise ConfigError(
            f"storage: {config.storage!r} is a relative path, which on the cluster would point into the job's "
            "temporary working directory; pass --storage with a folder every node can reach (e.g. /mnt/shared/runs) "
            "or a URI such as s3://bucket/runs or gs://bucket/runs"
        )
    if config.cache_dir is not None and not _is_absolute(config.cache_dir):
        raise ConfigError(
            f"cache_dir: {config.cache_dir!r} is a relative path, which on the cluster would point into the job's "
            "temporary working directory; use an absolute path, or leave cache_dir out to use each node's "
            f"${CACHE_DIR_VARIABLE} or ~/.cache/frozen-tune"
        )


def _is_absolute(path: str) -> bool:
    # "~" expands on the cluster to the home folder of the user that runs Ray there.
    return path.startswith("~") or Path(path).is_absolute()
