"""Search methods of the benchmark that run in the main environment, each behind ask/tell.

Ray's BayesOptSearch with bayesian-optimization 1.5.1 needs its own
environment and lives in `_legacy_bayesopt.py`.
"""

from __future__ import annotations

import logging
import random
import tempfile
from typing import Any, Callable

import numpy as np
from functions import FUNCTIONS, TestFunction
from _search_loop import SearchFinished, SearchMethod, run_cell

# GaussianProcessSearcher runs with this many trials in flight under each method name.
OURS_IN_FLIGHT = {"ours": 1, "ours_4": 4, "ours_8": 8}

METHOD_NOTES: dict[str, str] = {
    "ours": "tuning.searcher.GaussianProcessSearcher with its defaults, one trial at a time",
    "ours_4": "GaussianProcessSearcher with 4 trials in flight; the oldest pending trial finishes first",
    "ours_8": "GaussianProcessSearcher with 8 trials in flight; the oldest pending trial finishes first",
    "random": "independent uniform draws: loguniform in log10 space, int over the integers, choice over the values",
    "optuna_tpe": "optuna TPESampler(seed=seed) through study.ask / study.tell",
    "optuna_gp": "optuna GPSampler(seed=seed) through study.ask / study.tell",
    "kerastuner": (
        "keras_tuner BayesianOptimizationOracle(max_trials=budget, seed=seed) driven through "
        "create_trial / update_trial / end_trial, without a Tuner or a model. KerasTuner replaces "
        "seed 0 with random.randint(1, 10000) (`seed or ...` in Oracle.__init__), so Python's "
        "random module is seeded with the cell's seed first to make that cell reproducible"
    ),
}

# Methods in this module, in report order.
METHODS: tuple[str, ...] = tuple(METHOD_NOTES)

# KerasTuner identifies each worker that requests trials by a tuner id. The benchmark has one worker.
KERAS_TUNER_ID = "tuner0"


class GaussianProcessMethod:
    """frozen-tune's GaussianProcessSearcher, called through the Ray Tune `Searcher` interface."""

    def __init__(self, function: TestFunction, seed: int) -> None:
        from ray.tune.search import Searcher

        from tuning.searcher import GaussianProcessSearcher
        from tuning.space import Parameter, SearchSpace

        parameters = []
        for entry in function.space:
            if entry[1] == "choice":
                parameters.append(Parameter(name=entry[0], kind="choice", values=tuple(entry[2])))
            else:
                parameters.append(Parameter(name=entry[0], kind=entry[1], low=entry[2], high=entry[3]))
        self._searcher = GaussianProcessSearcher(SearchSpace(tuple(parameters)), metric="value", mode="min", seed=seed)
        self._finished = Searcher.FINISHED
        self._trial_count = 0

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        trial_id = f"trial_{self._trial_count:05d}"
        self._trial_count += 1
        config = self._searcher.suggest(trial_id)
        if config is None:
            return None
        if config == self._finished:
            raise SearchFinished("GaussianProcessSearcher.suggest returned Searcher.FINISHED")
        return trial_id, config

    def tell(self, trial_id: str, value: float) -> None:
        self._searcher.on_trial_complete(trial_id, {"value": value})


class RandomMethod:
    """Seeded random search with the same priors as the search space."""

    def __init__(self, function: TestFunction, seed: int) -> None:
        self._space = function.space
        self._rng = np.random.default_rng(seed)
        self._trial_count = 0

    def ask(self) -> tuple[str, dict[str, Any]]:
        config: dict[str, Any] = {}
        for entry in self._space:
            name, kind = entry[0], entry[1]
            if kind == "choice":
                config[name] = entry[2][int(self._rng.integers(len(entry[2])))]
            elif kind == "int":
                config[name] = int(self._rng.integers(int(entry[2]), int(entry[3]) + 1))
            elif kind == "loguniform":
                config[name] = float(10 ** self._rng.uniform(np.log10(entry[2]), np.log10(entry[3])))
            else:
                config[name] = float(self._rng.uniform(entry[2], entry[3]))
        trial_id = str(self._trial_count)
        self._trial_count += 1
        return trial_id, config

    def tell(self, trial_id: str, value: float) -> None:
        """Ignore the value: random search does not learn."""


