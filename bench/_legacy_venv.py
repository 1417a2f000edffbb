"""Create the virtual environment for Ray's BayesOptSearch with bayesian-optimization 1.5.1, and run it.

Ray's BayesOptSearch fails with bayesian-optimization 2.x and 3.x, and the
main environment has 3.x, so the legacy method runs `_legacy_bayesopt.py` in
`bench/.venv-bayesopt151` as a subprocess and reads its JSON output.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent
LEGACY_VENV = BENCH / ".venv-bayesopt151"
LEGACY_SCRIPT = BENCH / "_legacy_bayesopt.py"

# Written after a successful install, so an interrupted install is redone on the next run.
REQUIREMENTS_STAMP = "frozen-tune-requirements.txt"

# pyarrow 26, which ray[tune] 2.60 pulls in, raises at import under NumPy < 2.0, so NumPy 1.x cannot be used.
# These versions meet bayesian-optimization 1.5.1's own ranges (numpy>=1.25, scipy<2,
# scikit-learn<2) and pass `pip check` beside ray[tune].
LEGACY_PINS = ("bayesian-optimization==1.5.1", "numpy==2.0.2", "scipy==1.14.1", "scikit-learn==1.5.2")

PIP_INSTALL_TIMEOUT_S = 1800
# One subprocess runs every seed of one function. With 10 seeds and a budget of 30 it took 25-70 s
# per function on a 2-core AMD EPYC machine with another cell running beside it.
LEGACY_RUN_TIMEOUT_S = 1800

# Characters of a failed command's standard error kept in the log and in the output.
ERROR_TAIL_CHARS = 3000


class LegacyEnvironmentError(RuntimeError):
    """The legacy virtual environment could not be created or its helper failed."""


def legacy_requirements() -> list[str]:
    """Return the pip requirements of the legacy environment, with Ray at the main environment's version."""
    return [*LEGACY_PINS, f"ray[tune]=={version('ray')}"]


def legacy_python() -> Path:
    return LEGACY_VENV / "bin" / "python"


def ensure_legacy_venv() -> Path:
    """Create `bench/.venv-bayesopt151` unless it already has the current requirements, and return its Python.

    Raises:
        LegacyEnvironmentError: when `venv` or `pip install` fails, with pip's error output.
    """
    requirements = legacy_requirements()
    stamp = LEGACY_VENV / REQUIREMENTS_STAMP
    if stamp.exists() and stamp.read_text().splitlines() == requirements and legacy_python().exists():
        logger.info("using the existing legacy environment %s", LEGACY_VENV)
        return legacy_python()

    logger.info("creating %s with %s", LEGACY_VENV, " ".join(requirements))
    _run_checked([sys.executable, "-m", "venv", "--clear", str(LEGACY_VENV)], "python -m venv")
    _run_checked([str(legacy_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                 "pip install")
    stamp.write_text("\n".join(requirements) + "\n")
    logger.info("created %s", LEGACY_VENV)
    return legacy_python()


def _run_checked(command: list[str], description: str) -> None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=PIP_INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise LegacyEnvironmentError(f"{description} timed out after {PIP_INSTALL_TIMEOUT_S} s") from error
    if completed.returncode != 0:
        raise LegacyEnvironmentError(
            f"{description} failed with exit code {completed.returncode}: {completed.stderr[-ERROR_TAIL_CHARS:]}"
        )


def run_legacy_cells(python: str, function_name: str, seeds: list[int], budget: int) -> dict[str, Any]:
    """Run every seed of one function with BayesOptSearch in the legacy environment, as the entry point of pool workers.

    Returns:
        The helper's JSON document: `versions`, `notes` and `cells`.

    Raises:
        LegacyEnvironmentError: when the helper exits with an error, times out or prints no valid JSON.
    """
    command = [python, str(LEGACY_SCRIPT), "--function", function_name, "--budget", str(budget),
               "--seeds", *map(str, seeds)]
    environment = dict(os.environ)
    # A PYTHONPATH set for the main environment would put its packages ahead of the legacy ones.
    environment.pop("PYTHONPATH", None)
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=LEGACY_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise LegacyEnvironmentError(f"{LEGACY_SCRIPT.name} on {function_name} timed out after {LEGACY_RUN_TIMEOUT_S} s") from error
    if completed.returncode != 0:
        raise LegacyEnvironmentError(
            f"{LEGACY_SCRIPT.name} on {function_name} failed with exit code {completed.returncode}: "
            f"{completed.stderr[-ERROR_TAIL_CHARS:]}"
        )
    if completed.stderr.strip():
        logger.debug("%s on %s wrote to standard error: %s", LEGACY_SCRIPT.name, function_name,
                     completed.stderr[-ERROR_TAIL_CHARS:])
    try:
        return json.loads(completed.stdout)
    except json.JSONDecodeError as error:
        raise LegacyEnvironmentError(
            f"{LEGACY_SCRIPT.name} on {function_name} printed invalid JSON ({error}): {completed.stdout[-ERROR_TAIL_CHARS:]}"
        ) from error
