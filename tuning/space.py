"""Search-space parameters: Ray Tune domains, random sampling and GP features.

A search space is a tuple of named parameters of four kinds: `uniform`,
`loguniform`, `int` (inclusive bounds, optionally log-spaced) and `choice`.
Each parameter maps a value to features in the unit cube for the Gaussian
process: one feature for numeric kinds (log10 scale for log-spaced ones) and
for a choice of three or more numbers (ordered by size), and a one-hot block
for any other `choice`. Decoding always returns a canonical value of the
declared type inside the declared bounds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from ray import tune
from ray.tune.search import sample
from ray.tune.search.variant_generator import parse_spec_vars

ParameterKind = Literal["uniform", "loguniform", "int", "choice"]
PARAMETER_KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Parameter:
    """One tuned hyperparameter.

    Attributes:
        name: The key in the trial's configuration.
        kind: One of `uniform`, `loguniform`, `int`, `choice`.
        low: Lower bound (inclusive) for numeric kinds.
        high: Upper bound (inclusive) for numeric kinds.
        values: The options of a `choice` parameter, in declared order.
        log: For `int`, space the values evenly in log10 rather than linearly.
    """

    name: str
    kind: ParameterKind
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = field(default_factory=tuple)
    log: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PARAMETER_KINDS:
            raise ValueError(f"parameter {self.name!r}: unknown kind {self.kind!r}; accepted: {', '.join(PARAMETER_KINDS)}")
        if self.kind == "choice":
            if not self.values:
                raise ValueError(f"parameter {self.name!r}: a choice needs at least one value")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"parameter {self.name!r}: needs low < high, got low={self.low!r}, high={self.high!r}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"parameter {self.name!r}: a loguniform range needs low > 0, got low={self.low!r}")
        if self.kind == "int" and self.log and self.low < 1:
            raise ValueError(f"parameter {self.name!r}: a log-spaced int range needs low >= 1, got low={self.low!r}")

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform" or (self.kind == "int" and self.log)

    @property
    def is_ordinal(self) -> bool:
        """True for a choice of three or more numbers, such as batch sizes, which the GP orders by size."""
        numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in self.values)
        return self.kind == "choice" and numeric and len(self.values) >= 3

    @property
    def width(self) -> int:
        """Number of GP features this parameter occupies: one, or one per option of an unordered choice."""
        return len(self.values) if self.kind == "choice" and not self.is_ordinal else 1

    def _ranks(self) -> np.ndarray:
        """Position of each option of an ordinal choice in [0, 1], evenly spaced by sorted order."""
        order = np.argsort(np.argsort(np.array(self.values, dtype=float), kind="stable"), kind="stable")
        return order / (len(self.values) - 1)

    @property
    def cardinality(self) -> int | None:
        """Number of distinct values, or None for a continuous parameter."""
        if self.kind == "choice":
            return len(self.values)
        if self.kind == "int":
            return int(self.high) - int(self.low) + 1
        return None

    def discrete_values(self) -> tuple[Any, ...]:
        """Return every value of an `int` or `choice` parameter, in order.

        Raises:
            ValueError: for a continuous parameter.
        """
        if self.kind == "choice":
            return tuple(self.values)
        if self.kind == "int":
            return tuple(range(int(self.low), int(self.high) + 1))
        raise ValueError(f"parameter {self.name!r} is continuous ({self.kind}) and has no list of values")

    def from_unit(self, u: float) -> Any:
        """Map u in [0, 1] to a value so that uniform u gives the parameter's prior.

        Log-spaced parameters spread evenly over decades; `int` and `choice`
        give every value an equal share of [0, 1].
        """
        u = min(max(float(u), 0.0), 1.0)
        if self.kind == "choice":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.kind == "int":
            if self.log:
                # Value v takes [log v, log(v + 1)) of [log low, log(high + 1)), so every decade
                # gets its share of [0, 1] and the end values get whole bins.
                log_low, log_high = self._log_int_range()
                value = math.floor(10 ** (log_low + u * (log_high - log_low)))
            else:
                value = int(self.low) + min(int(u * self.cardinality), self.cardinality - 1)
            return int(min(max(value, int(self.low)), int(self.high)))
        if self.kind == "loguniform":
            log_low, log_high = math.log10(self.low), math.log10(self.high)
            return float(min(max(10 ** (log_low + u * (log_high - log_low)), self.low), self.high))
        return float(self.low + u * (self.high - self.low))

    def to_unit(self, value: Any) -> float:
        """Return the centre of the part of [0, 1] that `from_unit` maps to `value`."""
        if self.kind == "choice":
            return (self.index_of(value) + 0.5) / len(self.values)
        if self.kind == "int" and self.log:
            log_low, log_high = self._log_int_range()
            centre = (math.log10(value) + math.log10(value + 1)) / 2
            return (centre - log_low) / (log_high - log_low)
        if self.kind == "int":
            return (int(value) - int(self.low) + 0.5) / self.cardinality
        return float(self.to_features(value)[0])

    def features_from_units(self, units: np.ndarray) -> np.ndarray:
        """Vectorised `to_features(from_unit(u))` for a column of u values; returns (n, width)."""
        units = np.clip(units, 0.0, 1.0)
        if self.kind == "choice":
            indices = np.minimum((units * len(self.values)).astype(int), len(self.values) - 1)
            if self.is_ordinal:
                return self._ranks()[indices][:, None]
            return np.eye(len(self.values))[indices]
        if self.kind == "int" and self.log:
            log_low, log_high = self._log_int_range()
            values = np.clip(np.floor(10 ** (log_low + units * (log_high - log_low))), self.low, self.high)
            positions = (np.log10(values) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
            return positions[:, None]
        if self.kind == "int":
            values = int(self.low) + np.minimum((units * self.cardinality).astype(int), self.cardinality - 1)
            return ((values - self.low) / (self.high - self.low))[:, None]
        return units[:, None]

    def to_features(self, value: Any) -> np.ndarray:
        """Encode a value as GP features in [0, 1]."""
        if self.is_ordinal:
            return np.array([self._ranks()[self.index_of(value)]])
        if self.kind == "choice":
            features = np.zeros(len(self.values))
            features[self.index_of(value)] = 1.0
            return features
        if self.is_log:
            position = (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        else:
            position = (value - self.low) / (self.high - self.low)
        return np.array([min(max(position, 0.0), 1.0)])

    def from_features(self, features: np.ndarray) -> Any:
        """Decode GP features to the nearest valid value of the declared type."""
        if self.is_ordinal:
            return self.values[int(np.argmin(np.abs(self._ranks() - float(features[0]))))]
        if self.kind == "choice":
            return self.values[int(np.argmax(features))]
        position = min(max(float(features[0]), 0.0), 1.0)
        if self.is_log:
            value = 10 ** (math.log10(self.low) + position * (math.log10(self.high) - math.log10(self.low)))
        else:
            value = self.low + position * (self.high - self.low)
        if self.kind == "int":
            return int(min(max(round(value), int(self.low)), int(self.high)))
        return float(min(max(value, self.low), self.high))

    def _log_int_range(self) -> tuple[float, float]:
        """Return log10 of the ends of a log-spaced int range, [low, high + 1)."""
        return math.log10(self.low), math.log10(self.high + 1)

    def index_of(self, value: Any) -> int:
        """Return the position of a `choice` value, matching 64 and 64.0 alike."""
        for index, option in enumerate(self.values):
            if isinstance(option, (bool, np.bool_)) or isinstance(value, (bool, np.bool_)):
                # True == 1 in Python, but a boolean option only matches a boolean value.
                if isinstance(option, (bool, np.bool_)) and isinstance(value, (bool, np.bool_)) and bool(option) == bool(value):
                    return index
            elif option == value:
                return index
        raise ValueError(f"parameter {self.name!r}: {value!r} is not one of {list(self.values)!r}")

    def contains(self, value: Any) -> bool:
        """Tell whether `value` is a valid value of this parameter."""
        if self.kind == "choice":
            try:
                self.index_of(value)
            except ValueError:
                return False
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if self.kind == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def to_tune_domain(self) -> sample.Domain:
        """Return the equivalent Ray Tune domain (`tune.randint` has an exclusive upper bound)."""
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "int":
            if self.log:
                return tune.lograndint(int(self.low), int(self.high) + 1)
            return tune.randint(int(self.low), int(self.high) + 1)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)

    @classmethod
    def from_tune_domain(cls, name: str, domain: sample.Domain) -> Parameter:
        """Build a parameter from `tune.uniform`, `tune.loguniform`, `tune.randint`, `tune.lograndint` or `tune.choice`."""
        sampler = domain.get_sampler()
        if isinstance(sampler, sample.Quantized):
            raise ValueError(
                f"parameter {name!r}: quantized domains ({domain.domain_str}) are not supported; "
                "use tune.randint for whole numbers or tune.uniform for real values"
            )
        if isinstance(domain, sample.Categorical):
            return cls(name=name, kind="choice", values=tuple(domain.categories))
        if isinstance(domain, sample.Integer):
            if not isinstance(sampler, (sample.Uniform, sample.LogUniform)):
                raise ValueError(f"parameter {name!r}: unsupported sampler {type(sampler).__name__} for an integer domain")
            return cls(name=name, kind="int", low=int(domain.lower), high=int(domain.upper) - 1, log=isinstance(sampler, sample.LogUniform))
        if isinstance(domain, sample.Float):
            if isinstance(sampler, sample.LogUniform):
                return cls(name=name, kind="loguniform", low=float(domain.lower), high=float(domain.upper))
            if isinstance(sampler, sample.Uniform):
                return cls(name=name, kind="uniform", low=float(domain.lower), high=float(domain.upper))
        raise ValueError(
            f"parameter {name!r}: unsupported domain {type(domain).__name__} with sampler {type(sampler).__name__}; "
            "accepted: tune.uniform, tune.loguniform, tune.randint, tune.lograndint, tune.choice"
        )


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters and the mapping between configurations and GP features."""

    parameters: tuple[Parameter, ...]

    def __post_init__(self) -> None:
        if not self.parameters:
            raise ValueError("the search space is empty: declare at least one parameter")
        names = [parameter.name for parameter in self.parameters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"the search space declares {duplicates} more than once")

    @property
    def names(self) -> list[str]:
        return [parameter.name for parameter in self.parameters]

    @property
    def num_features(self) -> int:
        return sum(parameter.width for parameter in self.parameters)

    @property
    def cardinality(self) -> int | None:
        """Number of distinct configurations, or None when any parameter is continuous."""
        total = 1
        for parameter in self.parameters:
            if parameter.cardinality is None:
                return None
            total *= parameter.cardinality
        return total

    def configurations(self) -> Iterator[dict[str, Any]]:
        """Yield every configuration of a space of `int` and `choice` parameters.

        Raises:
            ValueError: when a parameter is continuous.
        """
        for values in itertools.product(*(parameter.discrete_values() for parameter in self.parameters)):
            yield dict(zip(self.names, values))

    def from_unit(self, unit_row: np.ndarray) -> dict[str, Any]:
        """Map one row of the unit cube (one column per parameter) to a configuration."""
        return {parameter.name: parameter.from_unit(u) for parameter, u in zip(self.parameters, unit_row)}

    def to_unit(self, config: dict[str, Any]) -> np.ndarray:
        """Map a configuration to a row of the unit cube that `from_unit` maps back to it."""
        return np.array([parameter.to_unit(config[parameter.name]) for parameter in self.parameters])

    def features_from_units(self, units: np.ndarray) -> np.ndarray:
        """Vectorised GP features of many unit-cube rows, shape (n, num_features)."""
        return np.hstack([parameter.features_from_units(units[:, index]) for index, parameter in enumerate(self.parameters)])

    def to_features(self, config: dict[str, Any]) -> np.ndarray:
        return np.concatenate([parameter.to_features(config[parameter.name]) for parameter in self.parameters])

    def from_features(self, features: np.ndarray) -> dict[str, Any]:
        config = {}
        offset = 0
        for parameter in self.parameters:
            config[parameter.name] = parameter.from_features(features[offset : offset + parameter.width])
            offset += parameter.width
        return config

    def canonical(self, config: dict[str, Any]) -> dict[str, Any]:
        """Round a configuration to the values the features can express, e.g. 64.0 -> 64 for an int."""
        return self.from_features(self.to_features(config))

    def key(self, config: dict[str, Any]) -> tuple:
        """Return a hashable identity of a configuration, equal for configurations the GP cannot tell apart."""
        return tuple(np.round(self.to_features(config), 9))

    def check(self, config: dict[str, Any]) -> list[str]:
        """List what is wrong with `config` against this space: missing, unknown or out-of-range values."""
        problems = []
        for parameter in self.parameters:
            if parameter.name not in config:
                problems.append(f"missing parameter {parameter.name!r}")
            elif not parameter.contains(config[parameter.name]):
                problems.append(f"{parameter.name}={config[parameter.name]!r} is outside {self.describe(parameter)}")
        for name in config:
            if name not in self.names:
                problems.append(f"unknown parameter {name!r} (the space has {', '.join(self.names)})")
        return problems

    @staticmethod
    def describe(parameter: Parameter) -> str:
        if parameter.kind == "choice":
            return f"choice {list(parameter.values)!r}"
        return f"{parameter.kind} [{parameter.low!r}, {parameter.high!r}]"

    def to_tune_space(self) -> dict[str, sample.Domain]:
        return {parameter.name: parameter.to_tune_domain() for parameter in self.parameters}

    @classmethod
    def from_tune_config(cls, config: dict[str, Any]) -> tuple[SearchSpace, dict[str, Any]]:
        """Split a flat Ray Tune `param_space` into a search space and its constant entries.

        Raises:
            ValueError: for grid search entries, nested dictionaries of domains or
                unsupported domains, naming the key.
        """
        resolved, domains, grids = parse_spec_vars(config)
        if grids:
            names = ["/".join(map(str, path)) for path, _ in grids]
            raise ValueError(f"grid_search is not supported by GaussianProcessSearcher: {names}; use tune.choice")
        parameters = []
        for path, domain in domains:
            if len(path) != 1:
                raise ValueError(f"nested search spaces are not supported: {'/'.join(map(str, path))}; use a flat dictionary")
            parameters.append(Parameter.from_tune_domain(str(path[0]), domain))
        constants = {str(path[0]): value for path, value in resolved if len(path) == 1}
        return cls(tuple(parameters)), constants
