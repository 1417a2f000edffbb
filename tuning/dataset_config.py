"""The dataset sections of an experiment file: which dataset, where its files are, which classes, which split.

`tuning.config` validates a whole experiment with these models, so the rules
for each dataset's options live here. This module imports neither Ray nor
TensorFlow; `DatasetConfig.load` imports the loaders only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_validator, model_validator

def _not_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# A float field that rejects YAML's true and false, which pydantic would take as 1.0 and 0.0.
# Integer fields use StrictInt for the same reason.
Number = Annotated[float, BeforeValidator(_not_boolean)]


DATASET_NAMES: tuple[str, ...] = ("digits", "fashion_mnist", "cifar10", "image_folder", "npz")
DATASETS_WITH_PATH: tuple[str, ...] = ("fashion_mnist", "cifar10", "image_folder", "npz")
DATASETS_NEEDING_PATH: tuple[str, ...] = ("image_folder", "npz")
DOWNLOADABLE_DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10")
DATASET_PATH_HINTS: dict[str, str] = {
    "image_folder": "a folder with one sub-folder of images per class",
    "npz": "a file written by numpy.savez with x_train and y_train",
}
# Largest side, in pixels, that image folder images may be resized to. The
# backbone resizes them to backbone.image_size, at most 1024 (MAX_IMAGE_SIZE in
# tuning.config), so larger images would only take memory.
MAX_DATASET_IMAGE_SIDE = 1024


class DatasetSource(BaseModel):
    """The source of a dataset's images: the dataset's name and the options of its loader."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "digits"
    path: str | None = None
    test_path: str | None = None
    image_size: list[Annotated[int, Field(ge=1, le=MAX_DATASET_IMAGE_SIDE)]] | None = Field(None, min_length=2, max_length=2)
    color_mode: Literal["rgb", "grayscale"] = "rgb"
    download: bool = True

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASET_NAMES)}")
        return name

    @field_validator("path", "test_path")
    @classmethod
    def _absolute_path(cls, path: str | None) -> str | None:
        # Relative paths are relative to the folder the command runs from, and
        # are made absolute here so Ray workers with another working folder find them.
        if path is None:
            return None
        return str(Path(path).expanduser().absolute())

    @field_validator("image_size", mode="before")
    @classmethod
    def _square_image_size(cls, image_size: Any) -> Any:
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            return [image_size, image_size]
        return image_size

    @model_validator(mode="after")
    def _options_of_this_dataset(self) -> DatasetSource:
        problems = []
        if self.path is not None and self.name not in DATASETS_WITH_PATH:
            problems.append(f"{self.name} takes no path (scikit-learn ships it); remove path")
        image_folder_options = sorted({"test_path", "image_size", "color_mode"} & self.model_fields_set)
        if image_folder_options and self.name != "image_folder":
            verb = "applies" if len(image_folder_options) == 1 else "apply"
            problems.append(f"{', '.join(image_folder_options)} {verb} only to image_folder; remove them for {self.name}")
        if "download" in self.model_fields_set and self.name not in DOWNLOADABLE_DATASETS:
            problems.append(f"download applies only to {', '.join(DOWNLOADABLE_DATASETS)}; remove it for {self.name}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def loader_options(self) -> dict[str, Any]:
        """Return the keyword arguments of models.datasets.load_dataset that this source sets."""
        options: dict[str, Any] = {"path": self.path}
        if self.name == "image_folder":
            options.update(test_path=self.test_path, image_size=self.image_size, color_mode=self.color_mode)
        if self.name in DOWNLOADABLE_DATASETS:
            options["download"] = self.download
        return options


class DatasetConfig(DatasetSource):
    """The tuned dataset: a source, the classes to keep and the validation split."""

    classes: list[int | str] | None = None
    validation_split: Number = Field(0.2, gt=0.0, lt=1.0)
    seed: StrictInt = 0

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, classes: list[int | str] | None) -> list[int | str] | None:
        if classes is None:
            return None
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {classes}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct, got {classes}")
        return classes

    @model_validator(mode="after")
    def _path_given(self) -> DatasetConfig:
        if self.path is None and self.name in DATASETS_NEEDING_PATH:
            raise ValueError(f"{self.name} needs path: {DATASET_PATH_HINTS[self.name]}")
        return self

    def load(self) -> Any:
        """Load this dataset with models.datasets.load_dataset and return the Dataset.

        Raises:
            ValueError: for classes, splits or data on disk that cannot be used.
            OSError: when a file cannot be read.
        """
        from models.datasets import load_dataset

        return load_dataset(
            self.name, classes=self.classes, validation_split=self.validation_split, seed=self.seed, **self.loader_options(),
        )
