"""`frozen-tune run` with a saved-model backbone, a weights file that does not fit, and an unknown layer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from keras import layers

from tuning.config import parse_experiment

SEARCH = {
    "num_trials": 2, "max_concurrent": 2, "initial_points": 2, "seed": 0,
    "space": {"learning_rate": {"type": "loguniform", "low": 3.0e-3, "high": 3.0e-2}},
}


@pytest.fixture(scope="module")
def team_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small gray-image CNN with BatchNormalization, trained briefly on digits 0-4 and saved."""
    from models.datasets import load_dataset

    source = load_dataset("digits", classes=[0, 1, 2, 3, 4], seed=0)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    features = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    features = layers.Conv2D(16, 3, padding="same", name="conv")(features)
    features = layers.BatchNormalization(name="bn")(features)
    features = layers.ReLU(name="relu")(features)
    features = layers.GlobalAveragePooling2D(name="gap")(features)
    probabilities = layers.Dense(5, activation="softmax", name="classes")(features)
    model = keras.Model(inputs, probabilities, name="team")

    images = keras.ops.image.resize(source.x_train[..., None] * (255.0 / 16.0), (16, 16))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images, source.y_train, epochs=2, batch_size=32, verbose=0)

    path = tmp_path_factory.mktemp("team") / "team.keras"
    model.save(path)
    return path


def experiment(name: str, backbone: dict, folder: Path) -> dict:
    return {
        "name": name,
        "dataset": {"name": "digits", "classes": [5, 6, 7, 8, 9], "seed": 0},
        "backbone": backbone,
        "search": SEARCH,
        "training": {"max_epochs": 4, "patience": 2},
        "storage": str(folder / "runs"),
        "cache_dir": str(folder / "cache"),
    }


def run_command(data: dict, folder: Path) -> subprocess.CompletedProcess:
    """Run `frozen-tune run` in a fresh process, so its Ray instance and objects end with it."""
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )


def test_saved_model_backbone_stays_frozen(team_model: Path, tmp_path: Path) -> None:
    from tuning.experiment import prepare_data

    data = experiment("team", {"path": str(team_model)}, tmp_path)
    completed = run_command(data, tmp_path)
    exported = keras.models.load_model(tmp_path / "runs" / "team" / "best_model.keras")
    original = keras.models.load_model(team_model, compile=False)
    cut = exported.get_layer("feature_extractor").get_layer("saved_model_backbone").get_layer("team_cut")

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "cut at layer 'gap' (16 features) at 16x16 pixels" in completed.stderr
    assert "embeddings computed (float32), cache entry" in completed.stderr
    # Every variable of the cut model, BatchNormalization statistics included,
    # is the saved model's own after the trials and the export.
    for name in ("conv", "bn"):
        for after, before in zip(cut.get_layer(name).get_weights(), original.get_layer(name).get_weights()):
            np.testing.assert_array_equal(after, before, err_msg=name)
    assert len(cut.get_layer("bn").get_weights()) == 4

    summary, embeddings = prepare_data(parse_experiment(data))
    entry = Path(summary.embedding_cache_path)

    assert summary.embedding_cache_hit is True
    assert summary.embedding_size == 16
    assert sorted(path.name for path in entry.iterdir()) == ["manifest.json", "train.npy", "val.npy"]
    assert summary.embedding_cache_bytes == sum(path.stat().st_size for path in entry.iterdir())
    assert isinstance(embeddings.train.base, np.memmap)
    assert embeddings.train.shape == (summary.train_size, 16)
    np.testing.assert_allclose(summary.mean, np.asarray(embeddings.train).mean(axis=0), rtol=1e-4, atol=1e-6)


def test_mismatched_weights_file_exits_with_2(tmp_path: Path) -> None:
    weights = tmp_path / "small.weights.h5"
    keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg").save_weights(weights)
    data = experiment("mismatch", {"name": "MobileNetV3Large", "weights": str(weights), "image_size": 32}, tmp_path)

    completed = run_command(data, tmp_path)

    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"error: backbone: Weights file '{weights}' does not fit MobileNetV3Large" in completed.stderr
    assert not (tmp_path / "runs" / "mismatch").exists()


def test_unknown_layer_rejected_before_ray(team_model: Path, tmp_path: Path) -> None:
    data = experiment("bad", {"path": str(team_model), "layer": "gapp", "weights": "imagenet"}, tmp_path)

    completed = run_command(data, tmp_path)

    assert completed.returncode == 2
    assert "backbone.weights: weights 'imagenet' does not apply to a saved model backbone" in completed.stderr
    assert "backbone.layer: layer 'gapp' not found in" in completed.stderr
    assert "(did you mean 'gap'?)" in completed.stderr
    assert not (tmp_path / "runs" / "bad").exists()
