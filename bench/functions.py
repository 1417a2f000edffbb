"""Test functions for the search benchmark, with their spaces and known minima.

Pure NumPy, so the same file runs in the benchmark's separate virtual
environment for Ray's BayesOptSearch with bayesian-optimization 1.5.1.
Every function is minimised; simple regret is `value - minimum`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# Each space entry: (name, kind, low, high) for "uniform", "loguniform", "int";
# (name, "choice", values) for choices.
SpaceEntry = tuple


@dataclass(frozen=True)
class TestFunction:
    name: str
    space: tuple[SpaceEntry, ...]
    minimum: float
    evaluate: Callable[[dict[str, Any]], float]

    def regret(self, config: dict[str, Any]) -> float:
        return max(0.0, self.evaluate(config) - self.minimum)


def _branin(config: dict[str, Any]) -> float:
    x1, x2 = config["x1"], config["x2"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_HARTMANN_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_HARTMANN_A = np.array([
    [10, 3, 17, 3.5, 1.7, 8],
    [0.05, 10, 17, 0.1, 8, 14],
    [3, 3.5, 1.7, 10, 17, 8],
    [17, 8, 0.05, 10, 0.1, 14],
])
_HARTMANN_P = 1e-4 * np.array([
    [1312, 1696, 5569, 124, 8283, 5886],
    [2329, 4135, 8307, 3736, 1004, 9991],
    [2348, 1451, 3522, 2883, 3047, 6650],
    [4047, 8828, 8732, 5743, 1091, 381],
])


def _hartmann6(config: dict[str, Any]) -> float:
    x = np.array([config[f"x{i}"] for i in range(1, 7)])
    inner = np.sum(_HARTMANN_A * (x - _HARTMANN_P) ** 2, axis=1)
    return float(-np.sum(_HARTMANN_ALPHA * np.exp(-inner)))


def _ackley5(config: dict[str, Any]) -> float:
    x = np.array([config[f"x{i}"] for i in range(1, 6)])
    d = len(x)
    first = -20 * math.exp(-0.2 * math.sqrt(np.sum(x**2) / d))
    second = -math.exp(np.sum(np.cos(2 * math.pi * x)) / d)
    return first + second + 20 + math.e


BATCH_SIZES = (32, 64, 128, 256)


def _head_like(config: dict[str, Any]) -> float:
    """Evaluate a smooth bowl shaped like head tuning, with minimum 0.

    The best learning rate grows with the batch size (1e-3 at 64), wider
    layers want more dropout, and learning rate and L2 interact. Optimum:
    learning_rate 1e-3, dropout 0.25, units 256, batch_size 64, l2 1e-4.
    """
    lr = math.log10(config["learning_rate"])
    batch = BATCH_SIZES.index(int(config["batch_size"]))
    best_lr = -3 + 0.25 * (batch - 1)
    dropout = config["dropout"]
    units = math.log2(config["units"])
    l2 = math.log10(config["l2"]) + 4
    value = (lr - best_lr) ** 2 / 4 + 0.1 * (lr - best_lr) * l2 + l2**2 / 8
    value += 3 * (dropout - 0.25) ** 2
    value += ((units - 8) / 3) ** 2 * (1 + 0.5 * dropout)
    value += 0.1 * (batch - 1) ** 2
    return value


FUNCTIONS: dict[str, TestFunction] = {
    "branin": TestFunction("branin", (("x1", "uniform", -5.0, 10.0), ("x2", "uniform", 0.0, 15.0)), 0.397887, _branin),
    "hartmann6": TestFunction("hartmann6", tuple((f"x{i}", "uniform", 0.0, 1.0) for i in range(1, 7)), -3.32237, _hartmann6),
    "ackley5": TestFunction("ackley5", tuple((f"x{i}", "uniform", -5.0, 10.0) for i in range(1, 6)), 0.0, _ackley5),
    "head_like": TestFunction(
        "head_like",
        (
            ("learning_rate", "loguniform", 1e-5, 1e-1),
            ("dropout", "uniform", 0.0, 0.7),
            ("units", "int", 16, 1024),
            ("batch_size", "choice", BATCH_SIZES),
            ("l2", "loguniform", 1e-6, 1e-2),
        ),
        0.0,
        _head_like,
    ),
}
