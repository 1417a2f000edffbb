"""Gaussian-process Bayesian search as a Ray Tune `Searcher`, built on bayesian-optimization 3.x.

Ray's own `BayesOptSearch` calls `bayes_opt.UtilityFunction`, which
bayesian-optimization removed in 2.0, so it fails when constructed with any
current release. This searcher uses the package's `TargetSpace` and
acquisition functions directly and adds what parallel head tuning needs:
mixed parameter kinds, pending trials and a state that survives a restore.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import pickle
from typing import Any, Callable

import numpy as np
from bayes_opt import TargetSpace, acquisition
from ray.tune.search import Searcher
from scipy import optimize
from scipy.stats import qmc
from sklearn.gaussian_process import GaussianProcessRegressor
from threadpoolctl import threadpool_limits

from tuning.gp import fit_gp, local_penalty, mean_gradient_bound, transform_targets
from tuning.space import SearchSpace
from tuning.trainable import FAILURE_KEY

logger = logging.getLogger(__name__)

ACQUISITION_FUNCTIONS: tuple[str, ...] = ("ei", "ucb", "pi")

# The GP needs at least this many finished trials before its fit means anything;
# until then suggestions stay random even after the initial points.
MIN_OBSERVATIONS_FOR_GP = 2

# Acquisition optimiser, in the unit cube with one coordinate per parameter. It scores
# uniform candidates and Gaussian perturbations of the best observed configurations
# (each candidate draws one scale from the list), then finer perturbations of the best
# candidates, then runs L-BFGS-B along the continuous parameters from the very best. About 2,500
# acquisition values per suggestion keep it well under a second at 300 observations.
RANDOM_CANDIDATES = 1_000
LOCAL_CENTRES = 5
LOCAL_SCALES = (0.2, 0.05, 0.01)
REFINED_CENTRES = 5
REFINE_CANDIDATES = 500
REFINE_SCALES = (0.02, 0.005, 0.001)
GRADIENT_STARTS = 3
GRADIENT_ITERATIONS = 30
# Step of the central differences that give L-BFGS-B the acquisition gradient, in unit-cube units.
ACQUISITION_GRADIENT_STEP = 1e-5

# Points (half uniform, half near the best observations) at which the gradient of the GP
# mean is measured to bound its Lipschitz constant for the local penalty.
GRADIENT_PROBES = 200

# Exploration margin of probability of improvement when none is given.
DEFAULT_PI_XI = 0.01

# Attempts to draw a random configuration that no trial has used before the unused ones are listed.
MAX_RESAMPLES = 200

# Largest discrete space whose unused configurations are listed when random draws find none.
# Listing 100,000 configurations takes a few seconds, and only a nearly used-up space needs it.
MAX_LISTED_CONFIGURATIONS = 100_000


class GaussianProcessSearcher(Searcher):
    """Suggest trial configurations with a Gaussian process and an acquisition function.

    The first `initial_points` suggestions are a Latin hypercube over the
    space, with log-spaced parameters spread evenly over decades. After that,
    a GP with a Matern 5/2 kernel and one length scale per feature is fitted
    to the finished trials, and the acquisition function picks the next point.
    While trials are running, the acquisition function is multiplied by a
    local penalty around each of them (González et al., 2016), so concurrent
    trials get different configurations near the promising region.
    A failed trial, or one whose metric is NaN or infinite, enters the GP
    at the worst value observed so far, so the search moves away from
    configurations that diverge instead of suggesting them again.
    `mode="min"` is handled by negating the metric internally.
    Suggestions avoid configurations that a trial has used. Once a discrete
    space has none left, `suggest` logs a warning and returns
    `Searcher.FINISHED`, so the run ends with fewer trials than asked for.

    Args:
        space: The search space: a `SearchSpace`, or a dictionary of Ray Tune
            domains. None means it comes later through `set_search_properties`,
            which `Tuner` calls with its `param_space`.
        metric: The reported metric to optimise.
        mode: `"min"` or `"max"`.
        initial_points: Number of space-filling random suggestions before the
            GP takes over. Default 5; more helps rugged functions, fewer
            helps small budgets.
        acquisition_function: `"ei"` (expected improvement, the default),
            `"ucb"` (upper confidence bound) or `"pi"` (probability of
            improvement).
        xi: Exploration margin of EI and PI in units of the standard
            deviation of the observed metric; larger explores more. None
            means 0 for EI and 0.01 for PI, which without a margin tends
            to pick points next to the best one. For EI, bench/BENCHMARKS.md
            compares 0 with 0.01.
        kappa: Width of the UCB bound in standard deviations. Default 2.576;
            larger explores more.
        seed: Seed of every random choice the searcher makes. None draws one.
        points_to_evaluate: Configurations to try first, before the random
            design, for example a known good default.

    Example:
        >>> from ray import tune
        >>> searcher = GaussianProcessSearcher(
        ...     {"lr": tune.loguniform(1e-4, 1e-1), "units": tune.randint(16, 257)},
        ...     metric="val_loss", mode="min", seed=0)
        >>> config = searcher.suggest("trial_1")
        >>> 1e-4 <= config["lr"] <= 1e-1 and isinstance(config["units"], int)
        True
        >>> searcher.on_trial_complete("trial_1", {"val_loss": 0.3})
    """

    def __init__(
        self,
        space: SearchSpace | dict[str, Any] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        *,
        initial_points: int = 5,
        acquisition_function: str = "ei",
        xi: float | None = None,
        kappa: float = 2.576,
        seed: int | None = None,
        points_to_evaluate: list[dict[str, Any]] | None = None,
    ) -> None:
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if acquisition_function not in ACQUISITION_FUNCTIONS:
            raise ValueError(
                f"acquisition_function must be one of {', '.join(ACQUISITION_FUNCTIONS)}, got {acquisition_function!r}"
            )
        if isinstance(initial_points, bool) or not isinstance(initial_points, int) or initial_points < 0:
            raise ValueError(f"initial_points must be an integer >= 0, got {initial_points!r}")
        if xi is None:
            xi = DEFAULT_PI_XI if acquisition_function == "pi" else 0.0
        for name, margin in (("xi", xi), ("kappa", kappa)):
            if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not 0 <= margin < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {margin!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        if points_to_evaluate is not None and (
            not isinstance(points_to_evaluate, list) or not all(isinstance(point, dict) for point in points_to_evaluate)
        ):
            raise ValueError(f"points_to_evaluate must be a list of dictionaries, got {points_to_evaluate!r}")
        super().__init__(metric=metric, mode=mode)

        self._initial_points = initial_points
        self._acquisition_function = acquisition_function
        self._xi = float(xi)
        self._kappa = float(kappa)
        self._rng = np.random.default_rng(seed)

        self._space: SearchSpace | None = None
        self._constants: dict[str, Any] = {}
        self._points_to_evaluate: list[dict[str, Any]] = [dict(point) for point in points_to_evaluate or []]
        self._design: list[dict[str, Any]] = []
        self._random_suggestions = 0
        self._added_points = 0
        self._observations: list[tuple[dict[str, Any], float]] = []
        self._pending: dict[str, dict[str, Any]] = {}
        self._best_reported: dict[str, float] = {}
        self._failed_trials: dict[str, str] = {}
        self._failed_configs: list[dict[str, Any]] = []
        self._exhausted_warned = False
        self._gp_announced = False
        self._kernel_theta: np.ndarray | None = None

        if space is not None:
            self._set_space(space)

    # Searcher interface -------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        """Take the metric, mode and `param_space` from `Tuner`; False if a space was given already."""
        if self._space is not None:
            return False
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self._set_space(config)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """Return the next configuration for `trial_id`, inside the bounds and of the declared types.

        Returns `Searcher.FINISHED` once every configuration of a discrete space is used.
        """
        if self._space is None:
            raise RuntimeError(
                "GaussianProcessSearcher has no search space: pass one to the constructor "
                "or give Tuner a param_space"
            )
        if self._metric is None or self._mode is None:
            raise RuntimeError(
                "GaussianProcessSearcher needs a metric and a mode: pass them to the constructor "
                "or to tune.TuneConfig(metric=..., mode=...)"
            )

        if self._points_to_evaluate:
            config = self._space.canonical(self._points_to_evaluate.pop(0))
        elif self._space_exhausted(self._used_keys()):
            # Each trial's seed comes from its configuration, so a repeat would train the same head again.
            return Searcher.FINISHED
        elif self._random_suggestions + self._added_points < self._initial_points or len(self._observations) < MIN_OBSERVATIONS_FOR_GP:
            # Points added from an earlier run count towards the initial design.
            config = self._suggest_random()
        else:
            config = self._suggest_from_gp()

        self._pending[trial_id] = config
        logger.debug("trial %s: suggested %s", trial_id, config)
        return {**self._constants, **config}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Track the best finite value of the metric a trial has reported so far."""
        value = self._finite_metric(result)
        if value is None or trial_id not in self._pending:
            return
        best = self._best_reported.get(trial_id)
        if best is None or self._sign * value > self._sign * best:
            self._best_reported[trial_id] = value

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Register a finished trial's best reported value, or a failed or non-finite trial as a failure."""
        config = self._pending.pop(trial_id, None)
        best = self._best_reported.pop(trial_id, None)
        if config is None:
            return

        if error or (result and result.get(FAILURE_KEY)):
            self._failed_trials[trial_id] = str(result.get(FAILURE_KEY)) if result and result.get(FAILURE_KEY) else "the trial raised an error"
            self._failed_configs.append(config)
            logger.info("trial %s failed; the GP takes its configuration as the worst one seen", trial_id)
            return
        final = self._finite_metric(result) if result is not None else None
        if final is None:
            self._failed_trials[trial_id] = f"metric {self._metric!r} missing, NaN or infinite"
            self._failed_configs.append(config)
            logger.warning(
                "trial %s ended with %s = %r; the GP takes its configuration as the worst one seen",
                trial_id, self._metric, None if result is None else result.get(self._metric),
            )
            return

        value = final if best is None or self._sign * final >= self._sign * best else best
        self._observations.append((config, value))

    def add_evaluated_point(
        self,
        parameters: dict[str, Any],
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ) -> None:
        """Register a configuration evaluated outside this searcher, e.g. from an earlier run.

        A point with `error` or without a finite value counts as a failed trial.
        """
        if self._space is None:
            raise RuntimeError("set the search space before adding evaluated points")
        config = {name: parameters[name] for name in self._space.names if name in parameters}
        problems = self._space.check(config)
        if problems:
            raise ValueError(f"evaluated point {parameters!r} does not fit the search space: {'; '.join(problems)}")
        self._added_points += 1
        if error or value is None or not math.isfinite(float(value)):
            self._failed_configs.append(self._space.canonical(config))
            return
        self._observations.append((self._space.canonical(config), float(value)))

    def get_state(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items()}
        return copy.deepcopy(state)

    def set_state(self, state: dict[str, Any]) -> None:
        # States saved before failed configurations were kept have none.
        self.__dict__.update({"_failed_configs": [], **copy.deepcopy(state)})

    def save(self, checkpoint_path: str) -> None:
        """Write the whole searcher state (observations, pending trials, random state) to a file."""
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.get_state(), file)

    def restore(self, checkpoint_path: str) -> None:
        """Load a state written by `save`."""
        with open(checkpoint_path, "rb") as file:
            self.set_state(pickle.load(file))

    # Read-only views ----------------------------------------------------------------

    @property
    def space(self) -> SearchSpace | None:
        return self._space

    @property
    def observations(self) -> list[tuple[dict[str, Any], float]]:
        """Registered (configuration, metric value) pairs, in the metric's own sign."""
        return list(self._observations)

    @property
    def pending_trials(self) -> dict[str, dict[str, Any]]:
        return dict(self._pending)

    @property
    def failed_trials(self) -> dict[str, str]:
        """Trial id -> reason, for trials of this searcher that failed or ended without a finite metric."""
        return dict(self._failed_trials)

    # Internals ----------------------------------------------------------------------

    @property
    def _sign(self) -> float:
        return -1.0 if self._mode == "min" else 1.0

    def _set_space(self, space: SearchSpace | dict[str, Any]) -> None:
        if isinstance(space, SearchSpace):
            self._space, self._constants = space, {}
        else:
            self._space, self._constants = SearchSpace.from_tune_config(space)
        for point in self._points_to_evaluate:
            problems = self._space.check({k: v for k, v in point.items() if k not in self._constants})
            if problems:
                raise ValueError(f"points_to_evaluate entry {point!r} does not fit the search space: {'; '.join(problems)}")
        if self._initial_points:
            sampler = qmc.LatinHypercube(d=len(self._space.parameters), seed=self._rng)
            self._design = [self._space.from_unit(row) for row in sampler.random(self._initial_points)]

    def _finite_metric(self, result: dict[str, Any] | None) -> float | None:
        if not result or self._metric not in result:
            return None
        try:
            value = float(result[self._metric])
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def _used_keys(self) -> set[tuple]:
        configs = [config for config, _ in self._observations] + list(self._pending.values()) + self._failed_configs
        return {self._space.key(config) for config in configs}

    def _space_exhausted(self, used_keys: set[tuple]) -> bool:
        cardinality = self._space.cardinality
        exhausted = cardinality is not None and len(used_keys) >= cardinality
        if exhausted and not self._exhausted_warned:
            logger.warning(
                "every one of the %d configurations of the search space has been suggested; the search ends "
                "after these trials, because a repeated configuration trains the same head again",
                cardinality,
            )
            self._exhausted_warned = True
        return exhausted

    def _suggest_random(self) -> dict[str, Any]:
        self._random_suggestions += 1
        used_keys = self._used_keys()
        if self._design:
            config = self._design.pop(0)
            if self._space.key(config) not in used_keys:
                return config
        return self._random_unused(used_keys)

    def _random_unused(self, used_keys: set[tuple]) -> dict[str, Any]:
        for _ in range(MAX_RESAMPLES):
            config = self._space.from_unit(self._rng.random(len(self._space.parameters)))
            if self._space.key(config) not in used_keys:
                return config
        cardinality = self._space.cardinality
        if cardinality is not None and cardinality <= MAX_LISTED_CONFIGURATIONS:
            unused = [candidate for candidate in self._space.configurations() if self._space.key(candidate) not in used_keys]
            if unused:
                return unused[int(self._rng.integers(len(unused)))]
        return config

    def _suggest_from_gp(self) -> dict[str, Any]:
        if not self._gp_announced:
            logger.info(
                "GaussianProcessSearcher: %d trials finished; the GP with %s now picks each configuration",
                len(self._observations), self._acquisition_function,
            )
            self._gp_announced = True

        used_keys = self._used_keys()
        with threadpool_limits(limits=1):
            # The matrices are small (a few hundred rows), so BLAS threads cost more than they
            # save: on 2 cores they made each suggestion several times slower.
            target_space = self._build_target_space()
            gp = fit_gp(target_space.params, target_space.target, self._kernel_theta, int(self._rng.integers(2**31 - 1)))
            self._kernel_theta = gp.kernel_.theta
            acquisition_function = self._build_acquisition(float(target_space.target.max()))
            values_of = self._acquisition_values(gp, acquisition_function)
            if self._pending:
                values_of = self._penalised(values_of, gp)
            return self._maximise_acquisition(values_of, used_keys)

    def _acquisition_values(self, gp: GaussianProcessRegressor, acquisition_function: Any) -> Callable[[np.ndarray], np.ndarray]:
        """Return the acquisition function of GP features."""

        def values(features: np.ndarray) -> np.ndarray:
            mean, std = gp.predict(features, return_std=True)
            return acquisition_function.base_acq(mean, np.maximum(std, 1e-9))

        return values

    def _penalised(self, values_of: Callable[[np.ndarray], np.ndarray], gp: GaussianProcessRegressor) -> Callable[[np.ndarray], np.ndarray]:
        """Multiply the acquisition function by the local penalty of every running trial.

        The penalty radius around a running trial shrinks as the GP predicts it
        closer to the best value, so near a confident optimum the next trial
        lands close to the running ones, and elsewhere further away. A kriging
        believer (running trials registered at the GP's own prediction) did
        worse in bench/search_quality.py with 4 trials in flight: median regret
        0.051 on the head-like function after 30 evaluations, against 0.021.
        """
        pending_features = np.array([self._space.to_features(config) for config in self._pending.values()])
        pending_mean, pending_std = gp.predict(pending_features, return_std=True)
        dimensions = len(self._space.parameters)
        probe_units = np.vstack([
            self._rng.random((GRADIENT_PROBES, dimensions)),
            self._perturb(self._best_units(LOCAL_CENTRES), GRADIENT_PROBES, LOCAL_SCALES),
        ])
        gradient_bound = mean_gradient_bound(gp, self._space.features_from_units(probe_units))
        maximum = max(float(gp.y_train_.max()), float(pending_mean.max()))

        def values(features: np.ndarray) -> np.ndarray:
            penalty = local_penalty(features, pending_features, pending_mean, pending_std, gradient_bound, maximum)
            acquisition_values = values_of(features)
            if self._acquisition_function == "ucb":
                # The penalty is a factor, so UCB, which can be negative, goes through a
                # softplus first; that keeps the order of the unpenalised values.
                acquisition_values = np.logaddexp(0.0, acquisition_values)
            return acquisition_values * penalty

        return values

    def _maximise_acquisition(self, values_of: Callable[[np.ndarray], np.ndarray], used_keys: set[tuple]) -> dict[str, Any]:
        """Pick the unused configuration with the highest acquisition value among sampled candidates.

        Candidates live in the unit cube with one coordinate per parameter, so
        every candidate decodes to a valid configuration and int and choice
        parameters are scored at the values they will really take. Half are
        uniform over the whole space and half are perturbations of the best
        observed configurations; the best few are then refined by smaller
        perturbations. Unlike a gradient optimiser on relaxed features, this
        does not pile suggestions onto the bounds of the space.
        """
        dimensions = len(self._space.parameters)
        scored_units, scored_values = [], []

        def score(units: np.ndarray) -> None:
            scored_units.append(units)
            scored_values.append(values_of(self._space.features_from_units(units)))

        uniform = self._rng.random((RANDOM_CANDIDATES, dimensions))
        centres = self._best_units(LOCAL_CENTRES)
        score(np.vstack([uniform, self._perturb(centres, RANDOM_CANDIDATES, LOCAL_SCALES)]))

        units, values = np.vstack(scored_units), np.concatenate(scored_values)
        best = units[np.argsort(values)[::-1][:REFINED_CENTRES]]
        score(self._perturb(best, REFINE_CANDIDATES, REFINE_SCALES))
        if GRADIENT_STARTS:
            units, values = np.vstack(scored_units), np.concatenate(scored_values)
            for start in units[np.argsort(values)[::-1][:GRADIENT_STARTS]]:
                score(self._refine_continuous(values_of, start)[None, :])

        units, values = np.vstack(scored_units), np.concatenate(scored_values)
        for index in np.argsort(values)[::-1]:
            config = self._space.from_unit(units[index])
            if self._space.key(config) not in used_keys:
                return config
        return self._random_unused(used_keys)

    def _refine_continuous(self, values_of: Callable[[np.ndarray], np.ndarray], start: np.ndarray) -> np.ndarray:
        """Climb the acquisition function from `start` along the continuous parameters with L-BFGS-B.

        For uniform and loguniform parameters the unit coordinate equals the GP
        feature, so the optimiser works on the exact function. Int and choice
        parameters stay at their values.
        """
        continuous = [index for index, parameter in enumerate(self._space.parameters) if parameter.kind in ("uniform", "loguniform")]
        if not continuous:
            return start

        def negative_acquisition(coordinates: np.ndarray) -> tuple[float, np.ndarray]:
            # One batch contains the point and a step either way along each coordinate, so
            # the value and its central-difference gradient cost a single GP prediction.
            points = np.repeat(start[None, :], 2 * len(continuous) + 1, axis=0)
            points[:, continuous] = coordinates
            # Both steps stay in [0, 1], and together they span at least one step.
            upper = np.minimum(coordinates + ACQUISITION_GRADIENT_STEP, 1.0)
            lower = np.maximum(coordinates - ACQUISITION_GRADIENT_STEP, 0.0)
            positions = np.arange(len(continuous))
            points[1 + 2 * positions, continuous] = upper
            points[2 + 2 * positions, continuous] = lower
            values = values_of(self._space.features_from_units(points))
            gradient = (values[1::2] - values[2::2]) / (upper - lower)
            return -float(values[0]), -gradient

        result = optimize.minimize(
            negative_acquisition, start[continuous], jac=True, bounds=[(0.0, 1.0)] * len(continuous),
            method="L-BFGS-B", options={"maxiter": GRADIENT_ITERATIONS},
        )
        refined = start.copy()
        refined[continuous] = np.clip(result.x, 0.0, 1.0)
        return refined

    def _best_units(self, count: int) -> np.ndarray:
        """Unit-cube rows of the best observed configurations."""
        ranked = sorted(self._observations, key=lambda item: -self._sign * item[1])[:count]
        return np.array([self._space.to_unit(config) for config, _ in ranked])

    def _perturb(self, centres: np.ndarray, count: int, scales: tuple[float, ...]) -> np.ndarray:
        """Draw `count` Gaussian perturbations of the rows of `centres`, with each scale equally often.

        Each coordinate is also redrawn uniformly with probability 1/d, so
        choice and int parameters jump to other values now and then.
        """
        dimensions = centres.shape[1]
        picks = centres[self._rng.integers(len(centres), size=count)]
        sigma = np.array(scales)[self._rng.integers(len(scales), size=count)][:, None]
        moved = picks + self._rng.normal(size=(count, dimensions)) * sigma
        redraw = self._rng.random((count, dimensions)) < 1.0 / dimensions
        moved[redraw] = self._rng.random(int(redraw.sum()))
        return np.clip(moved, 0.0, 1.0)

    def _build_target_space(self) -> TargetSpace:
        """Register the transformed observations, one per distinct configuration, as GP training data.

        A failed configuration that never finished counts as the worst observed value.
        """
        grouped: dict[tuple, list[float]] = {}
        features_by_key: dict[tuple, np.ndarray] = {}
        for config, value in self._observations:
            key = self._space.key(config)
            grouped.setdefault(key, []).append(self._sign * value)
            features_by_key[key] = self._space.to_features(config)
        worst = min(min(values) for values in grouped.values())
        for config in self._failed_configs:
            key = self._space.key(config)
            if key not in grouped:
                grouped[key] = [worst]
                features_by_key[key] = self._space.to_features(config)

        keys = list(grouped)
        targets = transform_targets(np.array([np.mean(grouped[key]) for key in keys]))
        pbounds = {f"f{index}": (0.0, 1.0) for index in range(self._space.num_features)}
        target_space = TargetSpace(None, pbounds)
        for key, target in zip(keys, targets):
            target_space.register(features_by_key[key], float(target))
        return target_space

    def _build_acquisition(self, best_target: float) -> acquisition.AcquisitionFunction:
        if self._acquisition_function == "ucb":
            return acquisition.UpperConfidenceBound(kappa=self._kappa)
        if self._acquisition_function == "pi":
            function = acquisition.ProbabilityOfImprovement(xi=self._xi)
        else:
            function = acquisition.ExpectedImprovement(xi=self._xi)
        function.y_max = best_target
        return function
