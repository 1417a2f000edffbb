"""Score the exported model on the dataset's held-out test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tuning.config import ExperimentConfig

logger = logging.getLogger(__name__)

# Images per forward pass when the exported model scores the test split. It only changes memory use.
TEST_BATCH_SIZE = 256

# Probabilities are clipped to this floor before the logarithm, so one
# confidently wrong image gives a large but finite loss.
_PROBABILITY_FLOOR = 1e-7


def score_on_test(config: ExperimentConfig, model_path: Path) -> dict[str, Any] | None:
    """Load the exported model file and score it on the test split of the experiment's dataset.

    The model file is loaded with keras.models.load_model, so the score is that
    of the file users get. The test images never take part in training or in
    choosing the best trial.

    Args:
        config: The experiment; its dataset is loaded again with the same classes.
        model_path: The exported model, e.g. best_model.keras.

    Returns:
        None when the dataset has no test split, else a dictionary with
        `accuracy`, `loss` (mean sparse categorical cross-entropy), `images`
        (the number of test images) and `accuracy_per_class` (class name to accuracy).
    """
    import keras

    dataset = config.dataset.load()
    if not dataset.has_test:
        logger.info("dataset %s has no test split; best_model.keras is not scored on held-out images", config.dataset.name)
        return None

    model = keras.models.load_model(model_path)
    probabilities = np.asarray(model.predict(dataset.x_test, batch_size=TEST_BATCH_SIZE, verbose=0), dtype=np.float64)
    predictions = probabilities.argmax(axis=1)
    correct = predictions == dataset.y_test
    true_class_probability = probabilities[np.arange(len(dataset.y_test)), dataset.y_test]

    per_class = {}
    for label, name in enumerate(dataset.class_names):
        in_class = dataset.y_test == label
        if in_class.any():
            per_class[name] = float(correct[in_class].mean())

    scores = {
        "accuracy": float(correct.mean()),
        "loss": float(-np.log(np.maximum(true_class_probability, _PROBABILITY_FLOOR)).mean()),
        "images": int(len(dataset.y_test)),
        "accuracy_per_class": per_class,
    }
    logger.info(
        "best_model.keras on %d held-out test images: accuracy %.4f, loss %.4f",
        scores["images"], scores["accuracy"], scores["loss"],
    )
    return scores
