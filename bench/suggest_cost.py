"""Measure GaussianProcessSearcher's own time per suggestion as observations accumulate.

For each size, the searcher gets that many registered observations of
Hartmann6 at random points (6 continuous parameters), then times `suggest()`
with no trial pending and with 4 pending. Single-threaded BLAS is what
`suggest()` uses itself, so the figures do not depend on other load on the
cores as much as a multi-threaded run would.

    python bench/suggest_cost.py [--sizes 30 300] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from functions import FUNCTIONS  # noqa: E402

from tuning.searcher import GaussianProcessSearcher  # noqa: E402
from tuning.space import Parameter, SearchSpace  # noqa: E402


def hartmann_space() -> SearchSpace:
    return SearchSpace(tuple(Parameter(name=name, kind="uniform", low=low, high=high) for name, _, low, high in FUNCTIONS["hartmann6"].space))


def time_suggestions(size: int, repeats: int, pending: int, seed: int) -> list[float]:
    """Seconds per suggest() with `size` observations and `pending` trials running."""
    function = FUNCTIONS["hartmann6"]
    searcher = GaussianProcessSearcher(hartmann_space(), metric="value", mode="min", initial_points=0, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(size):
        config = hartmann_space().from_unit(rng.random(6))
        searcher.add_evaluated_point(config, function.evaluate(config))
    for index in range(pending):
        searcher.suggest(f"pending{index}")

    seconds = []
    for index in range(repeats):
        started = time.perf_counter()
        searcher.suggest(f"timed{index}")
        seconds.append(time.perf_counter() - started)
        searcher.on_trial_complete(f"timed{index}", None, error=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 300], help="Numbers of observations.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed suggestions per size.")
    arguments = parser.parse_args()

    rows = []
    for size in arguments.sizes:
        for pending in (0, 4):
            seconds = time_suggestions(size, arguments.repeats, pending, seed=size)
            rows.append({
                "observations": size, "pending": pending,
                "median_seconds": round(statistics.median(seconds), 3), "max_seconds": round(max(seconds), 3),
            })
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
