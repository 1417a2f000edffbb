"""The ask/tell loop that every search method of the benchmark runs through.

Standard library only, beside `functions.py`, so the same loop runs in the
main environment and in the separate virtual environment for Ray's
BayesOptSearch with bayesian-optimization 1.5.1.
"""

from __future__ import annotations

import logging
import numbers
import time
import traceback
from typing import Any, Callable, Protocol

from functions import TestFunction

logger = logging.getLogger(__name__)

# Simple regret is reported after every this many completed evaluations, and after the last.
CHECKPOINT_INTERVAL = 10

# Floats are compared at this many significant digits when looking for duplicate configurations.
DUPLICATE_SIGNIFICANT_DIGITS = 9

# A method that returns no configuration this many times in a row is taken to be stuck, so the
# cell stops there.
MAX_CONSECUTIVE_SKIPS = 50


class SearchFinished(Exception):
    """Raised by `ask` when the method will suggest no more configurations."""


class SearchMethod(Protocol):
    """A search method behind the benchmark's ask/tell interface."""

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        """Return a new trial id and its configuration, or None when the method has none to give now.

        Raises:
            SearchFinished: when the method stops suggesting for good.
        """

    def tell(self, trial_id: str, value: float) -> None:
        """Report the function value of a finished trial."""


def checkpoints(budget: int) -> list[int]:
    """Return the evaluation counts at which simple regret is reported, e.g. [10, 20, 30] for 30."""
    counts = list(range(CHECKPOINT_INTERVAL, budget + 1, CHECKPOINT_INTERVAL))
    if not counts or counts[-1] != budget:
        counts.append(budget)
    return counts


def config_key(config: dict[str, Any]) -> tuple:
    """Build a hashable identity of a configuration with floats rounded to 9 significant digits."""
    items = []
    for name in sorted(config):
        value = config[name]
        if isinstance(value, numbers.Integral):
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(f"{float(value):.{DUPLICATE_SIGNIFICANT_DIGITS}g}")
        items.append((name, value))
    return tuple(items)


def run_search(method: SearchMethod, function: TestFunction, budget: int, in_flight: int) -> dict[str, Any]:
    """Run one search until `budget` trials have been evaluated or the method stops.

    Up to `in_flight` trials are pending at a time. The oldest pending trial is
    evaluated and reported first, then the pending set is refilled, so with
    `in_flight=1` the loop is plain sequential search.

    Args:
        method: The search method, freshly built for this run.
        function: The test function to minimise.
        budget: Number of evaluations to make.
        in_flight: Number of trials suggested but not yet reported, at most.

    Returns:
        The run's record: best-so-far simple regret after each evaluation and at
        each checkpoint, duplicate counts, the seconds of every `ask` call,
        skipped suggestions and why the run stopped early, if it did.
    """
    pending: dict[str, dict[str, Any]] = {}
    seen_keys: set[tuple] = set()
    ask_seconds: list[float] = []
    best_so_far: list[float] = []
    suggestions = 0
    duplicates = 0
    in_flight_duplicates = 0
    skipped_suggestions = 0
    consecutive_skips = 0
    stop_reason: str | None = None

    while len(best_so_far) < budget:
        while stop_reason is None and len(pending) < in_flight and suggestions < budget:
            started = time.perf_counter()
            try:
                suggestion = method.ask()
            except SearchFinished as finished:
                stop_reason = str(finished)
                break
            finally:
                ask_seconds.append(time.perf_counter() - started)

            if suggestion is None:
                skipped_suggestions += 1
                consecutive_skips += 1
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    stop_reason = f"the method returned no configuration {consecutive_skips} times in a row"
                if pending:
                    # Like Ray Tune, ask again only after a running trial has finished.
                    break
                continue

            consecutive_skips = 0
            trial_id, config = suggestion
            key = config_key(config)
            if key in seen_keys:
                duplicates += 1
            if key in {config_key(running) for running in pending.values()}:
                in_flight_duplicates += 1
            seen_keys.add(key)
            pending[trial_id] = config
            suggestions += 1

        if not pending:
            break

        trial_id = next(iter(pending))
        config = pending.pop(trial_id)
        value = float(function.evaluate(config))
        method.tell(trial_id, value)
        regret = max(0.0, value - function.minimum)
        best_so_far.append(min(regret, best_so_far[-1]) if best_so_far else regret)

    if stop_reason is not None:
        logger.info("%s: the method stopped after %d of %d evaluations: %s",
                    function.name, len(best_so_far), budget, stop_reason)

    # NOTE: a run that stopped early reports its final best at the later checkpoints, because
    # that is what its user ends up with. `missing_evaluations` counts the evaluations it lacked.
    regret_at = {}
    for count in checkpoints(budget):
        evaluated = min(count, len(best_so_far))
        regret_at[str(count)] = best_so_far[evaluated - 1] if evaluated else None

    return {
        "evaluations": len(best_so_far),
        "missing_evaluations": budget - len(best_so_far),
        "regret_at": regret_at,
        "best_so_far": best_so_far,
        "duplicates": duplicates,
        "in_flight_duplicates": in_flight_duplicates,
        "skipped_suggestions": skipped_suggestions,
        "stop_reason": stop_reason,
        "ask_seconds": ask_seconds,
    }


def run_cell(
    build_method: Callable[[], SearchMethod],
    method_name: str,
    function: TestFunction,
    seed: int,
    budget: int,
    in_flight: int,
) -> dict[str, Any]:
    """Build a method and run one (method, function, seed) cell, recording an error instead of raising.

    `build_method` may return an object with a `close()` method, which is
    called after the run.
    """
    cell: dict[str, Any] = {"method": method_name, "function": function.name, "seed": seed,
                            "budget": budget, "in_flight": in_flight, "error": None}
    started = time.perf_counter()
    method = None
    try:
        method = build_method()
        cell.update(run_search(method, function, budget, in_flight))
    except Exception as error:  # noqa: BLE001 - one broken method must not end the whole benchmark
        cell["error"] = f"{type(error).__name__}: {error}"
        cell["traceback"] = traceback.format_exc()
        logger.error("%s on %s, seed %d failed: %s", method_name, function.name, seed, cell["error"])
    finally:
        close = getattr(method, "close", None)
        if close is not None:
            close()
    cell["wall_seconds"] = time.perf_counter() - started
    return cell
