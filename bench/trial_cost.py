"""Compare the cost of a trial: KerasTuner training the whole network on images against frozen-tune on cached embeddings.

Both sides tune the same head on the same frozen backbone and data:

- data: a seeded random subset of Fashion-MNIST's training images for training
  and of its test images for validation, read from the gzip IDX files of
  Debian's dataset-fashion-mnist package and written to an .npz file;
- backbone: MobileNetV2 (alpha 1.0) at 96x96 pixels, pretrained for
  --pretrain-epochs epochs on other Fashion-MNIST training images and saved
  as a .keras file (a network with random weights and BatchNormalization in
  inference mode gives nearly constant embeddings);
- head configurations: the first --trials configurations that KerasTuner's
  BayesianOptimization draws (seeded); frozen-tune gets exactly those as
  `search.points_to_evaluate`;
- training: --epochs epochs at most, early stopping on val_loss with
  --patience, 2 TensorFlow threads each.

The runs alternate so that machine noise hits both sides: frozen-tune with an
empty embedding cache, then KerasTuner, then frozen-tune again with the cache
filled. frozen-tune runs as `python -m tuning run EXPERIMENT` and its figures
come from results.csv and each trial's result.json. KerasTuner runs in a
process of its own (bench/_trial_cost_keras.py). Every command's process tree
is sampled for memory (bench/_process_tree.py).

    python bench/trial_cost.py [--work-dir DIR] [--trials 3] [--epochs 4] [--patience 2]

The summary goes to stdout and, with every per-trial record, to
WORK_DIR/trial_cost.json. Start Ray only where it cannot reach other hosts
(see README: offline runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from _process_tree import TreeRun, run_sampled

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from models.datasets.fashion_mnist import DEBIAN_FOLDER, read_fashion_mnist  # noqa: E402 - needs the path above
KERAS_SIDE = Path(__file__).resolve().parent / "_trial_cost_keras.py"

SEARCH_SPACE = {
    "learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
    "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "units_1": {"type": "int", "low": 64, "high": 512},
    "l2": {"type": "loguniform", "low": 1.0e-6, "high": 1.0e-3},
    "batch_size": {"type": "choice", "values": [64, 128, 256]},
}
# Hyperparameters both sides hold fixed: one hidden layer, no decay, ReLU and Adam.
FIXED_HEAD = {"units_2": 0, "units_3": 0, "decay_rate": 0.0, "activation": "relu", "optimizer": "adam"}
EMBEDDING_LAYER = "embedding"
INPUT_RANGE = [-1.0, 1.0]
THREADS = 2

_EMBEDDING_LOG = re.compile(r"computed embeddings for (\d+) images in ([\d.]+) s")


def write_data(work: Path, arguments: argparse.Namespace) -> dict[str, str]:
    """Write the benchmark split (data.npz) and the disjoint pretraining images (pretrain.npz)."""
    source = read_fashion_mnist(Path(arguments.data), download=False)
    train_images, train_labels = source.x_train, source.y_train
    test_images, test_labels = source.x_test, source.y_test

    generator = np.random.default_rng(arguments.seed)
    order = generator.permutation(len(train_images))
    train = order[: arguments.train_images]
    pretrain = order[arguments.train_images : arguments.train_images + arguments.pretrain_images]
    val = generator.permutation(len(test_images))[: arguments.val_images]

    data, pretrain_data = work / "data.npz", work / "pretrain.npz"
    np.savez(
        data, x_train=train_images[train], y_train=train_labels[train].astype(np.int64),
        x_val=test_images[val], y_val=test_labels[val].astype(np.int64), class_names=np.array(source.class_names),
    )
    np.savez(pretrain_data, x=train_images[pretrain], y=train_labels[pretrain].astype(np.int64))
    return {"data": str(data), "pretrain_data": str(pretrain_data)}


def run_keras_side(command: str, plan_path: Path, work: Path, env: dict[str, str]) -> tuple[dict[str, Any], TreeRun]:
    output = work / f"keras_{command}.json"
    run = run_sampled([sys.executable, str(KERAS_SIDE), command, str(plan_path), str(output)], env)
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-5000:])
        raise SystemExit(f"bench/_trial_cost_keras.py {command} failed with exit code {run.returncode}")
    return json.loads(output.read_text()), run


def write_experiment(plan: dict[str, Any], configurations: list[dict[str, Any]], path: Path) -> None:
    experiment = {
        "name": "trial-cost",
        "dataset": {"name": "npz", "path": plan["data"]},
        "backbone": {
            "path": plan["backbone"], "layer": EMBEDDING_LAYER, "image_size": plan["image_size"], "input_range": INPUT_RANGE,
        },
        "head": FIXED_HEAD,
        "search": {
            "metric": "val_loss", "mode": "min", "num_trials": len(configurations), "max_concurrent": 1,
            "initial_points": len(configurations), "seed": plan["seed"], "space": SEARCH_SPACE,
            "points_to_evaluate": configurations,
        },
        "training": {"max_epochs": plan["epochs"], "patience": plan["patience"]},
        "resources": {"cpus_per_trial": THREADS, "gpus_per_trial": 0},
        "storage": str(Path(plan["work"]) / "runs"),
        "cache_dir": str(Path(plan["work"]) / "cache"),
    }
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))


def run_frozen_tune(experiment: Path, name: str, plan: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run `python -m tuning run` in a fresh process and collect its per-trial and per-epoch figures."""
    run = run_sampled([sys.executable, "-m", "tuning", "run", str(experiment), "--name", name], env, cwd=REPOSITORY)
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-5000:])
        raise SystemExit(f"frozen-tune run {name} failed with exit code {run.returncode}")

    frame = pd.read_csv(Path(plan["work"]) / "runs" / name / "results.csv")
    failed = frame[frame["status"] != "TERMINATED"]
    if not failed.empty:
        raise SystemExit(f"{len(failed)} frozen-tune trials of run {name} failed; the first: {failed['error'].iloc[0]}")
    trials = []
    for _, row in frame.iterrows():
        reports = [json.loads(line) for line in (Path(row["path"]) / "result.json").read_text().splitlines() if line.strip()]
        trials.append({
            "configuration": {parameter: _plain(row[parameter]) for parameter in SEARCH_SPACE},
            "status": row["status"],
            "seconds": float(row["wall_seconds"]),
            "startup_seconds": float(row["startup_seconds"]),
            "epoch_seconds": [report["epoch_seconds"] for report in reports if "epoch_seconds" in report],
            "epochs_run": int(row["epochs_run"]),
            "best_epoch": int(row["best_epoch"]),
            "best_val_loss": float(row["best_val_loss"]),
            "best_val_accuracy": float(row["best_val_accuracy"]),
            "started_at": float(row["started_at"]),
            "ended_at": float(row["ended_at"]),
        })

    # The trials run one after another in reused Ray workers, so the tree's CPU
    # time from the first trial's start to the last trial's end is their cost,
    # Ray's own processes and the searcher included.
    trial_phase_cpu = run.cpu_between(min(trial["started_at"] for trial in trials), max(trial["ended_at"] for trial in trials))
    match = _EMBEDDING_LOG.search(run.stderr)
    return {
        "name": name,
        "wall_seconds": run.wall_seconds,
        "cpu_seconds": run.cpu_seconds,
        "trial_cpu_seconds_mean": trial_phase_cpu / len(trials),
        "peak_rss_mb": run.peak_rss_mb,
        "peak_pss_mb": run.peak_pss_mb,
        "peak_processes": run.peak_processes,
        "embedding_seconds": float(match.group(2)) if match else None,
        "embedded_images": int(match.group(1)) if match else None,
        "trials": trials,
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def same_configuration(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Compare two configurations. Floats may differ in the last digits after frozen-tune's log10 round trip."""
    for name in SEARCH_SPACE:
        a, b = first[name], second[name]
        if isinstance(a, float) or isinstance(b, float):
            if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif a != b:
            return False
    return True


def break_even_trials(fixed_ours: float, per_trial_ours: float, fixed_theirs: float, per_trial_theirs: float) -> int | None:
    """Return the smallest number of trials n >= 1 at which fixed + n x per-trial is no larger for frozen-tune, or None if never."""
    if fixed_ours <= fixed_theirs and per_trial_ours <= per_trial_theirs:
        return 1
    if per_trial_ours >= per_trial_theirs:
        return None
    return max(1, math.ceil((fixed_ours - fixed_theirs) / (per_trial_theirs - per_trial_ours)))


def summarize(ours_cold: dict[str, Any], keras_tuner: dict[str, Any], keras_run: TreeRun, ours_warm: dict[str, Any]) -> dict[str, Any]:
    """Compute the ratios, fixed costs, break-even, accuracy differences and memory peaks of the three runs."""
    ours_trials = ours_cold["trials"] + ours_warm["trials"]
    ours_trial_seconds = [trial["seconds"] for trial in ours_trials]
    ours_epoch_seconds = [seconds for trial in ours_trials for seconds in trial["epoch_seconds"]]
    keras_trial_seconds = [trial["seconds"] for trial in keras_tuner["trials"]]
    keras_epoch_seconds = [epoch["seconds"] for trial in keras_tuner["trials"] for epoch in trial["epochs"]]
    # A trial's first epoch also traces the training step, so the later epochs are the steady state.
    ours_steady_seconds = [seconds for trial in ours_trials for seconds in trial["epoch_seconds"][1:]]
    keras_steady_seconds = [epoch["seconds"] for trial in keras_tuner["trials"] for epoch in trial["epochs"][1:]]

    # Everything a run spends outside its trials: start-up, embeddings, outputs.
    fixed_ours = ours_cold["wall_seconds"] - sum(trial["seconds"] for trial in ours_cold["trials"])
    fixed_ours_warm = ours_warm["wall_seconds"] - sum(trial["seconds"] for trial in ours_warm["trials"])
    fixed_keras = keras_run.wall_seconds - sum(keras_trial_seconds)

    # CPU time barely changes when other processes compete for the cores, unlike wall time.
    keras_trial_cpu = [trial["cpu_seconds"] for trial in keras_tuner["trials"]]
    ours_trial_cpu = (ours_cold["trial_cpu_seconds_mean"] + ours_warm["trial_cpu_seconds_mean"]) / 2

    accuracy = []
    for index, trial in enumerate(keras_tuner["trials"]):
        row = {"configuration": trial["configuration"], "keras_tuner": trial["best_val_accuracy"], "keras_tuner_epochs": len(trial["epochs"])}
        for label, run in (("ours_cold", ours_cold), ("ours_warm", ours_warm)):
            matches = [ours for ours in run["trials"] if same_configuration(ours["configuration"], trial["configuration"])]
            row[label] = matches[0]["best_val_accuracy"] if matches else None
            row[f"{label}_epochs"] = matches[0]["epochs_run"] if matches else None
        accuracy.append(row)
    differences = [abs(row[label] - row["keras_tuner"]) * 100 for row in accuracy for label in ("ours_cold", "ours_warm") if row[label] is not None]

    return {
        "keras_tuner_trial_seconds_median": float(np.median(keras_trial_seconds)),
        "keras_tuner_trial_seconds_mean": float(np.mean(keras_trial_seconds)),
        "ours_trial_seconds_median": float(np.median(ours_trial_seconds)),
        "ours_trial_seconds_mean": float(np.mean(ours_trial_seconds)),
        "trial_ratio_median": float(np.median(keras_trial_seconds) / np.median(ours_trial_seconds)),
        "trial_ratio_mean": float(np.mean(keras_trial_seconds) / np.mean(ours_trial_seconds)),
        "keras_tuner_epoch_seconds_median": float(np.median(keras_epoch_seconds)),
        "ours_epoch_seconds_median": float(np.median(ours_epoch_seconds)),
        "epoch_ratio_median": float(np.median(keras_epoch_seconds) / np.median(ours_epoch_seconds)),
        "keras_tuner_steady_epoch_seconds_median": float(np.median(keras_steady_seconds)),
        "ours_steady_epoch_seconds_median": float(np.median(ours_steady_seconds)),
        "steady_epoch_ratio_median": float(np.median(keras_steady_seconds) / np.median(ours_steady_seconds)),
        "keras_tuner_trial_cpu_seconds_mean": float(np.mean(keras_trial_cpu)),
        "ours_trial_cpu_seconds_mean": ours_trial_cpu,
        "trial_cpu_ratio_mean": float(np.mean(keras_trial_cpu) / ours_trial_cpu),
        "embedding_seconds": ours_cold["embedding_seconds"],
        "embedded_images": ours_cold["embedded_images"],
        "cold_minus_warm_wall_seconds": ours_cold["wall_seconds"] - ours_warm["wall_seconds"],
        "fixed_seconds_ours_cold": fixed_ours,
        "fixed_seconds_ours_warm": fixed_ours_warm,
        "fixed_seconds_keras_tuner": fixed_keras,
        "break_even_trials": break_even_trials(fixed_ours, np.mean(ours_trial_seconds), fixed_keras, np.mean(keras_trial_seconds)),
        "accuracy": accuracy,
        "max_accuracy_difference_points": max(differences) if differences else None,
        "wall_seconds": {"ours_cold": ours_cold["wall_seconds"], "keras_tuner": keras_run.wall_seconds, "ours_warm": ours_warm["wall_seconds"]},
        "cpu_seconds": {"ours_cold": ours_cold["cpu_seconds"], "keras_tuner": keras_run.cpu_seconds, "ours_warm": ours_warm["cpu_seconds"]},
        "peak_rss_mb": {"ours_cold": ours_cold["peak_rss_mb"], "keras_tuner": keras_run.peak_rss_mb, "ours_warm": ours_warm["peak_rss_mb"]},
        "peak_pss_mb": {"ours_cold": ours_cold["peak_pss_mb"], "keras_tuner": keras_run.peak_pss_mb, "ours_warm": ours_warm["peak_pss_mb"]},
    }


def load_average() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def versions() -> dict[str, str]:
    packages = ("tensorflow", "keras", "keras-tuner", "tensorboard", "ray", "numpy", "bayesian-optimization")
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="/tmp/frozen-tune-trial-cost", help="Folder for data, backbone, runs and results; "
                        "its runs, cache and KerasTuner folders are emptied first, the pretrained backbone is reused.")
    parser.add_argument("--data", default=str(DEBIAN_FOLDER), help="Folder with Fashion-MNIST's four gzip IDX files.")
    parser.add_argument("--train-images", type=int, default=6000, help="Training images, from Fashion-MNIST's training set.")
    parser.add_argument("--val-images", type=int, default=1500, help="Validation images, from Fashion-MNIST's test set.")
    parser.add_argument("--pretrain-images", type=int, default=5000, help="Other training images the backbone is pretrained on.")
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="Pretraining epochs.")
    parser.add_argument("--trials", type=int, default=4, help="Head configurations, the same on both sides.")
    parser.add_argument("--epochs", type=int, default=6, help="Maximum epochs per trial.")
    parser.add_argument("--patience", type=int, default=2, help="Epochs without a lower val_loss before a trial stops.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data subsets, the pretraining and KerasTuner.")
    arguments = parser.parse_args()
    for option in ("train_images", "val_images", "pretrain_images", "pretrain_epochs", "trials", "epochs", "patience"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(arguments, option)} is invalid; it must be at least 1.")
    if arguments.seed < 0:
        parser.error(f"--seed {arguments.seed} is invalid; it must be at least 0.")
    if arguments.train_images + arguments.pretrain_images > 60000 or arguments.val_images > 10000:
        parser.error("Fashion-MNIST has 60,000 training and 10,000 test images; lower --train-images, "
                     "--pretrain-images or --val-images.")
    if arguments.trials > 3 * len(SEARCH_SPACE):
        parser.error(f"--trials {arguments.trials} is too many: KerasTuner draws only its first {3 * len(SEARCH_SPACE)} "
                     f"configurations at random, so later ones cannot be known before its search; use at most {3 * len(SEARCH_SPACE)}.")

    load_at_start = load_average()
    work = Path(arguments.work_dir).absolute()
    for folder in ("runs", "cache", "keras_tuner"):
        shutil.rmtree(work / folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    plan = {
        **write_data(work, arguments),
        "work": str(work), "backbone": str(work / "backbone.keras"), "layer": EMBEDDING_LAYER, "alpha": 1.0,
        "image_size": 96, "input_range": INPUT_RANGE, "pretrain_epochs": arguments.pretrain_epochs,
        "space": SEARCH_SPACE, "head": FIXED_HEAD, "trials": arguments.trials, "epochs": arguments.epochs,
        "patience": arguments.patience, "seed": arguments.seed, "keras_tuner_dir": str(work / "keras_tuner"),
    }
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}

    prepared, _ = run_keras_side("prepare", plan_path, work, env)
    configurations = prepared["configurations"]
    load_before_runs = load_average()
    experiment = work / "experiment.yaml"
    write_experiment(plan, configurations, experiment)

    ours_cold = run_frozen_tune(experiment, "ours-cold", plan, env)
    keras_tuner, keras_run = run_keras_side("search", plan_path, work, env)
    ours_warm = run_frozen_tune(experiment, "ours-warm", plan, env)

    failed = [trial for trial in keras_tuner["trials"] if trial["status"] != "COMPLETED"]
    if failed:
        raise SystemExit(f"{len(failed)} KerasTuner trials failed; the first: {failed[0]['message']}")
    drawn = [trial["configuration"] for trial in keras_tuner["trials"]]
    if len(drawn) != len(configurations) or not all(map(same_configuration, drawn, configurations)):
        raise SystemExit(f"KerasTuner tried {drawn}, not the previewed {configurations}, so the two sides trained different configurations.")

    result = {
        "settings": {**vars(arguments), "threads": THREADS, "space": SEARCH_SPACE, "head": FIXED_HEAD},
        "prepare": {key: value for key, value in prepared.items() if key != "configurations"},
        "configurations": configurations,
        "summary": summarize(ours_cold, keras_tuner, keras_run, ours_warm),
        "keras_tuner": {**keras_tuner, "wall_seconds": keras_run.wall_seconds},
        "ours_cold": ours_cold,
        "ours_warm": ours_warm,
        "load_average": {"start": load_at_start, "before_runs": load_before_runs, "end": load_average()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (work / "trial_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("summary", "load_average", "versions")}, indent=2))


if __name__ == "__main__":
    main()