class OptunaMethod:
    """An optuna sampler driven through the ask-and-tell interface of a study."""

    def __init__(self, function: TestFunction, sampler: Any) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._distributions: dict[str, Any] = {}
        for entry in function.space:
            name, kind = entry[0], entry[1]
            if kind == "choice":
                self._distributions[name] = CategoricalDistribution(list(entry[2]))
            elif kind == "int":
                self._distributions[name] = IntDistribution(int(entry[2]), int(entry[3]))
            else:
                self._distributions[name] = FloatDistribution(entry[2], entry[3], log=kind == "loguniform")
        self._study = optuna.create_study(direction="minimize", sampler=sampler)
        self._trials: dict[str, Any] = {}

    def ask(self) -> tuple[str, dict[str, Any]]:
        trial = self._study.ask(self._distributions)
        trial_id = str(trial.number)
        self._trials[trial_id] = trial
        return trial_id, dict(trial.params)

    def tell(self, trial_id: str, value: float) -> None:
        self._study.tell(self._trials.pop(trial_id), value)


class KerasTunerMethod:
    """KerasTuner's BayesianOptimizationOracle, asked for trials without a Tuner or a model."""

    def __init__(self, function: TestFunction, seed: int, budget: int) -> None:
        import keras_tuner
        from keras_tuner.engine.trial import TrialStatus

        hyperparameters = keras_tuner.HyperParameters()
        for entry in function.space:
            name, kind = entry[0], entry[1]
            if kind == "choice":
                hyperparameters.Choice(name, list(entry[2]))
            elif kind == "int":
                hyperparameters.Int(name, int(entry[2]), int(entry[3]))
            else:
                sampling = "log" if kind == "loguniform" else "linear"
                hyperparameters.Float(name, float(entry[2]), float(entry[3]), sampling=sampling)

        # Oracle.__init__ reads `seed or random.randint(1, 10000)`, so seed 0 would draw an unseeded value.
        random.seed(seed)
        self._oracle = keras_tuner.oracles.BayesianOptimizationOracle(
            objective=keras_tuner.Objective("value", "min"),
            max_trials=budget,
            seed=seed,
            hyperparameters=hyperparameters,
        )
        # The oracle writes every trial to disk; a Tuner would set this folder the same way.
        self._project_dir = tempfile.TemporaryDirectory(prefix="bench-kerastuner-")
        self._oracle._set_project_dir(self._project_dir.name, "oracle")
        self._oracle.verbose = 0
        self._completed = TrialStatus.COMPLETED
        self._running = TrialStatus.RUNNING
        self._trials: dict[str, Any] = {}

    def ask(self) -> tuple[str, dict[str, Any]]:
        trial = self._oracle.create_trial(KERAS_TUNER_ID)
        if trial.status != self._running:
            raise SearchFinished(f"BayesianOptimizationOracle.create_trial returned a trial with status {trial.status}")
        self._trials[trial.trial_id] = trial
        return trial.trial_id, dict(trial.hyperparameters.values)

    def tell(self, trial_id: str, value: float) -> None:
        trial = self._trials.pop(trial_id)
        self._oracle.update_trial(trial_id, {"value": value})
        trial.status = self._completed
        self._oracle.end_trial(trial)

    def close(self) -> None:
        self._project_dir.cleanup()


def method_builder(method_name: str, function: TestFunction, seed: int, budget: int) -> Callable[[], SearchMethod]:
    """Return a function that builds `method_name` for one cell.

    Raises:
        ValueError: for a method that this module does not run.
    """
    if method_name in OURS_IN_FLIGHT:
        return lambda: GaussianProcessMethod(function, seed)
    if method_name == "random":
        return lambda: RandomMethod(function, seed)
    if method_name == "optuna_tpe":
        return lambda: _build_optuna(function, "TPESampler", seed)
    if method_name == "optuna_gp":
        return lambda: _build_optuna(function, "GPSampler", seed)
    if method_name == "kerastuner":
        return lambda: KerasTunerMethod(function, seed, budget)
    raise ValueError(f"unknown method {method_name!r}; accepted: {', '.join(METHODS)}")


def _build_optuna(function: TestFunction, sampler_name: str, seed: int) -> OptunaMethod:
    import optuna

    if sampler_name == "GPSampler":
        # GPSampler imports PyTorch on its first model-based suggestion, so importing it here keeps
        # those seconds out of the timed suggestions.
        import torch  # noqa: F401

    sampler = getattr(optuna.samplers, sampler_name)(seed=seed)
    return OptunaMethod(function, sampler)


def run_main_cell(method_name: str, function_name: str, seed: int, budget: int) -> dict[str, Any]:
    """Run one (method, function, seed) cell in this process, as the entry point of pool workers."""
    function = FUNCTIONS[function_name]
    in_flight = OURS_IN_FLIGHT.get(method_name, 1)
    return run_cell(method_builder(method_name, function, seed, budget), method_name, function, seed, budget, in_flight)


def initialize_worker(level: int) -> None:
    """Set up logging in a pool worker, which starts without the parent's configuration, and import the searcher.

    Importing `tuning.searcher` when the pool starts, right after the run has
    taken the digests of its source, keeps an edit made during the run out of
    later cells.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    import tuning.searcher  # noqa: F401
