from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from models.classifier import METADATA_ENTRY, build_head, export_model, read_model_metadata
from models.datasets import Dataset
from models.features import compute_embeddings

# Runs in a fresh interpreter that never imports frozen-tune code: it loads the
# file with plain Keras (default safe_mode=True) and predicts on raw images.
LOAD_AND_PREDICT = """
import sys

import keras
import numpy as np

model = keras.models.load_model(sys.argv[1])
probabilities = model.predict(np.load(sys.argv[2]), verbose=0)
np.save(sys.argv[3], probabilities)

project_modules = sorted(name for name in sys.modules if name.split(".")[0] in ("models", "tuning"))
print("PROJECT_MODULES=" + ",".join(project_modules))
"""


@pytest.fixture(scope="module")
def exported(extractor: keras.Model, trained_head, target: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "nested" / "digits.keras"
    metadata = {
        "experiment": "transfer-test",
        "image_size": 16,
        "hyperparameters": {"units_1": np.int64(128), "dropout": np.float32(0.25)},
        "value_range": np.array([0.0, 16.0]),
    }
    return export_model(extractor, trained_head.head, target.class_names, path, metadata=metadata)


def test_export_writes_one_archive(exported: Path) -> None:
    assert exported.name == "digits.keras"
    assert exported.is_file()
    # The temporary file was renamed onto the final one.
    assert [entry.name for entry in exported.parent.iterdir()] == [exported.name]
    with zipfile.ZipFile(exported) as archive:
        names = archive.namelist()
    assert METADATA_ENTRY in names
    assert "config.json" in names
    assert "model.weights.h5" in names


def test_export_metadata_round_trip(exported: Path) -> None:
    metadata = read_model_metadata(exported)

    assert metadata == {
        "class_names": ["5", "6", "7", "8", "9"],
        "experiment": "transfer-test",
        "image_size": 16,
        "hyperparameters": {"units_1": 128, "dropout": 0.25},
        "value_range": [0.0, 16.0],
    }


def test_export_loads_in_fresh_process(
    exported: Path, extractor: keras.Model, trained_head, target: Dataset, tmp_path: Path
) -> None:
    images = target.x_val[:40]
    images_path = tmp_path / "images.npy"
    probabilities_path = tmp_path / "probabilities.npy"
    np.save(images_path, images)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"

    completed = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(exported), str(images_path), str(probabilities_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "PROJECT_MODULES=\n" in completed.stdout, completed.stdout
    loaded_probabilities = np.load(probabilities_path)
    expected = trained_head.head.predict(compute_embeddings(extractor, images), verbose=0)
    assert loaded_probabilities.shape == (40, 5)
    np.testing.assert_allclose(loaded_probabilities, expected, atol=1e-5)
    accuracy = np.mean(loaded_probabilities.argmax(axis=1) == target.y_val[:40])
    assert accuracy >= 0.85


def test_export_model_keeps_backbone_frozen(exported: Path, target: Dataset) -> None:
    model = keras.models.load_model(exported)
    images = target.x_val[:16]

    one_batch = model.predict(images, batch_size=16, verbose=0)
    single_images = model.predict(images, batch_size=1, verbose=0)

    np.testing.assert_allclose(one_batch, single_images, atol=1e-5)
    assert model.input_shape == (None, 8, 8)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())


def test_export_replaces_existing_file(extractor: keras.Model, trained_head, target: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(b"old content")

    export_model(extractor, trained_head.head, target.class_names, path)

    assert read_model_metadata(path) == {"class_names": target.class_names}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model.keras"]


def _small_head(embedding_dim: int, num_classes: int) -> keras.Model:
    return build_head(
        embedding_dim,
        num_classes,
        np.zeros(embedding_dim, np.float32),
        np.ones(embedding_dim, np.float32),
        {"units_1": 4},
        steps_per_epoch=1,
    )


@pytest.mark.parametrize(
    ("file_name", "head_shape", "class_names", "metadata", "message"),
    [
        ("model.h5", (128, 5), ["5", "6", "7", "8", "9"], None, "must end in '.keras'"),
        ("model.keras", (12, 5), ["5", "6", "7", "8", "9"], None, "extractor outputs 128 features but the head expects 12"),
        ("model.keras", (128, 5), ["5", "6"], None, "2 class names were given but the head has 5 outputs"),
        ("model.keras", (128, 2), ["5", "6"], {"class_names": ["x"]}, "metadata contains the key 'class_names'"),
        ("model.keras", (128, 2), ["5", "6"], {"when": object()}, "metadata is not JSON-serializable"),
    ],
)
def test_export_rejects_invalid_arguments(
    extractor: keras.Model,
    tmp_path: Path,
    file_name: str,
    head_shape: tuple[int, int],
    class_names: list[str],
    metadata: dict | None,
    message: str,
) -> None:
    head = _small_head(*head_shape)

    with pytest.raises(ValueError, match=message):
        export_model(extractor, head, class_names, tmp_path / file_name, metadata=metadata)

    assert list(tmp_path.iterdir()) == []


def test_read_metadata_rejects_plain_keras_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.keras"
    _small_head(4, 2).save(path)

    with pytest.raises(ValueError, match=f"has no {METADATA_ENTRY} entry"):
        read_model_metadata(path)


def test_read_metadata_rejects_non_archive(tmp_path: Path) -> None:
    path = tmp_path / "text.keras"
    path.write_text(json.dumps({"class_names": ["a"]}))

    with pytest.raises(ValueError, match="is not a .keras archive"):
        read_model_metadata(path)


def test_read_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.keras not found"):
        read_model_metadata(tmp_path / "missing.keras")
