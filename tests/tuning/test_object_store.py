"""The embeddings go through Ray's object store once, however many trials read them."""

from __future__ import annotations

import re

import numpy as np
import ray
from ray import tune
from ray._private.internal_api import memory_summary

from tuning.trainable import EmbeddingData, TrialSettings, train_head

PLASMA_USAGE = re.compile(r"Plasma memory usage (\d+) MiB, (\d+) objects")


def large_embeddings() -> EmbeddingData:
    """About 24 MiB of random embeddings with 4 classes, large enough to tell one copy from two."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 1024)).astype(np.float32)
    val = rng.normal(size=(1000, 1024)).astype(np.float32)
    return EmbeddingData.from_arrays(train, rng.integers(4, size=5000), val, rng.integers(4, size=1000), num_classes=4)


def plasma_usage() -> tuple[int, int]:
    """Return the object store's usage as (MiB, object count)."""
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = PLASMA_USAGE.search(summary)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class PlasmaUsage(tune.Callback):
    """Read the object store's usage on the driver after every trial result."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.samples.append(plasma_usage())


def test_embeddings_stored_once_for_all_trials(ray_local, tmp_path):
    data = large_embeddings()
    size_mib = (data.train.nbytes + data.val.nbytes) / 2**20
    settings = TrialSettings(
        metric="val_loss", mode="min", max_epochs=2, patience=2, fixed_hyperparameters={"units_1": 16},
        cpus_per_trial=1, gpus_per_trial=0,
    )
    # Earlier tests in this Ray session may have left objects behind; count from here.
    baseline_mib, baseline_objects = plasma_usage()
    usage = PlasmaUsage()
    tuner = tune.Tuner(
        tune.with_parameters(train_head, data=data, settings=settings),
        param_space={"learning_rate": tune.grid_search([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0, callbacks=[usage]),
    )
    results = tuner.fit()

    assert results.num_errors == 0
    assert len(results) == 6
    assert len(usage.samples) >= 6
    largest_mib = max(mib for mib, _ in usage.samples) - baseline_mib
    assert size_mib - 1 <= largest_mib <= size_mib + 2, f"object store held {largest_mib} MiB more for {size_mib:.1f} MiB of embeddings"
    # tune.with_parameters stores each argument once: the embeddings and the settings.
    assert max(objects for _, objects in usage.samples) - baseline_objects == 2


def test_worker_reads_embeddings_without_copy(ray_local, tmp_path):
    # Defined here, so Ray ships the function by value: workers cannot import test modules.
    def report_array_flags(config: dict, data: EmbeddingData) -> None:
        flags = data.train.flags
        tune.report({"writeable": int(flags.writeable), "owndata": int(flags.owndata), "first": float(data.train[0, 0])})

    data = large_embeddings()
    tuner = tune.Tuner(
        tune.with_parameters(report_array_flags, data=data),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    metrics = tuner.fit()[0].metrics

    # A read-only array that does not own its memory is a view of the shared object store.
    assert metrics["writeable"] == 0
    assert metrics["owndata"] == 0
    assert metrics["first"] == float(data.train[0, 0])
