"""The dataset sections of an experiment file: loader options, the pretraining source, and bad data caught before Ray."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tuning.config import ConfigError, check_datasets, load_experiment, parse_experiment

REPOSITORY = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((REPOSITORY / "examples" / "quickstart.yaml").read_text())


def experiment(dataset: dict, pretrain_dataset: object = "digits", **pretrain: object) -> dict:
    data = copy.deepcopy(QUICKSTART)
    data["dataset"] = dataset
    data["backbone"]["pretrain"] = {"dataset": pretrain_dataset, "classes": [0, 1], "epochs": 1, **pretrain}
    return data


def problems(data: dict) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_experiment(data)
    return str(raised.value)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"name": "npz"}, "dataset: npz needs path: a file written by numpy.savez"),
        ({"name": "image_folder"}, "dataset: image_folder needs path: a folder with one sub-folder of images per class"),
        ({"name": "digits", "path": "data"}, "dataset: digits takes no path"),
        ({"name": "fashion_mnist", "image_size": 28}, "dataset: image_size applies only to image_folder; remove them for fashion_mnist"),
        ({"name": "cifar10", "color_mode": "grayscale", "test_path": "t"}, "color_mode, test_path apply only to image_folder"),
        ({"name": "npz", "path": "a.npz", "download": False}, "download applies only to fashion_mnist, cifar10; remove it for npz"),
        ({"name": "image_folder", "path": "p", "color_mode": "cmyk"}, "dataset.color_mode: Input should be 'rgb' or 'grayscale'"),
        ({"name": "image_folder", "path": "p", "image_size": 0}, "dataset.image_size.0: Input should be greater than or equal to 1"),
        ({"name": "image_folder", "path": "p", "image_size": [8, 8, 8]}, "dataset.image_size: List should have at most 2 items"),
        ({"name": "image_folder", "pth": "p"}, "dataset.pth: unknown key (did you mean 'path'?)"),
        ({"name": "mnist"}, "dataset.name: unknown dataset 'mnist'; accepted: digits, fashion_mnist, cifar10, image_folder, npz"),
    ],
)
def test_invalid_dataset_sections(dataset: dict, expected: str) -> None:
    assert expected in problems(experiment(dataset))


def test_paths_absolute_from_working_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)

    config = parse_experiment(experiment({"name": "image_folder", "path": "photos", "test_path": "~/held-out", "image_size": 64}))

    assert config.dataset.path == str(tmp_path / "photos")
    assert config.dataset.test_path == str(Path.home() / "held-out")
    assert config.dataset.image_size == [64, 64]


def test_pretrain_same_dataset_inherits_source(tmp_path: Path) -> None:
    tuned = {"name": "image_folder", "path": str(tmp_path / "a"), "test_path": str(tmp_path / "t"), "image_size": [20, 30],
             "color_mode": "grayscale", "classes": ["x", "y"]}

    config = parse_experiment(experiment(tuned, "image_folder", classes=["p", "q"], seed=4))
    pretrain = config.pretrain_dataset()

    assert pretrain.name == "image_folder"
    assert pretrain.path == str(tmp_path / "a")
    assert pretrain.image_size == [20, 30]
    assert pretrain.color_mode == "grayscale"
    assert pretrain.test_path is None
    assert pretrain.classes == ["p", "q"]
    assert pretrain.seed == 4


def test_pretrain_own_source(tmp_path: Path) -> None:
    tuned = {"name": "npz", "path": str(tmp_path / "tuned.npz")}

    own_file = parse_experiment(experiment(tuned, {"name": "npz", "path": str(tmp_path / "source.npz")})).pretrain_dataset()
    other_dataset = parse_experiment(experiment(tuned, "fashion_mnist")).pretrain_dataset()

    assert own_file.path == str(tmp_path / "source.npz")
    assert other_dataset.name == "fashion_mnist"
    assert other_dataset.path is None


def test_pretrain_source_options_checked() -> None:
    message = problems(experiment({"name": "digits"}, {"name": "digits", "image_size": 8}))

    assert "backbone.pretrain.dataset: image_size applies only to image_folder" in message


def _npz(path: Path, labels: np.ndarray, **extra: np.ndarray) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    np.savez(path, x_train=images, y_train=labels, **extra)
    return path


def test_pretrain_without_path_caught_by_check(tmp_path: Path) -> None:
    config = parse_experiment(experiment({"name": "npz", "path": str(_npz(tmp_path / "a.npz", np.arange(20) % 2))}, "image_folder"))

    with pytest.raises(ConfigError) as raised:
        check_datasets(config)

    assert str(raised.value) == "backbone.pretrain.dataset: image_folder needs path: a folder with one sub-folder of images per class"


@pytest.mark.parametrize(
    ("damage", "prefix", "expected"),
    [
        ("missing folder", "dataset: ", "image_folder path"),
        ("corrupt image", "dataset: ", "cat/1.png"),
        ("single class", "dataset: ", "single class sub-folder 'cat'"),
        ("pretrain labels out of range", "backbone.pretrain: ", "labels out of range (7)"),
    ],
)
def test_bad_data_caught_by_check(tmp_path: Path, damage: str, prefix: str, expected: str) -> None:
    folder = tmp_path / "pets"
    for name in ("cat", "dog"):
        for index in range(4):
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (index * 40, 10, 10)).save(folder / name / f"{index}.png")
    source = {"name": "npz", "path": str(_npz(tmp_path / "source.npz", np.arange(20) % 2))}
    if damage == "missing folder":
        folder = tmp_path / "absent"
    elif damage == "corrupt image":
        (folder / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif damage == "single class":
        for file in (folder / "dog").iterdir():
            file.unlink()
        (folder / "dog").rmdir()
    elif damage == "pretrain labels out of range":
        labels = np.array([0, 1] * 9 + [7, 1])
        source = {"name": "npz", "path": str(_npz(tmp_path / "source.npz", labels, class_names=np.array(["a", "b"])))}
    config = parse_experiment(experiment({"name": "image_folder", "path": str(folder), "validation_split": 0.5}, source))

    with pytest.raises(ConfigError) as raised:
        check_datasets(config)

    assert str(raised.value).startswith(prefix)
    assert expected in str(raised.value)


def test_loaded_file_keeps_dataset_options(tmp_path: Path) -> None:
    path = tmp_path / "fashion.yaml"
    data = experiment({"name": "fashion_mnist", "classes": ["Sandal", 9], "download": False}, "fashion_mnist")
    path.write_text(yaml.safe_dump(data))

    config = load_experiment(path)

    assert config.dataset.classes == ["Sandal", 9]
    assert config.dataset.download is False
    assert config.pretrain_dataset().download is False
