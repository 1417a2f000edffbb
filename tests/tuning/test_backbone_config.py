"""The backbone section of the experiment file: defaults, files and every problem with its field."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tuning.config import ConfigError, parse_experiment

REPOSITORY = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((REPOSITORY / "examples" / "quickstart.yaml").read_text())


def with_backbone(backbone: dict) -> dict:
    data = copy.deepcopy(BASE)
    data["backbone"] = backbone
    return data


def write_model_archive(path: Path, input_shape: list, layer_names: list[str], nested: dict | None = None) -> Path:
    """A .keras archive with only the configuration a saved model stores, as Keras 3 writes it."""
    layers = [{"class_name": "InputLayer", "name": "input_layer", "config": {"batch_shape": [None, *input_shape], "name": "input_layer"}}]
    for name in layer_names:
        config = {"name": name}
        if nested and name in nested:
            config["layers"] = [{"class_name": "Conv2D", "config": {"name": inner}} for inner in nested[name]]
        layers.append({"class_name": "Dense", "name": name, "config": config})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"name": "model", "layers": layers}}))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    weights = tmp_path / "mobilenet_v2_notop.h5"
    weights.write_bytes(b"weights are read only when the backbone is built")
    return {
        "weights": weights,
        "fixed": write_model_archive(tmp_path / "fixed.keras", [64, 64, 3], ["conv", "bn", "gap", "classes"], nested={"bn": ["inner_conv"]}),
        "variable": write_model_archive(tmp_path / "variable.keras", [None, None, 1], ["conv", "gap", "classes"]),
        "wide": write_model_archive(tmp_path / "wide.keras", [32, 64, 3], ["conv", "classes"]),
        "vectors": write_model_archive(tmp_path / "vectors.keras", [128], ["hidden", "classes"]),
        "weights_only": tmp_path / "model.weights.h5",
        "not_archive": tmp_path / "broken.keras",
    }


def errors(backbone: dict) -> str:
    with pytest.raises(ConfigError) as raised:
        parse_experiment(with_backbone(backbone))
    return str(raised.value)


def test_small_cnn_defaults_unchanged() -> None:
    backbone = parse_experiment(with_backbone({})).backbone

    assert backbone.name == "small_cnn"
    assert backbone.weights == "pretrained"
    assert backbone.image_size == 32
    assert backbone.path is None
    assert backbone.input_range is None
    assert backbone.label == "small_cnn"


@pytest.mark.parametrize(("name", "size"), [("MobileNetV2", 224), ("EfficientNetB3", 300), ("EfficientNetB1", 240), ("ConvNeXtTiny", 224)])
def test_application_defaults(name: str, size: int) -> None:
    backbone = parse_experiment(with_backbone({"name": name})).backbone

    assert backbone.weights == "imagenet"
    assert backbone.image_size == size


def test_weights_file_resolved_from_current_folder(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files["weights"].parent)

    backbone = parse_experiment(with_backbone({"name": "MobileNetV2", "weights": files["weights"].name, "image_size": 96})).backbone

    assert backbone.weights == str(files["weights"])
    assert backbone.image_size == 96


def test_saved_model_defaults(files: dict[str, Path]) -> None:
    backbone = parse_experiment(with_backbone({"path": str(files["fixed"]), "layer": "gap"})).backbone

    assert backbone.name is None
    assert backbone.weights is None
    assert backbone.image_size == 64
    assert backbone.input_range == [0.0, 255.0]
    assert backbone.label == "fixed.keras cut at layer gap"


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ({"name": "mobilenet_v2"}, "backbone.name: unknown backbone 'mobilenet_v2' (did you mean 'MobileNetV2'?); accepted: small_cnn, MobileNetV2"),
        ({"name": "ResNet50", "image_size": 16}, "backbone.image_size: ResNet50 needs an image_size of at least 32 pixels, got 16"),
        ({"name": "small_cnn", "image_size": 4}, "backbone.image_size: small_cnn needs an image_size of at least 8 pixels, got 4"),
        ({"name": "ResNet50", "image_size": 5000}, "backbone.image_size: image_size must be between 1 and 1024 pixels, got 5000"),
        ({"name": "ResNet50", "weights": "pretrained"}, "backbone.weights: weights 'pretrained' applies only to small_cnn; ResNet50 takes imagenet, none"),
        ({"name": "ResNet50", "weights": "ImageNet"}, "backbone.weights: unknown weights 'ImageNet' (did you mean 'imagenet'?)"),
        ({"name": "ResNet50", "weights": "missing/resnet.h5"}, "backbone.weights: weights file 'missing/resnet.h5' not found (looked at "),
        ({"name": "ResNet50", "weights": "team.keras"}, "backbone.weights: weights 'team.keras' is a whole saved model; give it as backbone.path"),
        ({"name": "small_cnn", "weights": "imagenet"}, "backbone.weights: small_cnn takes weights pretrained or none, got 'imagenet'"),
        ({"name": "ResNet50", "layer": "conv5"}, "backbone.layer: layer 'conv5' applies only to a saved model backbone (backbone.path)"),
        ({"name": "ResNet50", "input_range": [0, 1]}, "backbone.input_range: input_range applies only to a saved model backbone"),
        ({"name": "ResNet50", "pretrain": {"epochs": 3}}, "backbone.pretrain: pretrain applies only to small_cnn"),
        ({"path": "missing.keras"}, "backbone.path: saved model"),
        ({"path": "model.onnx"}, "backbone.path: path 'model.onnx' must be a saved Keras model ending in .keras or .h5"),
        ({"name": "ResNet50", "path": "model.keras"}, "backbone.path: set either name (a backbone from the registry) or path (a saved model), not both"),
        ({"nmae": "ResNet50"}, "backbone.nmae: unknown key (did you mean 'name'?)"),
        ({"name": "small_cnn", "precision": "float16"}, "backbone.precision: Input should be 'auto', 'float32' or 'mixed_float16' (got 'float16')"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_invalid_backbone_names_field(backbone: dict, expected: str) -> None:
    assert expected in errors(backbone)


@pytest.mark.parametrize(
    ("file", "extra", "expected"),
    [
        ("fixed", {"layer": "gapp"}, "backbone.layer: layer 'gapp' not found in '{path}' (did you mean 'gap'?); its last layers are: conv, bn, gap, classes (4 layers in all)"),
        ("fixed", {"layer": "inner_conv"}, "backbone.layer: layer 'inner_conv' is inside the nested model 'bn' of '{path}'"),
        ("fixed", {"image_size": 32}, "backbone.image_size: the saved model at '{path}' takes 64x64 images; set image_size to 64 or remove it"),
        ("fixed", {"weights": "none"}, "backbone.weights: weights 'none' does not apply to a saved model backbone"),
        ("fixed", {"input_range": [1.0, 0.0]}, "backbone.input_range: input_range must be [low, high] with low < high, got [1.0, 0.0]"),
        ("fixed", {"input_range": [0.0, 1.0, 2.0]}, "backbone.input_range: input_range must be [low, high], got [0.0, 1.0, 2.0]"),
        ("fixed", {"pretrain": {"epochs": 2}}, "backbone.pretrain: pretrain applies only to small_cnn"),
        ("variable", {}, "backbone.image_size: the saved model at '{path}' accepts images of any size; set image_size"),
        ("wide", {}, "backbone.image_size: the saved model at '{path}' takes 32x64 images, but images are resized to a square"),
        ("vectors", {}, "backbone.image_size: the saved model at '{path}' takes inputs of shape (128,)"),
        ("weights_only", {}, "backbone.path: '{path}' is a weights-only file; use it as weights: with a backbone name"),
        ("not_archive", {}, "backbone.path: '{path}' is not a Keras model archive"),
    ],
)
def test_invalid_saved_model_names_field(file: str, extra: dict, expected: str, files: dict[str, Path]) -> None:
    path = files[file]
    if file == "weights_only":
        path.write_bytes(b"\x89HDF\r\n\x1a\n")
    if file == "not_archive":
        path.write_bytes(b"not a zip archive")

    assert expected.format(path=path) in errors({"path": str(path), **extra})


def test_saved_model_with_variable_size_takes_image_size(files: dict[str, Path]) -> None:
    backbone = parse_experiment(with_backbone({"path": str(files["variable"]), "image_size": 48, "input_range": [-1, 1]})).backbone

    assert backbone.image_size == 48
    assert backbone.input_range == [-1.0, 1.0]
    assert backbone.label == "variable.keras cut at the layer before its classifier"


def test_every_backbone_problem_reported_together(files: dict[str, Path]) -> None:
    message = errors({"path": str(files["fixed"]), "layer": "gapp", "weights": "imagenet", "image_size": 32, "input_range": [2, 1]})

    lines = message.splitlines()[1:]
    assert len(lines) == 4
    assert any(line.strip().startswith("backbone.layer: layer 'gapp' not found") for line in lines)
    assert any(line.strip().startswith("backbone.weights: weights 'imagenet' does not apply") for line in lines)
    assert any(line.strip().startswith("backbone.image_size: the saved model at") for line in lines)
    assert any(line.strip().startswith("backbone.input_range: input_range must be [low, high] with low < high") for line in lines)


def test_check_prints_resolved_backbone(files: dict[str, Path], tmp_path: Path) -> None:
    data = with_backbone({"path": str(files["fixed"])})
    experiment = tmp_path / "saved.yaml"
    experiment.write_text(yaml.safe_dump(data))

    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "check", str(experiment)], capture_output=True, text=True, timeout=300,
    )
    printed = yaml.safe_load(completed.stdout)

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert printed["backbone"]["path"] == str(files["fixed"])
    assert printed["backbone"]["image_size"] == 64
    assert printed["backbone"]["input_range"] == [0.0, 255.0]
    assert printed["backbone"]["name"] is None
