"""The embedding cache key follows every input that changes the numbers, with real backbones."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import pytest
from keras import layers

from models.backbones import PREPROCESSING_VERSION, load_backbone, load_saved_model_backbone
from models.datasets import Dataset, load_dataset
from models.features import embedding_cache_key


def _weights_file(path: Path, seed: int) -> str:
    keras.utils.set_random_seed(seed)
    network = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    network.save_weights(path)
    return str(path)


def _saved_model(path: Path) -> Path:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(4, 3, name="conv"),
        layers.ReLU(name="relu"),
        layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, activation="softmax", name="classes"),
    ])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def keys(target: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("keys")
    file_a = _weights_file(folder / "a.weights.h5", seed=5)
    file_b = _weights_file(folder / "b.weights.h5", seed=6)
    copy_of_a = folder / "copy" / "a.weights.h5"
    copy_of_a.parent.mkdir()
    shutil.copyfile(file_a, copy_of_a)
    saved = _saved_model(folder / "model.keras")

    def key(backbone, dataset: Dataset = target, image_size: int = 32, version: str = PREPROCESSING_VERSION) -> str:
        return embedding_cache_key(backbone.weights_key, dataset, image_size, version)

    def small(weights: str = "none", seed: int = 0, image_size: int = 32):
        return load_backbone("MobileNetV3Small", weights=weights, image_size=image_size, seed=seed)

    return {
        "base": key(small()),
        "base rebuilt": key(small()),
        "backbone name": key(load_backbone("MobileNetV3Large", weights="none", image_size=32, seed=0)),
        "random weights seed": key(small(seed=1)),
        "weights file": key(small(weights=file_a)),
        "weights file copied elsewhere": key(small(weights=str(copy_of_a))),
        "other weights file": key(small(weights=file_b)),
        "image size": key(small(image_size=40), image_size=40),
        "preprocessing version": key(small(), version=PREPROCESSING_VERSION + "-next"),
        "dataset classes": key(small(), dataset=load_dataset("digits", classes=[5, 6, 7, 8], seed=0)),
        "dataset split seed": key(small(), dataset=load_dataset("digits", classes=[5, 6, 7, 8, 9], seed=1)),
        "saved model layer gap": key(load_saved_model_backbone(saved, layer="gap"), image_size=16),
        "saved model layer conv": key(load_saved_model_backbone(saved, layer="conv"), image_size=16),
        "saved model input range": key(load_saved_model_backbone(saved, layer="gap", input_range=(0.0, 1.0)), image_size=16),
    }


def test_key_repeats_for_same_inputs(keys: dict[str, str]) -> None:
    assert keys["base rebuilt"] == keys["base"]
    # The weights are identified by their content, not by the file's location.
    assert keys["weights file copied elsewhere"] == keys["weights file"]


@pytest.mark.parametrize(
    "variant",
    [
        "backbone name",
        "random weights seed",
        "weights file",
        "other weights file",
        "image size",
        "preprocessing version",
        "dataset classes",
        "dataset split seed",
        "saved model layer gap",
    ],
)
def test_key_changes_with_input(variant: str, keys: dict[str, str]) -> None:
    assert keys[variant] != keys["base"]


def test_keys_all_distinct(keys: dict[str, str]) -> None:
    distinct = {name: key for name, key in keys.items() if name not in ("base rebuilt", "weights file copied elsewhere")}

    assert len(set(distinct.values())) == len(distinct)
    assert keys["saved model layer conv"] != keys["saved model layer gap"]
    assert keys["saved model input range"] != keys["saved model layer gap"]
