"""GaussianProcessSearcher through Ray's Searcher interface, and in a real Tuner run."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from tuning.gp import local_penalty
from tuning.searcher import GaussianProcessSearcher
from tuning.space import Parameter, SearchSpace

HEAD_LIKE_SPACE = {
    "learning_rate": tune.loguniform(1e-4, 1e-1),
    "dropout": tune.uniform(0.0, 0.6),
    "units_1": tune.randint(1, 513),
    "batch_size": tune.choice([32, 64, 128, 256]),
    "activation": tune.choice(["relu", "tanh"]),
}


def bowl(config: dict) -> float:
    """A bowl over the head-like space with its minimum 0 at lr=10**-2.5, dropout 0.2, 200 units, batch 64, relu."""
    value = (math.log10(config["learning_rate"]) + 2.5) ** 2
    value += 4 * (config["dropout"] - 0.2) ** 2
    value += ((config["units_1"] - 200) / 300) ** 2
    value += 0.1 * math.log2(config["batch_size"] / 64) ** 2
    value += 0.0 if config["activation"] == "relu" else 0.2
    return value


def drive(searcher: Searcher, objective, trials: int, metric: str = "loss", sign: float = 1.0) -> list[float]:
    values = []
    for index in range(trials):
        config = searcher.suggest(f"t{index}")
        value = sign * objective(config)
        values.append(value)
        searcher.on_trial_complete(f"t{index}", {metric: value})
    return values


def test_suggestions_inside_bounds_with_types():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=5, seed=1)
    configs = []
    for index in range(25):
        config = searcher.suggest(f"t{index}")
        configs.append(config)
        searcher.on_trial_complete(f"t{index}", {"loss": bowl(config)})

    for config in configs:
        assert isinstance(config["learning_rate"], float)
        assert 1e-4 <= config["learning_rate"] <= 1e-1
        assert isinstance(config["dropout"], float)
        assert 0.0 <= config["dropout"] <= 0.6
        assert type(config["units_1"]) is int
        assert 1 <= config["units_1"] <= 512
        assert config["batch_size"] in (32, 64, 128, 256)
        assert type(config["batch_size"]) is int
        assert config["activation"] in ("relu", "tanh")


def test_min_mode_finds_low_values():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=5, seed=0)
    values = drive(searcher, bowl, 30)
    random_values = drive(GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=30, seed=0), bowl, 30)

    assert min(values) < 0.2
    assert min(values) < min(random_values)


def test_max_mode_finds_high_values():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="score", mode="max", initial_points=5, seed=0)
    values = drive(searcher, bowl, 30, metric="score", sign=-1.0)

    assert max(values) > -0.2
    # The registered observations keep the metric's own sign.
    assert max(value for _, value in searcher.observations) == pytest.approx(max(values))


def test_pending_trials_get_distinct_configs():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=4, seed=3)
    drive(searcher, bowl, 10)

    pending = [searcher.suggest(f"p{index}") for index in range(4)]
    keys = {searcher.space.key(config) for config in pending}
    observed = {searcher.space.key(config) for config, _ in searcher.observations}

    assert len(keys) == 4
    assert not keys & observed
    # The local penalty keeps the four points apart, not stacked on one optimum.
    features = np.array([searcher.space.to_features(config) for config in pending])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(features) for b in features[i + 1:]]
    assert min(distances) > 0.01


def test_pending_suggestions_distinct_in_int_bounds():
    space = {"units_1": tune.randint(16, 33), "dropout": tune.uniform(0.0, 0.6)}
    searcher = GaussianProcessSearcher(space, metric="loss", mode="min", initial_points=4, seed=5)
    drive(searcher, lambda config: ((config["units_1"] - 24) / 8) ** 2 + (config["dropout"] - 0.3) ** 2, 12)

    pending = [searcher.suggest(f"p{index}") for index in range(4)]
    observed = {(config["units_1"], config["dropout"]) for config, _ in searcher.observations}

    assert len({(config["units_1"], config["dropout"]) for config in pending}) == 4
    assert not {(config["units_1"], config["dropout"]) for config in pending} & observed
    for config in pending:
        assert type(config["units_1"]) is int
        assert 16 <= config["units_1"] <= 32
        assert 0.0 <= config["dropout"] <= 0.6


def test_local_penalty_values():
    features = np.array([[0.5, 0.5], [0.5, 0.6], [0.9, 0.9]])
    pending = np.array([[0.5, 0.5]])

    penalty = local_penalty(features, pending, np.array([0.0]), np.array([0.1]), gradient_bound=10.0, maximum=1.0)

    # At the running trial: P(N(0, 0.1^2) > 1) is about 0.
    assert penalty[0] < 1e-6
    # At distance 0.1 the ball of radius (1 - 0) / 10 just reaches the point: 0.5.
    assert penalty[1] == pytest.approx(0.5)
    assert penalty[2] == pytest.approx(1.0)


def test_penalty_spreads_near_optimum():
    space = {"x": tune.uniform(0.0, 1.0), "y": tune.uniform(0.0, 1.0)}
    searcher = GaussianProcessSearcher(space, metric="loss", mode="min", initial_points=5, seed=2)
    drive(searcher, lambda config: (config["x"] - 0.3) ** 2 + (config["y"] - 0.7) ** 2, 20)

    pending = [searcher.suggest(f"p{index}") for index in range(4)]
    points = np.array([[config["x"], config["y"]] for config in pending])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(points) for b in points[i + 1:]]

    # All four stay in the optimum's neighbourhood instead of exploring far corners. The GP is
    # sure of this optimum, so the penalty radii are small and the points may lie within 1e-3.
    assert np.max(np.linalg.norm(points - [0.3, 0.7], axis=1)) < 0.25
    assert min(distances) > 0.0
    assert len({searcher.space.key(config) for config in pending}) == 4


def test_discrete_space_ends_when_used_up(caplog):
    space = {"units_1": tune.randint(1, 4), "batch_size": tune.choice([32, 64])}
    searcher = GaussianProcessSearcher(space, metric="loss", mode="min", initial_points=2, seed=0)
    configs = []
    with caplog.at_level(logging.WARNING, logger="tuning.searcher"):
        for index in range(6):
            config = searcher.suggest(f"t{index}")
            assert isinstance(config, dict)
            configs.append(config)
            searcher.on_trial_complete(f"t{index}", {"loss": config["units_1"] + config["batch_size"] / 64})
        ends = [searcher.suggest(f"end{index}") for index in range(3)]

    assert len({(config["units_1"], config["batch_size"]) for config in configs}) == 6
    assert ends == [Searcher.FINISHED] * 3
    warnings = [record for record in caplog.records if "every one of the 6 configurations" in record.message]
    assert len(warnings) == 1
    assert len(searcher.observations) == 6


def test_running_trials_use_up_space():
    searcher = GaussianProcessSearcher({"a": tune.choice(["x", "y", "z"])}, metric="loss", mode="max", initial_points=1, seed=0)
    running = [searcher.suggest(f"t{index}") for index in range(3)]

    assert sorted(config["a"] for config in running) == ["x", "y", "z"]
    assert searcher.suggest("t3") == Searcher.FINISHED
    # A failed trial's configuration stays used: the search does not retry it.
    searcher.on_trial_complete("t0", None, error=True)
    assert searcher.suggest("t4") == Searcher.FINISHED


def test_failed_trials_kept_apart():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", seed=0)
    for index in range(4):
        searcher.suggest(f"t{index}")
    searcher.on_trial_complete("t0", {"loss": float("nan")})
    searcher.on_trial_complete("t1", {"loss": float("inf")})
    searcher.on_trial_complete("t2", None, error=True)
    searcher.on_trial_complete("t3", {"loss": 0.5})

    assert [value for _, value in searcher.observations] == [0.5]
    assert set(searcher.failed_trials) == {"t0", "t1", "t2"}
    assert searcher.pending_trials == {}


def test_failing_region_avoided():
    # Learning rates above 0.02 diverge, and the best one, 0.015, lies just below them.
    for seed in range(3):
        searcher = GaussianProcessSearcher({"lr": tune.loguniform(1e-4, 1e-1)}, metric="loss", mode="min", seed=seed)
        failures, best = 0, math.inf
        for index in range(30):
            learning_rate = searcher.suggest(f"t{index}")["lr"]
            loss = float("nan") if learning_rate > 0.02 else (math.log10(learning_rate) - math.log10(0.015)) ** 2
            failures += math.isnan(loss)
            best = best if math.isnan(loss) else min(best, loss)
            searcher.on_trial_complete(f"t{index}", {"loss": loss})

        assert failures <= 5, seed
        assert best < 1e-3, seed
        assert len(searcher.failed_trials) == failures


def test_failing_configuration_not_repeated():
    space = {"a": tune.choice([1, 2, 3, 4]), "b": tune.choice([0, 1])}
    searcher = GaussianProcessSearcher(space, metric="loss", mode="min", initial_points=3, seed=0)
    configs = []
    for index in range(8):
        config = searcher.suggest(f"t{index}")
        configs.append((config["a"], config["b"]))
        failed = configs[-1] == (4, 1)
        searcher.on_trial_complete(f"t{index}", None if failed else {"loss": config["a"] + config["b"]}, error=failed)

    assert configs.count((4, 1)) == 1
    assert len(set(configs)) == 8


def test_log_int_spreads_over_decades():
    # Searches avoid repeating values, so the mapping from uniform draws is tested directly.
    space, _ = SearchSpace.from_tune_config({"units": tune.lograndint(1, 1000)})
    parameter = space.parameters[0]
    values = np.array([parameter.from_unit(u) for u in np.random.default_rng(0).random(6000)])
    shares = np.bincount(np.floor(np.log10(values)).astype(int), minlength=3) / len(values)

    assert values.min() == 1
    assert values.max() == 999
    assert len(shares) == 3
    assert np.abs(shares - 1 / 3).max() < 0.03
    # Value 1 takes [log 1, log 2) of [log 1, log 1000), as in Ray's own sampler.
    assert abs(np.mean(values == 1) - math.log10(2) / 3) < 0.02


def test_best_reported_value_registered():
    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="val_loss", mode="min", seed=0)
    searcher.suggest("t0")
    for value in (0.9, 0.4, 0.6):
        searcher.on_trial_result("t0", {"val_loss": value})
    searcher.on_trial_complete("t0", {"val_loss": 0.6})

    assert searcher.observations[0][1] == 0.4


def test_save_restore_round_trip(tmp_path):
    original = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=3, seed=7)
    drive(original, bowl, 8)
    original.suggest("running")
    path = tmp_path / "searcher.pkl"
    original.save(str(path))

    restored = GaussianProcessSearcher(seed=123)
    restored.restore(str(path))

    assert restored.observations == original.observations
    assert restored.pending_trials == original.pending_trials
    assert restored.metric == "loss"
    assert restored.mode == "min"
    assert restored.suggest("next") == original.suggest("next")


def test_space_through_set_search_properties():
    searcher = GaussianProcessSearcher(seed=0)
    accepted = searcher.set_search_properties("loss", "min", {**HEAD_LIKE_SPACE, "epochs": 3})
    config = searcher.suggest("t0")

    assert accepted is True
    assert config["epochs"] == 3
    assert set(config) == {*HEAD_LIKE_SPACE, "epochs"}
    # Ray's Searcher contract: a searcher that already has a space rejects another one.
    assert searcher.set_search_properties("loss", "min", HEAD_LIKE_SPACE) is False


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"x": tune.quniform(0, 1, 0.1)}, "quantized"),
        ({"x": tune.grid_search([1, 2])}, "grid_search"),
        ({"x": tune.randn(0, 1)}, "unsupported"),
    ],
)
def test_unsupported_domains_rejected(space, message):
    with pytest.raises(ValueError, match=message):
        GaussianProcessSearcher(space, metric="loss", mode="min")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"xi": float("inf")}, "xi must be a finite number >= 0, got inf"),
        ({"xi": "a"}, "xi must be a finite number >= 0, got 'a'"),
        ({"acquisition_function": "ucb", "kappa": float("nan")}, "kappa must be a finite number >= 0, got nan"),
        ({"kappa": -1.0}, "kappa must be a finite number >= 0, got -1.0"),
        ({"seed": -1}, "seed must be None or an integer >= 0, got -1"),
        ({"seed": 1.5}, "seed must be None or an integer >= 0, got 1.5"),
        ({"seed": True}, "seed must be None or an integer >= 0, got True"),
        ({"points_to_evaluate": {"lr": 0.01}}, "points_to_evaluate must be a list of dictionaries, got {'lr': 0.01}"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_invalid_argument_named(arguments, expected):
    with pytest.raises(ValueError) as raised:
        GaussianProcessSearcher({"lr": tune.loguniform(1e-4, 1e-1)}, metric="loss", mode="min", **arguments)

    assert str(raised.value) == expected


def test_numpy_seed_accepted():
    searcher = GaussianProcessSearcher({"lr": tune.loguniform(1e-4, 1e-1)}, metric="loss", mode="min", seed=np.int64(3))

    assert searcher.suggest("t0") == GaussianProcessSearcher({"lr": tune.loguniform(1e-4, 1e-1)}, metric="loss", mode="min", seed=3).suggest("t0")


def test_suggest_without_space_fails_clearly():
    with pytest.raises(RuntimeError, match="no search space"):
        GaussianProcessSearcher(metric="loss", mode="min").suggest("t0")


def test_loguniform_random_phase_spreads_over_decades():
    searcher = GaussianProcessSearcher({"lr": tune.loguniform(1e-5, 1e-1)}, metric="loss", mode="min", initial_points=400, seed=0)
    decades = [math.floor(math.log10(searcher.suggest(f"t{index}")["lr"])) for index in range(400)]
    counts = np.bincount(np.array(decades) + 5, minlength=4)

    assert len(counts) == 4
    assert counts.min() >= 80
    assert counts.max() <= 120


def test_int_parameter_never_leaves_bounds():
    parameter = Parameter(name="units", kind="int", low=1, high=8)
    for position in np.linspace(-0.1, 1.1, 500):
        value = parameter.from_features(np.array([position]))
        assert type(value) is int
        assert 1 <= value <= 8
    assert SearchSpace((parameter,)).canonical({"units": 3.0}) == {"units": 3}


def test_real_tuner_four_concurrent_trials(ray_local, tmp_path):
    def objective(config):
        # Workers cannot import this test module, so the function carries its own formula.
        import math

        loss = (math.log10(config["learning_rate"]) + 2.5) ** 2 + 4 * (config["dropout"] - 0.2) ** 2
        tune.report({"loss": loss + ((config["units_1"] - 200) / 300) ** 2})

    searcher = GaussianProcessSearcher(HEAD_LIKE_SPACE, metric="loss", mode="min", initial_points=4, seed=0)
    tuner = tune.Tuner(
        objective,
        tune_config=tune.TuneConfig(metric="loss", mode="min", search_alg=ConcurrencyLimiter(searcher, max_concurrent=4), num_samples=12),
        run_config=tune.RunConfig(verbose=0, storage_path=str(tmp_path)),
    )
    results = tuner.fit()

    configs = [result.config for result in results]
    assert len(results) == 12
    assert results.num_errors == 0
    assert len({SearchSpace.from_tune_config(HEAD_LIKE_SPACE)[0].key(config) for config in configs}) == 12
    assert len(searcher.observations) == 12
    losses = [result.metrics["loss"] for result in results]
    assert results.get_best_result().metrics["loss"] == min(losses)
    assert sorted(value for _, value in searcher.observations) == sorted(losses)



@pytest.mark.parametrize(("mode", "target"), [("min", 0.0), ("max", 2.0)])
def test_optimum_on_boundary_reached(mode, target):
    space = {"x": tune.uniform(0.0, 1.0), "y": tune.uniform(0.0, 1.0)}
    searcher = GaussianProcessSearcher(space, metric="value", mode=mode, initial_points=5, seed=0)
    values = []
    for index in range(25):
        config = searcher.suggest(f"t{index}")
        values.append(config["x"] + config["y"])
        searcher.on_trial_complete(f"t{index}", {"value": values[-1]})

    best = min(values) if mode == "min" else max(values)
    assert abs(best - target) < 0.02




def test_last_unused_configuration_found():
    # 2,999 of 3,000 values used: 200 random draws find the last one only about 6% of the time.
    searcher = GaussianProcessSearcher({"units": tune.randint(1, 3001)}, metric="loss", mode="min", initial_points=5000, seed=0)
    for units in range(1, 3001):
        if units != 1234:
            searcher.add_evaluated_point({"units": units}, float(units))

    assert searcher.suggest("t0") == {"units": 1234}
    assert searcher.suggest("t1") == Searcher.FINISHED
