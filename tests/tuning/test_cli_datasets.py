"""The `frozen-tune` command with dataset files: bad data stops it with exit code 2, a test split gets scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

SPACE = {
    "learning_rate": {"type": "loguniform", "low": 3.0e-3, "high": 3.0e-2},
    "units_1": {"type": "int", "low": 32, "high": 128},
}


def experiment(dataset: dict, name: str = "datasets") -> dict:
    return {
        "name": name,
        "dataset": dataset,
        "backbone": {"name": "small_cnn", "image_size": 16, "weights": "pretrained",
                     "pretrain": {"dataset": "digits", "classes": [0, 1, 2, 3, 4], "epochs": 3}},
        "search": {"metric": "val_loss", "num_trials": 2, "max_concurrent": 2, "initial_points": 2, "seed": 0, "space": SPACE},
        "training": {"max_epochs": 6, "patience": 3},
    }


def run_cli(command: str, experiment_file: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "FROZEN_TUNE_CACHE": str(cwd / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "tuning", command, str(experiment_file), *extra],
        capture_output=True, text=True, timeout=900, env=environment, cwd=cwd,
    )


def _write_folder(root: Path) -> None:
    for name, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / name).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (8, 8), colour).save(root / name / f"{index}.png")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("corrupt image", "error: dataset: cannot read image '{root}/dog/2.png'"),
        ("missing folder", "error: dataset: image_folder path '{root}-moved' not found"),
        ("class with no images", "error: dataset: class folder '{root}/eel' contains no images"),
        ("npz shape mismatch", "x_train images have shape (8, 8) but x_val images have shape (8, 9)"),
    ],
)
def test_bad_dataset_exits_2_without_run_folder(tmp_path: Path, damage: str, expected: str) -> None:
    root = tmp_path / "pets"
    _write_folder(root)
    dataset = {"name": "image_folder", "path": "pets", "validation_split": 0.5}
    if damage == "corrupt image":
        (root / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    elif damage == "missing folder":
        root.rename(tmp_path / "pets-moved-away")
        dataset["path"] = "pets-moved"
    elif damage == "class with no images":
        (root / "eel").mkdir()
    elif damage == "npz shape mismatch":
        np.savez(tmp_path / "data.npz", x_train=np.zeros((10, 8, 8)), y_train=np.arange(10) % 2,
                 x_val=np.zeros((4, 8, 9)), y_val=np.arange(4) % 2)
        dataset = {"name": "npz", "path": "data.npz"}
    experiment_file = tmp_path / "bad.yaml"
    experiment_file.write_text(yaml.safe_dump(experiment(dataset)))

    completed = run_cli("run", experiment_file, "--storage", "runs", cwd=tmp_path)
    checked = run_cli("check", experiment_file, cwd=tmp_path)

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert expected.format(root=root) in completed.stderr
    assert not (tmp_path / "runs").exists()
    assert checked.returncode == 2
    assert expected.format(root=root) in checked.stderr


@pytest.fixture(scope="module")
def run_with_test_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    folder = tmp_path_factory.mktemp("test_split")
    digits = load_digits()
    keep = digits.target >= 5
    images, labels = digits.images[keep].astype(np.float32), digits.target[keep]
    # Every fourth image is held out as the test split.
    test = np.arange(len(labels)) % 4 == 0
    arrays = {
        "x_train": images[~test], "y_train": labels[~test], "x_test": images[test], "y_test": labels[test],
        "value_range": np.array([0.0, 16.0]),
    }
    np.savez(folder / "digits.npz", **arrays)
    experiment_file = folder / "npz.yaml"
    experiment_file.write_text(yaml.safe_dump(experiment({"name": "npz", "path": "digits.npz", "classes": [5, 6, 7, 8, 9]})))

    completed = run_cli("run", experiment_file, "--storage", "runs", cwd=folder)
    return folder, completed, arrays


def test_best_model_scored_on_test_split(run_with_test_split) -> None:
    folder, completed, arrays = run_with_test_split
    run_dir = folder / "runs" / "datasets"

    assert completed.returncode == 0, completed.stderr[-3000:]
    best = json.loads((run_dir / "best_config.json").read_text())
    test = best["test"]
    assert test["images"] == len(arrays["y_test"])
    assert set(test["accuracy_per_class"]) == {"5", "6", "7", "8", "9"}
    assert test["accuracy"] > 0.8
    assert test["loss"] > 0.0
    assert f"test_accuracy      {test['accuracy']:.4f} on {test['images']} held-out test images" in completed.stdout

    report = (run_dir / "report.md").read_text()
    assert f"On {test['images']} held-out test images" in report
    assert f"test accuracy {test['accuracy']:.4f}" in report


def test_test_score_matches_model_file(run_with_test_split) -> None:
    import keras

    folder, _, arrays = run_with_test_split
    run_dir = folder / "runs" / "datasets"
    best = json.loads((run_dir / "best_config.json").read_text())

    model = keras.models.load_model(run_dir / "best_model.keras")
    predictions = model.predict(arrays["x_test"], verbose=0).argmax(axis=1)

    assert best["test"]["accuracy"] == pytest.approx(float(np.mean(predictions == arrays["y_test"] - 5)))
