"""The Gaussian-process model behind GaussianProcessSearcher: target transform, fit, penalties for running trials.

Features live in the unit cube (see tuning.space), and targets are "larger is
better" values already transformed to a standard scale.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import ndtr
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from sklearn.preprocessing import PowerTransformer

# GP fit: a log-normal prior on each length scale (features live in [0, 1], so 0.5
# spans half the range), and two random restarts of the marginal-likelihood optimiser.
LENGTH_SCALE_BOUNDS = (1e-2, 1e2)
LENGTH_SCALE_PRIOR_MEDIAN = 0.5
LENGTH_SCALE_PRIOR_SD = 1.0
GP_RESTARTS = 2
MAX_OBSERVATIONS_FOR_RESTARTS = 100

# Local penalisation of running trials: the central-difference step for the gradient of
# the GP mean (feature units), the floor of its Lipschitz estimate and the floor of a
# running trial's predicted standard deviation (both in transformed-target units).
GRADIENT_STEP = 1e-4
MIN_GRADIENT_BOUND = 1e-7
MIN_PENDING_STD = 1e-9

# Below this many distinct observations the targets are only standardised.
MIN_OBSERVATIONS_FOR_TRANSFORM = 3


def fit_gp(features: np.ndarray, targets: np.ndarray, initial_theta: np.ndarray | None, seed: int) -> GaussianProcessRegressor:
    """Fit a GP with a Matern 5/2 kernel, one length scale per feature, and a noise term.

    Args:
        features: Observed points, shape (n, d), in the unit cube.
        targets: Transformed values, shape (n,).
        initial_theta: The previous fit's log-hyperparameters, a good start for
            this one, or None. With more than MAX_OBSERVATIONS_FOR_RESTARTS
            points each restart costs O(n^3), so only this warm start remains.
        seed: Seed of the random restarts.
    """
    dimensions = features.shape[1]
    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=np.full(dimensions, LENGTH_SCALE_PRIOR_MEDIAN), length_scale_bounds=LENGTH_SCALE_BOUNDS, nu=2.5
    ) + WhiteKernel(1e-3, (1e-6, 1e-1))
    restarts = GP_RESTARTS
    if initial_theta is not None and len(initial_theta) == len(kernel.theta):
        kernel = kernel.clone_with_theta(initial_theta)
        if len(features) > MAX_OBSERVATIONS_FOR_RESTARTS:
            restarts = 0

    gp = GaussianProcessRegressor(
        kernel=kernel, normalize_y=False, optimizer=_map_optimizer(dimensions),
        n_restarts_optimizer=restarts, random_state=seed,
    )
    with warnings.catch_warnings():
        # sklearn warns when a length scale reaches a bound; that is expected for irrelevant parameters.
        warnings.simplefilter("ignore")
        gp.fit(features, targets)
    return gp


def mean_gradient_bound(gp: GaussianProcessRegressor, features: np.ndarray) -> float:
    """Estimate a Lipschitz constant of the GP mean: the largest gradient norm over the rows of `features`.

    The gradient comes from central differences with step GRADIENT_STEP in
    feature units. The result is at least MIN_GRADIENT_BOUND, so a flat mean
    still gives finite penalty radii.
    """
    count, dimensions = features.shape
    shifted = np.repeat(features[:, None, :], 2 * dimensions, axis=1)
    for index in range(dimensions):
        shifted[:, 2 * index, index] += GRADIENT_STEP
        shifted[:, 2 * index + 1, index] -= GRADIENT_STEP
    values = gp.predict(shifted.reshape(-1, dimensions)).reshape(count, dimensions, 2)
    gradient = (values[:, :, 0] - values[:, :, 1]) / (2 * GRADIENT_STEP)
    return max(float(np.max(np.linalg.norm(gradient, axis=1))), MIN_GRADIENT_BOUND)


def local_penalty(
    features: np.ndarray, pending_features: np.ndarray, pending_mean: np.ndarray, pending_std: np.ndarray,
    gradient_bound: float, maximum: float,
) -> np.ndarray:
    """Return the local penalty of González et al., "Batch Bayesian Optimization via Local Penalization" (AISTATS 2016, PMLR 51:648-657).

    A running trial at x_j, whose outcome the GP predicts as N(mean_j, std_j^2),
    rules out the ball of radius (maximum - f(x_j)) / gradient_bound around
    x_j, because a function with that Lipschitz constant cannot exceed
    `maximum` inside it. The penalty at x is the probability that x lies
    outside every such ball. It is near 1 far from all running trials, 0.5 at
    a trial that the GP predicts to reach `maximum`, and near 0 at a trial
    predicted well below it. Multiplying a non-negative acquisition function by it
    spreads the trials in flight over the promising region without changing
    the GP's mean or its fitted hyperparameters.

    Args:
        features: Points to penalise, shape (n, d).
        pending_features: Running trials, shape (m, d).
        pending_mean: GP mean at the running trials, shape (m,).
        pending_std: GP standard deviation at the running trials, shape (m,).
        gradient_bound: Lipschitz constant of the GP mean, see `mean_gradient_bound`.
        maximum: Best value the function is believed to reach (transformed targets).

    Returns:
        Penalties in [0, 1], shape (n,).
    """
    penalty = np.ones(len(features))
    for point, mean, std in zip(pending_features, pending_mean, pending_std):
        distance = np.linalg.norm(features - point, axis=1)
        penalty *= ndtr((gradient_bound * distance - maximum + mean) / max(float(std), MIN_PENDING_STD))
    return penalty


def _map_optimizer(dimensions: int) -> Any:
    """Return an sklearn GP optimiser that maximises the marginal likelihood times a log-normal prior on length scales.

    With a few dozen points in several dimensions, the plain maximum-likelihood
    fit often picks tiny length scales that make the GP a set of spikes. The
    prior keeps them near the scale of the unit cube unless the data insist.
    """
    prior_mean = math.log(LENGTH_SCALE_PRIOR_MEDIAN)
    length_scales = slice(1, 1 + dimensions)

    def optimizer(objective: Any, initial_theta: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
        def penalised(theta: np.ndarray) -> tuple[float, np.ndarray]:
            value, gradient = objective(theta, eval_gradient=True)
            deviation = (theta[length_scales] - prior_mean) / LENGTH_SCALE_PRIOR_SD
            gradient = gradient.copy()
            gradient[length_scales] += deviation / LENGTH_SCALE_PRIOR_SD
            return value + 0.5 * float(np.sum(deviation**2)), gradient

        result = optimize.minimize(penalised, initial_theta, jac=True, bounds=bounds, method="L-BFGS-B")
        return result.x, result.fun

    return optimizer


def transform_targets(values: np.ndarray) -> np.ndarray:
    """Map observed values (larger is better) to a standard normal scale for the GP.

    A Yeo-Johnson power transform after standardising pulls in the long tail
    of diverged trials (a val_loss of 12 next to values of 0.1), which would
    otherwise flatten the GP everywhere else. The result has mean 0 and
    variance 1, so `xi` and `kappa` mean the same on every metric scale.
    """
    if len(values) < MIN_OBSERVATIONS_FOR_TRANSFORM or values.std() == 0:
        scale = values.std() if values.std() > 0 else 1.0
        return (values - values.mean()) / scale
    standardised = (values - values.mean()) / values.std()
    with warnings.catch_warnings():
        # The power transform warns on overflow when its exponent search tries extreme values.
        warnings.simplefilter("ignore")
        return PowerTransformer(method="yeo-johnson").fit_transform(standardised[:, None])[:, 0]

