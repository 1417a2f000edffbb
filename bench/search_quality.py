"""Compare search methods on the test functions of `bench/functions.py`.

Every method runs the same ask/tell loop: a budget of evaluations per
(method, function, seed) cell, best-so-far simple regret after every 10
evaluations, duplicate suggestions and the wall time of every ask. Ray is
never started, because the searchers are called through their `Searcher`
methods directly. The result is a JSON record and a Markdown table.

    python bench/search_quality.py --output bench/search_quality.json --markdown bench/search_quality.md

`ray_bayesopt_151` runs in `bench/.venv-bayesopt151`, created with pip on its
first use.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
# Benchmark the working tree's `tuning`, also when another copy is installed.
sys.path.insert(1, str(REPOSITORY))

from functions import FUNCTIONS  # noqa: E402
from _legacy_bayesopt import CONVERSION_NOTE, METHOD_NAME as LEGACY_METHOD, SEARCHER_NOTE  # noqa: E402
from _legacy_venv import LegacyEnvironmentError, ensure_legacy_venv, legacy_requirements, run_legacy_cells  # noqa: E402
from _search_loop import checkpoints  # noqa: E402
from _search_methods import METHOD_NOTES, METHODS, OURS_IN_FLIGHT, initialize_worker, run_main_cell  # noqa: E402
from _search_report import machine_record, markdown_report, package_versions, source_digests, summarise  # noqa: E402

logger = logging.getLogger("search_quality")

ALL_METHODS: tuple[str, ...] = (*METHODS, LEGACY_METHOD)
DEFAULT_SEEDS = 10
DEFAULT_BUDGET = 30
DEFAULT_JOBS = 2

# Each cell gets one thread for BLAS, OpenMP and PyTorch, so `--jobs` cells share the cores
# without oversubscription and the seconds per suggestion do not depend on the core count.
THREADS_PER_CELL = 1
THREAD_LIMIT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Cells are submitted in this order, slowest first, so the pool does not end on one long cell.
SUBMISSION_ORDER = (LEGACY_METHOD, "ours_8", "ours_4", "ours", "optuna_gp", "kerastuner", "optuna_tpe", "random")

# Hides TensorFlow's start-up messages in the workers, which import it through keras_tuner.
TENSORFLOW_LOG_LEVEL = "2"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS,
                        help="Search methods to run (default: all).")
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=list(FUNCTIONS),
                        help="Test functions to minimise (default: all).")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help=f"Number of seeds per method and function (default {DEFAULT_SEEDS}).")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="First seed, so the cells use seeds FIRST_SEED to FIRST_SEED + SEEDS - 1 (default 0).")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                        help=f"Evaluations per cell (default {DEFAULT_BUDGET}).")
    parser.add_argument("--output", type=Path, default=BENCH / "search_quality.json",
                        help="JSON file for the full record (default bench/search_quality.json).")
    parser.add_argument("--markdown", type=Path, default=BENCH / "search_quality.md",
                        help="Markdown file for the summary table (default bench/search_quality.md).")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"Cells run at the same time, one process each (default {DEFAULT_JOBS}).")
    arguments = parser.parse_args(argv)
    if arguments.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {arguments.seeds}")
    if arguments.first_seed < 0:
        parser.error(f"--first-seed must be 0 or more, got {arguments.first_seed}")
    if arguments.budget < 1:
        parser.error(f"--budget must be at least 1, got {arguments.budget}")
    if arguments.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {arguments.jobs}")
    return arguments


def limit_threads() -> None:
    """Set the thread limits in the environment that the spawned workers and the legacy helper inherit."""
    for name in THREAD_LIMIT_VARIABLES:
        os.environ[name] = str(THREADS_PER_CELL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TENSORFLOW_LOG_LEVEL)


def error_cells(method: str, function: str, seeds: list[int], budget: int, error: str) -> list[dict[str, Any]]:
    """Return one failed cell per seed, for a group of cells that could not run at all."""
    return [{"method": method, "function": function, "seed": seed, "budget": budget,
             "in_flight": 1, "error": error} for seed in seeds]


def run_cells(arguments: argparse.Namespace, seeds: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every requested cell in a process pool.

    Returns:
        The cells, and the legacy helper's versions, notes and error (None when it ran).
    """
    legacy: dict[str, Any] = {"versions": None, "notes": [SEARCHER_NOTE, CONVERSION_NOTE], "error": None}
    legacy_python = None
    if LEGACY_METHOD in arguments.methods:
        try:
            legacy_python = str(ensure_legacy_venv())
        except LegacyEnvironmentError as error:
            legacy["error"] = f"could not create the environment with {' '.join(legacy_requirements())}: {error}"
            logger.error("%s is skipped: %s", LEGACY_METHOD, legacy["error"])

    cells: list[dict[str, Any]] = []
    if legacy["error"] is not None:
        for function in arguments.functions:
            cells += error_cells(LEGACY_METHOD, function, seeds, arguments.budget, legacy["error"])

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=arguments.jobs, mp_context=context,
                             initializer=initialize_worker, initargs=(logging.INFO,)) as pool:
        futures: dict[Future, tuple[str, str, list[int]]] = {}
        for method in sorted(arguments.methods, key=SUBMISSION_ORDER.index):
            for function in arguments.functions:
                if method == LEGACY_METHOD:
                    if legacy_python is not None:
                        future = pool.submit(run_legacy_cells, legacy_python, function, seeds, arguments.budget)
                        futures[future] = (method, function, seeds)
                    continue
                for seed in seeds:
                    future = pool.submit(run_main_cell, method, function, seed, arguments.budget)
                    futures[future] = (method, function, [seed])

        total = sum(len(group_seeds) for _, _, group_seeds in futures.values())
        for future in as_completed(futures):
            method, function, group_seeds = futures[future]
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - record a crashed worker and go on with the other cells
                message = f"{type(error).__name__}: {error}"
                logger.error("%s on %s, seeds %s failed: %s", method, function, group_seeds, message)
                cells += error_cells(method, function, group_seeds, arguments.budget, message)
                continue
            if method == LEGACY_METHOD:
                cells += result["cells"]
                legacy["versions"] = result["versions"]
                legacy["notes"] = result["notes"]
            else:
                cells.append(result)
            logger.info("finished %s on %s, seeds %s (%d of %d cells)", method, function, group_seeds,
                        len(cells), total)
    return cells, legacy


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_threads()
    seeds = list(range(arguments.first_seed, arguments.first_seed + arguments.seeds))
    methods = [method for method in ALL_METHODS if method in arguments.methods]
    logger.info("search quality benchmark: methods %s, functions %s, seeds %d-%d, budget %d, %d jobs",
                ", ".join(methods), ", ".join(arguments.functions), seeds[0], seeds[-1], arguments.budget, arguments.jobs)

    digests = source_digests(REPOSITORY)
    load_at_start = list(os.getloadavg())
    started = time.monotonic()
    cells, legacy = run_cells(arguments, seeds)
    run_seconds = time.monotonic() - started
    if source_digests(REPOSITORY) != digests:
        logger.warning("the searcher's source files changed during the run; the results belong to the "
                       "version read when the pool started, whose digests the output records")
    cells.sort(key=lambda cell: (ALL_METHODS.index(cell["method"]), cell["function"], cell["seed"]))

    method_notes = {method: METHOD_NOTES[method] for method in methods if method in METHOD_NOTES}
    if LEGACY_METHOD in methods:
        method_notes[LEGACY_METHOD] = " ".join(f"{note}." for note in legacy["notes"])
    errors = sorted({f"{cell['method']} on {cell['function']}: {cell['error']}" for cell in cells if cell["error"]})
    counts = checkpoints(arguments.budget)
    document = {
        "settings": {
            "methods": methods,
            "functions": arguments.functions,
            "seeds": seeds,
            "budget": arguments.budget,
            "checkpoints": counts,
            "jobs": arguments.jobs,
            "threads_per_cell": THREADS_PER_CELL,
            "in_flight": {method: OURS_IN_FLIGHT.get(method, 1) for method in methods},
        },
        "run_seconds": run_seconds,
        "machine": {**machine_record(), "load_average_at_start": load_at_start},
        "versions": package_versions(),
        "source_sha256": digests,
        "legacy_versions": legacy["versions"],
        "legacy_requirements": legacy_requirements() if LEGACY_METHOD in methods else None,
        "method_notes": method_notes,
        "errors": errors,
        "summary": summarise(cells, methods, arguments.functions),
        "cells": cells,
    }

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(document, indent=1) + "\n")
    report = markdown_report(document)
    arguments.markdown.parent.mkdir(parents=True, exist_ok=True)
    arguments.markdown.write_text(report)
    logger.info("search quality benchmark finished in %.0f s; wrote %s and %s",
                run_seconds, arguments.output, arguments.markdown)
    print(report)


if __name__ == "__main__":
    main()
