"""Summaries, the Markdown table and the environment record of the search benchmark."""

from __future__ import annotations

import hashlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

# Packages whose versions the report records. torch backs optuna's GPSampler, greenlet lets it run
# L-BFGS-B from several starts at once (without it optuna warns and runs them one by one), and
# keras-tuner imports tensorflow and keras.
RECORDED_PACKAGES = (
    "numpy", "scipy", "scikit-learn", "bayesian-optimization", "ray", "optuna", "keras-tuner",
    "torch", "greenlet", "tensorflow", "keras", "tensorboard",
)

# Source files of frozen-tune that the `ours` methods run; their digests identify the version benchmarked.
SEARCHER_SOURCES = ("tuning/searcher.py", "tuning/gp.py", "tuning/space.py")

# Environment variables that change how fast the linear algebra runs.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

QUARTILES = (25, 50, 75)
SIGNIFICANT_DIGITS = 3


def package_versions() -> dict[str, str | None]:
    """Return the installed version of Python and of each recorded package, None where one is missing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Return the first `model name` in /proc/cpuinfo, or None where the file or the field is missing."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return None


def source_digests(repository: Path) -> dict[str, str]:
    """Return the SHA-256 of each file in SEARCHER_SOURCES, relative to `repository`."""
    return {path: hashlib.sha256((repository / path).read_bytes()).hexdigest() for path in SEARCHER_SOURCES}


def machine_record() -> dict[str, Any]:
    """Describe the CPU, the thread settings and the current load, which the suggestion times depend on."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15_min": list(os.getloadavg()),
        "platform": platform.platform(),
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }


def summarise(cells: list[dict[str, Any]], methods: list[str], functions: list[str]) -> list[dict[str, Any]]:
    """Aggregate the cells of each (method, function) over seeds.

    Regret statistics are the median and the 25th and 75th percentiles
    (linear interpolation) over the seeds that ran without an error.
    """
    summary = []
    for method in methods:
        for function in functions:
            group = [cell for cell in cells if cell["method"] == method and cell["function"] == function]
            if not group:
                continue
            finished = [cell for cell in group if cell["error"] is None]
            row: dict[str, Any] = {
                "method": method,
                "function": function,
                "seeds": len(group),
                "failed_seeds": len(group) - len(finished),
                "errors": sorted({cell["error"] for cell in group if cell["error"] is not None}),
                "regret": {},
                "duplicates": sum(cell["duplicates"] for cell in finished),
                "in_flight_duplicates": sum(cell["in_flight_duplicates"] for cell in finished),
                "skipped_suggestions": sum(cell["skipped_suggestions"] for cell in finished),
                "missing_evaluations": sum(cell["missing_evaluations"] for cell in finished),
                "stopped_early_seeds": sum(cell["stop_reason"] is not None for cell in finished),
                "stop_reasons": sorted({cell["stop_reason"] for cell in finished if cell["stop_reason"] is not None}),
                "seconds_per_suggestion": {"median": None, "max": None},
            }
            if finished:
                for count in finished[0]["regret_at"]:
                    values = [cell["regret_at"][count] for cell in finished if cell["regret_at"][count] is not None]
                    if values:
                        low, median, high = np.percentile(values, QUARTILES)
                        row["regret"][count] = {"median": float(median), "q25": float(low), "q75": float(high)}
                    else:
                        row["regret"][count] = None
                seconds = [value for cell in finished for value in cell["ask_seconds"]]
                if seconds:
                    row["seconds_per_suggestion"] = {"median": float(np.median(seconds)), "max": float(np.max(seconds))}
            summary.append(row)
    return summary


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.{SIGNIFICANT_DIGITS}g}"


def _regret_text(statistics: dict[str, float] | None) -> str:
    if statistics is None:
        return "-"
    return f"{_number(statistics['median'])} [{_number(statistics['q25'])}, {_number(statistics['q75'])}]"


def markdown_table(summary: list[dict[str, Any]], counts: list[int]) -> str:
    """Render the summary as a Markdown table, one row per (function, method)."""
    regret_headers = [f"regret@{count}" for count in counts]
    headers = ["function", "method", *regret_headers, "duplicates", "in-flight duplicates",
               "median s/suggestion", "max s/suggestion", "missing evaluations", "failed seeds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in sorted(summary, key=lambda item: item["function"]):
        regret = [_regret_text(row["regret"].get(str(count))) for count in counts]
        seconds = row["seconds_per_suggestion"]
        cells = [row["function"], row["method"], *regret, str(row["duplicates"]), str(row["in_flight_duplicates"]),
                 _number(seconds["median"]), _number(seconds["max"]), str(row["missing_evaluations"]),
                 str(row["failed_seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(document: dict[str, Any]) -> str:
    """Render the whole benchmark record as a Markdown page: settings, table, notes and environment."""
    settings = document["settings"]
    machine = document["machine"]

    lines = [
        "# Search quality",
        "",
        f"Budget {settings['budget']} evaluations, seeds {settings['seeds'][0]}-{settings['seeds'][-1]}, "
        f"{settings['jobs']} cells at a time, one BLAS thread per cell. "
        f"Run took {document['run_seconds']:.0f} s on {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs), "
        f"with a 15-minute load average of {machine['load_average_1_5_15_min'][2]:.1f} at its end.",
        "",
        "Simple regret is the best value found so far minus the known minimum, after "
        f"{', '.join(map(str, settings['checkpoints']))} evaluations in order of completion: "
        "median [25th, 75th percentile] over seeds. Duplicates "
        "repeat an earlier configuration (floats at 9 significant digits); in-flight duplicates "
        "repeat one that was still running. Seconds per suggestion is the wall time of each ask.",
        "",
        markdown_table(document["summary"], settings["checkpoints"]),
        "",
        "## Methods",
        "",
    ]
    for method, note in document["method_notes"].items():
        lines.append(f"- `{method}`: {note}")

    incomplete = [row for row in document["summary"] if row["missing_evaluations"] or row["skipped_suggestions"]]
    if incomplete:
        lines += ["", "## Skipped suggestions and early stops", ""]
        for row in incomplete:
            reasons = "; ".join(row["stop_reasons"]) or "none"
            lines.append(
                f"- `{row['method']}` on {row['function']}: {row['skipped_suggestions']} suggestions returned no "
                f"configuration, {row['stopped_early_seeds']} seeds stopped early with {row['missing_evaluations']} "
                f"evaluations missing in all (reasons: {reasons})"
            )

    if document["errors"]:
        lines += ["", "## Errors", ""]
        for error in document["errors"]:
            lines.append(f"- {error}")

    lines += ["", "## Environment", ""]
    for path, digest in document["source_sha256"].items():
        lines.append(f"- {path} SHA-256 {digest}")
    for package, package_version in document["versions"].items():
        lines.append(f"- {package} {package_version}")
    legacy = document.get("legacy_versions")
    if legacy:
        lines.append("- legacy environment for `ray_bayesopt_151`: "
                     + ", ".join(f"{package} {package_version}" for package, package_version in legacy.items()))
    lines.append("")
    return "\n".join(lines)
