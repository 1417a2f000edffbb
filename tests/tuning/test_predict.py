"""`frozen-tune predict` on the tiny run's best model and digit images written as real PNG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.datasets import load_dataset

IMAGES = 12


def run_predict(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuning", "predict", *arguments], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


@pytest.fixture(scope="module")
def model_and_images(first_run, tmp_path_factory):
    folder, _, completed = first_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    # The tiny run's own validation split: digits 5-9 the model was not trained on.
    data = load_dataset("digits", classes=[5, 6, 7, 8, 9], validation_split=0.2, seed=0)
    images = tmp_path_factory.mktemp("digit_images")
    paths, labels = [], []
    for index in range(IMAGES):
        path = images / f"digit_{index:02d}.png"
        # Intensities 0-16 scaled to 8-bit grayscale, as an image editor would save them.
        Image.fromarray(np.round(data.x_val[index] * 255 / 16).astype(np.uint8), mode="L").save(path)
        paths.append(path)
        labels.append(data.class_names[data.y_val[index]])
    return folder / "runs" / "tiny" / "best_model.keras", images, paths, labels


def test_predict_json_names_right_classes(model_and_images):
    model, _, paths, labels = model_and_images

    completed = run_predict(str(model), *map(str, paths), "--json", "--top", "2")

    assert completed.returncode == 0, completed.stderr[-3000:]
    predictions = json.loads(completed.stdout)
    assert [prediction["path"] for prediction in predictions] == [str(path) for path in paths]
    predicted = [prediction["top"][0]["class"] for prediction in predictions]
    correct = sum(guess == label for guess, label in zip(predicted, labels))
    assert correct >= IMAGES - 1, f"predicted {predicted}, true {labels}"
    for prediction in predictions:
        top = prediction["top"]
        assert len(top) == 2
        assert top[0]["probability"] >= top[1]["probability"]
        assert top[0]["class"] == str(top[0]["index"] + 5)
        assert 0.0 <= top[1]["probability"] <= top[0]["probability"] <= 1.0


def test_predict_text_for_folder(model_and_images):
    model, folder, paths, labels = model_and_images

    completed = run_predict(str(model), str(folder))

    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == IMAGES
    first_path, ranked = lines[0].split(": ", 1)
    assert first_path == str(paths[0])
    assert len(ranked.split(", ")) == 3
    assert ranked.split(" ")[0] == labels[0]


@pytest.mark.parametrize(("make_input", "expected"), [
    (lambda folder: [str(folder / "missing.png")], "not found"),
    (lambda folder: [str(folder / "empty")], "contains no images"),
    (lambda folder: [str(folder / "notes.txt")], "is not an image file"),
    (lambda folder: [str(folder / "broken.png")], "cannot read image"),
], ids=["missing_image", "empty_folder", "not_an_image", "corrupt_image"])
def test_predict_bad_images_exit_2(model_and_images, tmp_path, make_input, expected):
    model, *_ = model_and_images
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)

    completed = run_predict(str(model), *make_input(tmp_path))

    assert completed.returncode == 2
    assert expected in completed.stderr
    assert completed.stdout == ""


def test_predict_foreign_model_exit_2(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"not a zip")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(image)

    completed = run_predict(str(fake), str(image))

    assert completed.returncode == 2
    assert "is not a .keras archive" in completed.stderr
    assert "best_model.keras" in completed.stderr
