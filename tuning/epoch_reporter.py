"""The Keras callback that turns one `fit()` of a trial into per-epoch Ray Tune reports."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
from ray import tune

from tuning.trainable import HEAD_WEIGHTS_FILE, TRIAL_STATE_FILE, TrialSettings


class EpochReporter(keras.callbacks.Callback):
    """Report every epoch to Ray Tune, checkpoint the best epoch, and stop after `patience` epochs without improvement.

    Raises:
        FloatingPointError: from `on_epoch_end` when the training or validation
            loss is NaN or infinite; it ends `fit()`.
    """

    def __init__(self, settings: TrialSettings, hyperparameters: dict[str, Any], first_epoch: int, best: dict[str, Any] | None,
                 labels: dict[str, Any], startup_seconds: float, progress: dict[str, int]) -> None:
        super().__init__()
        self.settings, self.hyperparameters, self.best, self.labels = settings, hyperparameters, best, labels
        self.startup_seconds, self.progress = startup_seconds, progress
        self.sign = -1.0 if settings.mode == "min" else 1.0
        self.epochs_without_improvement = 0 if best is None else first_epoch - best["best_epoch"]
        self.epoch_started = time.monotonic()

    def patience_used_up(self) -> bool:
        return self.epochs_without_improvement >= self.settings.patience

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.progress["epoch"] = epoch + 1
        self.epoch_started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        epoch += 1
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        for name in ("loss", "val_loss"):
            if not math.isfinite(metrics.get(name, math.nan)):
                raise FloatingPointError(
                    f"{name} became {metrics.get(name)} at epoch {epoch} "
                    f"(learning_rate={self.hyperparameters['learning_rate']!r}); the head diverged"
                )

        value = metrics[self.settings.metric]
        improved = self.best is None or self.sign * value > self.sign * self.best[f"best_{self.settings.metric}"]
        if improved:
            self.best = {"best_epoch": epoch, **{f"best_{name}": metric for name, metric in metrics.items()}}
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

        report = {
            **metrics, **self.best, "epoch": epoch, "epoch_seconds": time.monotonic() - self.epoch_started,
            "startup_seconds": self.startup_seconds, **self.labels, "ended_at": time.time(),
        }
        if improved:
            with tempfile.TemporaryDirectory() as folder:
                self.model.save_weights(str(Path(folder) / HEAD_WEIGHTS_FILE))
                state = {"epoch": epoch, "best": self.best, "hyperparameters": self.hyperparameters}
                (Path(folder) / TRIAL_STATE_FILE).write_text(json.dumps(state))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(report)
        if self.patience_used_up():
            self.model.stop_training = True
