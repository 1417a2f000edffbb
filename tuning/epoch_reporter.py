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
    """Report every epoch to Ray Tune, checkpoint the best weights, and stop after `patience` epochs without improvement.

    The best weights are kept in memory and written as a checkpoint at most
    every `settings.checkpoint_interval_seconds`, and always at the trial's
    last epoch, marked as finished. A trial that loses its worker retrains
    from its last checkpoint; a finished trial is never trained again.

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
        self.checkpointed_at = time.monotonic()
        self.best_weights: list[Any] | None = None
        self.checkpointed_best_epoch = None if best is None else best["best_epoch"]

    def patience_used_up(self) -> bool:
        return self.epochs_without_improvement >= self.settings.patience

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # A resumed trial starts from the weights of its checkpoint, which are its best ones.
        if self.best is not None:
            self.best_weights = self.model.get_weights()

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
            self.best_weights = self.model.get_weights()
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

        report = {
            **metrics, **self.best, "epoch": epoch, "epoch_seconds": time.monotonic() - self.epoch_started,
            "startup_seconds": self.startup_seconds, **self.labels, "ended_at": time.time(),
        }
        finished = epoch >= self.settings.max_epochs or self.patience_used_up()
        unsaved = self.best["best_epoch"] != self.checkpointed_best_epoch
        due = time.monotonic() - self.checkpointed_at >= self.settings.checkpoint_interval_seconds
        if finished or (unsaved and due):
            with tempfile.TemporaryDirectory() as folder:
                self._save_best(Path(folder), epoch, finished)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
            self.checkpointed_at = time.monotonic()
            self.checkpointed_best_epoch = self.best["best_epoch"]
        else:
            tune.report(report)
        if self.patience_used_up():
            self.model.stop_training = True

    def _save_best(self, folder: Path, epoch: int, finished: bool) -> None:
        """Write the best weights and the trial state into `folder`."""
        path = str(folder / HEAD_WEIGHTS_FILE)
        if self.best["best_epoch"] == epoch:
            self.model.save_weights(path)
        else:
            latest_weights = self.model.get_weights()
            self.model.set_weights(self.best_weights)
            self.model.save_weights(path)
            self.model.set_weights(latest_weights)
        state = {"epoch": self.best["best_epoch"], "last_epoch": epoch, "finished": finished,
                 "best": self.best, "hyperparameters": self.hyperparameters}
        (folder / TRIAL_STATE_FILE).write_text(json.dumps(state))
