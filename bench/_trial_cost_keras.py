"""The TensorFlow side of bench/trial_cost.py: pretrain the backbone, preview KerasTuner's configurations, run KerasTuner.

Each command runs in a process of its own, started by bench/trial_cost.py, so
that the KerasTuner search has its own wall time and memory:

    python bench/_trial_cost_keras.py prepare PLAN.json OUTPUT.json
    python bench/_trial_cost_keras.py search PLAN.json OUTPUT.json

PLAN.json is written by bench/trial_cost.py; OUTPUT.json receives the result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

# Keras' MobileNetV2 uses BatchNormalization momentum 0.999, so after the ~80
# steps of a short pretraining its moving statistics would still be close to
# their initial values and inference-mode embeddings nearly constant. At 0.9
# the statistics follow the trained weights within a few dozen steps.
PRETRAIN_BATCHNORM_MOMENTUM = 0.9
PRETRAIN_BATCH_SIZE = 64
PRETRAIN_LEARNING_RATE = 1e-3

# Training images whose embeddings give the head's standardization statistics.
# frozen-tune uses all training embeddings. On images each embedding costs a
# backbone pass, so the KerasTuner side estimates the statistics from a sample.
STATISTICS_SAMPLE = 1000


def pretrain_backbone(plan: dict[str, Any]) -> dict[str, Any]:
    """Train MobileNetV2 with a 10-class classifier on the pretraining images and save it as a .keras file.

    The saved network takes (image_size, image_size, 3) images in [-1, 1]
    (MobileNetV2's own input range). Its layers are top-level, so frozen-tune
    can cut it at the pooling layer named by plan["layer"].
    """
    import keras
    from keras import layers

    from models.preprocessing import build_preprocessing

    started = time.monotonic()
    keras.utils.set_random_seed(plan["seed"])
    arrays = np.load(plan["pretrain_data"])
    x, y = arrays["x"].astype(np.float32), arrays["y"]
    size = plan["image_size"]

    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=plan["alpha"], include_top=False, weights=None)
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = PRETRAIN_BATCHNORM_MOMENTUM
    embedding = layers.GlobalAveragePooling2D(name=plan["layer"])(base.output)
    probabilities = layers.Dense(int(y.max()) + 1, activation="softmax", name="classifier")(embedding)
    network = keras.Model(base.input, probabilities, name="mobilenet_v2_fashion_mnist")

    # Raw 28x28 images in 0..255 become the network's [-1, 1] input the way
    # frozen-tune converts them: its preprocessing to [0, 1], then input_range.
    raw = keras.Input(shape=x.shape[1:], name="raw_image")
    unit_range = build_preprocessing(x.shape[1:], (0.0, 255.0), size)(raw)
    low, high = plan["input_range"]
    scaled = layers.Rescaling(high - low, offset=low, name="to_input_range")(unit_range)
    trainer = keras.Model(raw, network(scaled))
    trainer.compile(
        optimizer=keras.optimizers.Adam(PRETRAIN_LEARNING_RATE), loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )
    history = trainer.fit(x, y, batch_size=PRETRAIN_BATCH_SIZE, epochs=plan["pretrain_epochs"], verbose=2)
    network.save(plan["backbone"])
    return {
        "pretrain_seconds": time.monotonic() - started,
        "pretrain_images": len(x),
        "pretrain_training_accuracy": float(history.history["accuracy"][-1]),
    }


def declare_space(hp, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Declare frozen-tune's search space as KerasTuner hyperparameters and return their values."""
    values = {}
    for name, parameter in space.items():
        kind = parameter["type"]
        if kind == "loguniform":
            values[name] = hp.Float(name, parameter["low"], parameter["high"], sampling="log")
        elif kind == "uniform":
            values[name] = hp.Float(name, parameter["low"], parameter["high"])
        elif kind == "int":
            values[name] = hp.Int(name, parameter["low"], parameter["high"])
        elif kind == "choice":
            values[name] = hp.Choice(name, parameter["values"])
        else:
            raise ValueError(f"Search space parameter {name!r} has type {kind!r}; this benchmark maps loguniform, uniform, int and choice.")
    return values


def load_images(plan: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = np.load(plan["data"])
    return {
        "x_train": arrays["x_train"].astype(np.float32), "y_train": arrays["y_train"],
        "x_val": arrays["x_val"].astype(np.float32), "y_val": arrays["y_val"],
    }


def build_extractor(plan: dict[str, Any], raw_shape: tuple[int, ...]):
    """Build frozen-tune's feature extractor for the saved backbone, the same network its exported model contains."""
    from models.backbones import build_feature_extractor, load_saved_model_backbone

    backbone = load_saved_model_backbone(
        Path(plan["backbone"]), layer=plan["layer"], image_size=plan["image_size"], input_range=tuple(plan["input_range"]),
    )
    return build_feature_extractor(raw_shape, (0.0, 255.0), plan["image_size"], backbone.cnn)


def make_tuner(plan: dict[str, Any], hypermodel, folder: str, recorder=None):
    """Build KerasTuner's BayesianOptimization tuner. With a recorder, it also times each trial and epoch."""
    import keras_tuner

    class TimedBayesianOptimization(keras_tuner.BayesianOptimization):
        def on_trial_begin(self, trial):
            if recorder is not None:
                recorder.begin_trial(trial.trial_id)
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if recorder is not None:
                recorder.end_trial(trial.trial_id)

    # KerasTuner 1.4.8 replaces a seed of 0 by a random one (`seed or random.randint(1, 10000)`
    # in its Oracle), so the seed it gets is never 0.
    return TimedBayesianOptimization(
        hypermodel=hypermodel, objective=keras_tuner.Objective("val_loss", direction="min"),
        max_trials=plan["trials"], seed=plan["seed"] + 1, directory=folder, project_name="trial_cost", overwrite=True,
    )


def make_hypermodel(plan: dict[str, Any], images: dict[str, np.ndarray]):
    """Build the hypermodel: raw images -> frozen backbone -> frozen-tune's head, fit on the images."""
    import keras
    import keras_tuner

    from models.classifier import build_head

    extractor = build_extractor(plan, images["x_train"].shape[1:])
    sample = extractor.predict(images["x_train"][:STATISTICS_SAMPLE], batch_size=256, verbose=0)
    mean, variance = sample.mean(axis=0), sample.var(axis=0)
    num_classes = int(images["y_train"].max()) + 1
    train_size = len(images["x_train"])

    class FrozenBackboneHead(keras_tuner.HyperModel):
        def build(self, hp):
            hyperparameters = {**plan["head"], **declare_space(hp, plan["space"])}
            steps_per_epoch = math.ceil(train_size / hyperparameters["batch_size"])
            head = build_head(sample.shape[1], num_classes, mean, variance, hyperparameters, steps_per_epoch)
            raw = keras.Input(shape=images["x_train"].shape[1:], name="raw_image")
            model = keras.Model(raw, head(extractor(raw)))
            # The head's optimizer carries its learning-rate schedule and has no
            # variables yet, so the whole model can take it over.
            model.compile(optimizer=head.optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            return model

        def fit(self, hp, model, *args, **kwargs):
            return model.fit(*args, batch_size=hp.get("batch_size"), **kwargs)

    return FrozenBackboneHead()


def make_recorder():
    """Build a Keras callback that records the wall and CPU time of each trial and epoch, and each epoch's metrics."""
    import keras

    class TrialRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.trials: dict[str, dict[str, Any]] = {}
            self.current: dict[str, Any] = {}
            self.epoch_started = 0.0
            self.epoch_cpu_started = 0.0

        def __deepcopy__(self, memo):
            # KerasTuner deep-copies the callbacks for every trial, but the records must stay in this one object.
            return self

        def begin_trial(self, trial_id: str) -> None:
            self.current = {"started": time.monotonic(), "cpu_started": time.process_time(), "epochs": []}
            self.trials[trial_id] = self.current

        def end_trial(self, trial_id: str) -> None:
            record = self.trials[trial_id]
            record["seconds"] = time.monotonic() - record["started"]
            record["cpu_seconds"] = time.process_time() - record["cpu_started"]

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.monotonic()
            self.epoch_cpu_started = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            record = {"seconds": time.monotonic() - self.epoch_started, "cpu_seconds": time.process_time() - self.epoch_cpu_started}
            record.update({name: float(value) for name, value in (logs or {}).items()})
            self.current["epochs"].append(record)

    return TrialRecorder()


def prepare(plan: dict[str, Any]) -> dict[str, Any]:
    """Pretrain the backbone unless its file exists, then list the configurations KerasTuner will try, in order.

    A throwaway tuner with the same seed and space draws them. KerasTuner
    1.4.8's Bayesian tuner samples its first 3 x (number of hyperparameters)
    trials at random from its seed, so the real search draws the same ones.
    bench/trial_cost.py checks that it did.
    """
    result: dict[str, Any] = {"pretrained_now": False}
    if not Path(plan["backbone"]).exists():
        result.update(pretrain_backbone(plan))
        result["pretrained_now"] = True

    images = load_images(plan)
    hypermodel = make_hypermodel(plan, images)
    with tempfile.TemporaryDirectory() as folder:
        tuner = make_tuner(plan, hypermodel, folder)
        trials = [tuner.oracle.create_trial(f"preview-{index}") for index in range(plan["trials"])]
        result["configurations"] = [dict(trial.hyperparameters.values) for trial in trials]
    return result


def search(plan: dict[str, Any]) -> dict[str, Any]:
    """Run KerasTuner's search on the images and return per-trial times, epochs and metrics."""
    started = time.monotonic()
    import keras
    import keras_tuner
    import tensorflow as tf

    imported = time.monotonic()
    images = load_images(plan)
    hypermodel = make_hypermodel(plan, images)
    recorder = make_recorder()
    tuner = make_tuner(plan, hypermodel, plan["keras_tuner_dir"], recorder)
    early_stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=plan["patience"])
    set_up = time.monotonic()

    tuner.search(
        images["x_train"], images["y_train"], validation_data=(images["x_val"], images["y_val"]),
        epochs=plan["epochs"], callbacks=[early_stopping, recorder], verbose=0,
    )
    searched = time.monotonic()

    trials = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda item: int(item[0])):
        record = recorder.trials.get(trial_id, {"epochs": [], "seconds": None, "cpu_seconds": None})
        epochs = record["epochs"]
        best = min(range(len(epochs)), key=lambda index: epochs[index]["val_loss"]) if epochs else None
        trials.append({
            "trial_id": trial_id,
            "status": trial.status,
            "message": (trial.message or "")[-2000:],
            "configuration": dict(trial.hyperparameters.values),
            "seconds": record["seconds"],
            "cpu_seconds": record["cpu_seconds"],
            "epochs": epochs,
            "best_epoch": None if best is None else best + 1,
            "best_val_loss": None if best is None else epochs[best]["val_loss"],
            "best_val_accuracy": None if best is None else epochs[best]["val_accuracy"],
        })
    return {
        "import_seconds": imported - started,
        "setup_seconds": set_up - imported,
        "search_seconds": searched - set_up,
        "trials": trials,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "keras_tuner": keras_tuner.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "search"))
    parser.add_argument("plan", type=Path, help="JSON plan written by bench/trial_cost.py.")
    parser.add_argument("output", type=Path, help="JSON file for the result.")
    arguments = parser.parse_args()

    plan = json.loads(arguments.plan.read_text())
    result = prepare(plan) if arguments.command == "prepare" else search(plan)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
