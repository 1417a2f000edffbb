"""A registry backbone stays frozen in the exported model, even when that model is trained further."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np

from models.backbones import build_feature_extractor, load_backbone
from models.classifier import build_head, export_model
from models.datasets import Dataset
from models.features import compute_embeddings

IMAGE_SIZE = 32


def test_exported_backbone_unchanged_by_training(target: Dataset, tmp_path: Path) -> None:
    backbone = load_backbone("MobileNetV3Small", weights="none", image_size=IMAGE_SIZE, seed=0)
    # get_weights includes the BatchNormalization moving statistics, which
    # training mode would update even where the other weights are frozen.
    original = backbone.cnn.get_weights()
    moving_statistics = [variable.path for variable in backbone.cnn.weights if "moving_" in variable.path]

    extractor = build_feature_extractor(target.raw_shape, target.value_range, IMAGE_SIZE, backbone.cnn)
    embeddings = compute_embeddings(extractor, target.x_train, batch_size=64)
    head = build_head(
        embeddings.shape[1], target.num_classes, embeddings.mean(axis=0), embeddings.var(axis=0),
        {"batch_size": 32}, steps_per_epoch=math.ceil(len(embeddings) / 32),
    )
    head.fit(embeddings, target.y_train, batch_size=32, epochs=1, verbose=0)
    path = export_model(extractor, head, target.class_names, tmp_path / "model.keras")

    # A user who keeps training the exported model end to end, as in fine-tuning the head.
    model = keras.models.load_model(path)
    head_before = [np.array(weight) for weight in model.get_layer("head").get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy")
    model.fit(target.x_train, target.y_train, batch_size=64, epochs=1, verbose=0)
    trained = model.get_layer("feature_extractor").get_layer(backbone.cnn.name).get_weights()

    assert len(moving_statistics) > 20
    assert len(trained) == len(original)
    for index, (after, before) in enumerate(zip(trained, original)):
        np.testing.assert_array_equal(after, before, err_msg=backbone.cnn.weights[index].path)
    # The head did train, so the comparison above can fail.
    head_after = model.get_layer("head").get_weights()
    assert any(not np.array_equal(before, after) for before, after in zip(head_before, head_after))
    assert model.get_layer("feature_extractor").trainable_weights == []
