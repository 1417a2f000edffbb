"""prepare_data finds cached small_cnn embeddings without TensorFlow, keeps each precision apart, and recovers from damaged cache files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

# Runs prepare_data in a fresh interpreter and prints its summary, the embeddings' sum and
# whether TensorFlow was imported. With "full" as second argument the cache-key shortcut is off.
SCRIPT = """
import json, sys
import tuning.experiment as experiment
from tuning.config import parse_experiment

if sys.argv[2] == "full":
    experiment._cached_small_cnn_weights = lambda config, source: None
prepared, data = experiment.prepare_data(parse_experiment(json.loads(sys.argv[1])))
print(json.dumps({
    "description": prepared.backbone_description, "backbone_cache_hit": prepared.backbone_cache_hit,
    "embedding_cache_hit": prepared.embedding_cache_hit, "path": prepared.embedding_cache_path,
    "precision": prepared.embedding_precision,
    "train_sum": float(data.train.sum()), "val_sum": float(data.val.sum()),
    "tensorflow": "tensorflow" in sys.modules,
}))
"""


def experiment(cache: Path, weights: str) -> dict:
    return {
        "name": "prepare",
        "dataset": {"name": "digits", "classes": [5, 6, 7, 8, 9], "seed": 0},
        "backbone": {"name": "small_cnn", "image_size": 16, "weights": weights,
                     "pretrain": {"dataset": "digits", "classes": [0, 1, 2, 3, 4], "epochs": 1}},
        "search": {"num_trials": 1, "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2}}},
        "cache_dir": str(cache),
    }


def run_prepare(data: dict, mode: str = "shortcut") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(data), mode], capture_output=True, text=True, timeout=600)


def prepare(data: dict, mode: str = "shortcut") -> dict:
    completed = run_prepare(data, mode)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("weights", ["pretrained", "none"])
def test_cache_hit_needs_no_tensorflow(tmp_path, weights):
    data = experiment(tmp_path / "cache", weights)

    first = prepare(data)
    hit = prepare(data)
    full = prepare(data, "full")

    assert first["embedding_cache_hit"] is False
    assert first["tensorflow"] is True
    assert hit["embedding_cache_hit"] is True
    assert hit["tensorflow"] is False
    assert full["tensorflow"] is True
    # The key lookup returns the same summary as building the backbone.
    assert {**hit, "tensorflow": None} == {**full, "tensorflow": None}
    assert hit["backbone_cache_hit"] is (weights == "pretrained")
    assert hit["train_sum"] == first["train_sum"]
    assert hit["val_sum"] == first["val_sum"]


def test_mixed_precision_separate_cache_entry(tmp_path):
    data = experiment(tmp_path / "cache", "pretrained")
    mixed_data = {**data, "backbone": {**data["backbone"], "precision": "mixed_float16"}}

    automatic = prepare(data)
    mixed = prepare(mixed_data)
    mixed_again = prepare(mixed_data)
    float32 = prepare({**data, "backbone": {**data["backbone"], "precision": "float32"}})

    # Outside a Ray task with a GPU, "auto" computes in float32.
    assert automatic["precision"] == "float32"
    assert float32["embedding_cache_hit"] is True
    assert float32["path"] == automatic["path"]
    assert mixed["precision"] == "mixed_float16"
    assert mixed["embedding_cache_hit"] is False
    assert mixed["path"] != automatic["path"]
    assert json.loads((Path(mixed["path"]) / "manifest.json").read_text())["description"]["precision"] == "mixed_float16"
    assert mixed["train_sum"] != automatic["train_sum"]
    assert mixed["train_sum"] == pytest.approx(automatic["train_sum"], rel=1e-3)
    assert mixed_again["embedding_cache_hit"] is True
    assert mixed_again["tensorflow"] is False
    assert mixed_again["train_sum"] == mixed["train_sum"]


def test_unusable_half_precision_rejected(tmp_path):
    # Random MobileNetV2 weights give embeddings near 1e-12, which round to 0 in float16.
    data = {
        **experiment(tmp_path / "cache", "none"),
        "backbone": {"name": "MobileNetV2", "weights": "none", "image_size": 32, "precision": "mixed_float16"},
    }

    completed = run_prepare(data)

    assert completed.returncode != 0
    assert "the backbone's embeddings of 64 training images differ from the float32 ones by 100.0%" in completed.stderr
    assert "Set backbone.precision to float32 or auto." in completed.stderr
    assert not list((tmp_path / "cache").glob("embeddings/*"))


def test_auto_without_visible_gpu_keeps_float32(tmp_path, caplog):
    from tuning.config import parse_experiment
    from tuning.experiment import _half_precision_backbone

    config = parse_experiment(experiment(tmp_path / "cache", "none"))
    cnn = object()

    with caplog.at_level(logging.INFO, logger="tuning.experiment"):
        chosen, precision = _half_precision_backbone(config, cnn, config.dataset.load())

    assert config.backbone.precision == "auto"
    assert chosen is cnn
    assert precision == "float32"
    assert "a GPU that TensorFlow does not see" in caplog.text


def test_missing_weights_file_builds_backbone(tmp_path):
    # The export builds the backbone from the cached weights, so cached embeddings alone do not count.
    data = experiment(tmp_path / "cache", "pretrained")
    first = prepare(data)
    (weights_file,) = (tmp_path / "cache" / "backbones").glob("small_cnn-*.weights.h5")
    weights_file.unlink()

    again = prepare(data)

    assert again["tensorflow"] is True
    assert again["backbone_cache_hit"] is False
    assert again["embedding_cache_hit"] is True
    assert again["path"] == first["path"]
    assert weights_file.exists()


def test_truncated_weights_file_fails_early(tmp_path):
    # The file exists but no longer opens, so the backbone is built and its loader names the file.
    data = experiment(tmp_path / "cache", "pretrained")
    prepare(data)
    (weights_file,) = (tmp_path / "cache" / "backbones").glob("small_cnn-*.weights.h5")
    weights_file.write_bytes(weights_file.read_bytes()[:5000])

    completed = run_prepare(data)

    assert completed.returncode != 0
    assert f"Cached backbone weights {weights_file} could not be loaded" in completed.stderr
    assert "Delete the file to pretrain again" in completed.stderr


def test_damaged_embeddings_recomputed(tmp_path):
    data = experiment(tmp_path / "cache", "pretrained")
    first = prepare(data)
    train_file = Path(first["path"]) / "train.npy"
    train_file.write_bytes(train_file.read_bytes()[:1000])

    completed = run_prepare(data)
    again = json.loads(completed.stdout.strip().splitlines()[-1])
    repaired = prepare(data)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("Ignoring unreadable cached embeddings") == 1
    assert again["embedding_cache_hit"] is False
    assert again["train_sum"] == first["train_sum"]
    assert repaired["embedding_cache_hit"] is True
    assert repaired["tensorflow"] is False
    assert repaired["train_sum"] == first["train_sum"]
