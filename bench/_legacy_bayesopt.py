"""Run Ray Tune's BayesOptSearch with bayesian-optimization 1.5.1 on the benchmark functions.

This script runs inside `bench/.venv-bayesopt151`, which `search_quality.py`
creates, because BayesOptSearch calls `bayes_opt.UtilityFunction`, which
bayesian-optimization 2.0 removed. It prints one JSON document to standard
output: the package versions, the conversion notes and one record per seed.

    bench/.venv-bayesopt151/bin/python bench/_legacy_bayesopt.py --function branin --seeds 0 1 --budget 30
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from importlib.metadata import version
from typing import Any, Callable

from functions import FUNCTIONS, TestFunction
from _search_loop import SearchFinished, run_cell

METHOD_NAME = "ray_bayesopt_151"

CONVERSION_NOTE = (
    "BayesOptSearch accepts only float parameters, so the adapter declares each parameter as a float "
    "range and converts its suggestions before evaluating them: uniform as is; loguniform as log10 "
    "of the bounds, then 10**x; int over [low, high], rounded to the nearest integer; choice as an "
    "index over [0, number of values), floored. Duplicates are counted on the converted configuration"
)
SEARCHER_NOTE = (
    "ray.tune.search.bayesopt.BayesOptSearch(space=float bounds, metric='value', mode='min', "
    "random_state=seed) with its other defaults (UCB with kappa 2.576, 10 random steps, patience 5, "
    "skip_duplicate=True), called through suggest / on_trial_complete. A suggest that returns None "
    "(a repeated point) is asked again with a new trial id; FINISHED ends the cell"
)

PACKAGES = ("numpy", "scipy", "scikit-learn", "bayesian-optimization", "ray")

Decoder = Callable[[float], Any]


def float_space(function: TestFunction) -> tuple[dict[str, tuple[float, float]], dict[str, Decoder]]:
    """Map a function's space to float bounds for BayesOptSearch and a decoder per parameter."""
    bounds: dict[str, tuple[float, float]] = {}
    decoders: dict[str, Decoder] = {}
    for entry in function.space:
        name, kind = entry[0], entry[1]
        if kind == "choice":
            values = tuple(entry[2])
            bounds[name] = (0.0, float(len(values)))
            decoders[name] = _choice_decoder(values)
        elif kind == "int":
            low, high = int(entry[2]), int(entry[3])
            bounds[name] = (float(low), float(high))
            decoders[name] = _int_decoder(low, high)
        elif kind == "loguniform":
            bounds[name] = (math.log10(entry[2]), math.log10(entry[3]))
            decoders[name] = _log_decoder(float(entry[2]), float(entry[3]))
        else:
            bounds[name] = (float(entry[2]), float(entry[3]))
            decoders[name] = float
    return bounds, decoders


def _choice_decoder(values: tuple[Any, ...]) -> Decoder:
    return lambda index: values[min(max(int(math.floor(index)), 0), len(values) - 1)]


def _int_decoder(low: int, high: int) -> Decoder:
    return lambda value: min(max(int(round(value)), low), high)


def _log_decoder(low: float, high: float) -> Decoder:
    return lambda exponent: min(max(10 ** float(exponent), low), high)


class BayesOptMethod:
    """Ray Tune's BayesOptSearch, called through the Ray Tune `Searcher` interface."""

    def __init__(self, function: TestFunction, seed: int) -> None:
        from ray.tune.search import Searcher
        from ray.tune.search.bayesopt import BayesOptSearch

        bounds, self._decoders = float_space(function)
        self._searcher = BayesOptSearch(space=bounds, metric="value", mode="min", random_state=seed)
        self._finished = Searcher.FINISHED
        self._trial_count = 0

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        trial_id = f"trial_{self._trial_count:05d}"
        self._trial_count += 1
        suggestion = self._searcher.suggest(trial_id)
        if suggestion is None:
            return None
        if suggestion == self._finished:
            raise SearchFinished("BayesOptSearch.suggest returned Searcher.FINISHED (a point repeated more than `patience` times)")
        config = {name: self._decoders[name](value) for name, value in suggestion.items()}
        return trial_id, config

    def tell(self, trial_id: str, value: float) -> None:
        self._searcher.on_trial_complete(trial_id, {"value": value})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", required=True, choices=sorted(FUNCTIONS), help="Test function to minimise.")
    parser.add_argument("--seeds", required=True, type=int, nargs="+", help="Seeds to run, one cell each.")
    parser.add_argument("--budget", type=int, default=30, help="Evaluations per cell.")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    function = FUNCTIONS[arguments.function]
    cells = []
    for seed in arguments.seeds:
        cells.append(run_cell(lambda: BayesOptMethod(function, seed), METHOD_NAME, function,
                              seed, arguments.budget, in_flight=1))

    versions = {"python": platform.python_version()}
    versions.update({package: version(package) for package in PACKAGES})
    document = {"versions": versions, "notes": [SEARCHER_NOTE, CONVERSION_NOTE], "cells": cells}
    json.dump(document, sys.stdout)


if __name__ == "__main__":
    main()
