"""Results of a run: the per-trial table, its CSV, the convergence plot and the text report."""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from tuning.config import REPORTED_METRICS
from tuning.trainable import FAILURE_KEY

logger = logging.getLogger(__name__)

STATUS_COMPLETED = "TERMINATED"
STATUS_FAILED = "ERROR"


def results_frame(results: Iterable[Any], parameter_names: list[str], metric: str) -> pd.DataFrame:
    """Build one row per trial from Ray Tune results, in the order the trials were created.

    Columns: trial_number, trial_id, every tuned hyperparameter, best_epoch,
    best_<metric> for each reported metric, epochs_run, status, error,
    wall_seconds, startup_seconds, started_at, ended_at (Unix times of the
    trial's start and of its last report), node, path.
    """
    rows = []
    for result in results:
        metrics = result.metrics or {}
        folder = Path(result.path).name if result.path else ""
        number = folder.split("_", 1)[0]
        row: dict[str, Any] = {
            "trial_number": int(number) if number.isdigit() else None,
            "trial_id": metrics.get("trial_id") or folder,
        }
        for name in parameter_names:
            row[name] = result.config.get(name)
        row["best_epoch"] = metrics.get("best_epoch")
        for name in REPORTED_METRICS:
            row[f"best_{name}"] = metrics.get(f"best_{name}")
        row["epochs_run"] = metrics.get("epoch", 0)
        failure = metrics.get(FAILURE_KEY)
        row["status"] = STATUS_FAILED if result.error is not None or failure else STATUS_COMPLETED
        row["error"] = str(failure) if failure else _error_line(result.error)
        row["wall_seconds"] = metrics.get("time_total_s")
        row["startup_seconds"] = metrics.get("startup_seconds")
        row["started_at"] = metrics.get("started_at")
        row["ended_at"] = metrics.get("ended_at")
        row["node"] = metrics.get("node")
        row["path"] = result.path
        rows.append(row)

    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values("trial_number", na_position="last", kind="stable").reset_index(drop=True)
    frame["trial_number"] = np.arange(1, len(frame) + 1)
    return frame


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Ray wraps the trial's exception; its last line names the original error.
    return lines[-1] if lines else type(error).__name__


def best_metric_columns(frame: pd.DataFrame) -> list[str]:
    return [column for column in frame.columns if column.startswith("best_")]


def best_row(frame: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    """Return the completed trial with the best value of `best_<metric>`."""
    completed = frame[(frame["status"] == STATUS_COMPLETED) & frame[f"best_{metric}"].notna()]
    if completed.empty:
        raise ValueError("no trial completed with a finite metric")
    index = completed[f"best_{metric}"].idxmin() if mode == "min" else completed[f"best_{metric}"].idxmax()
    return completed.loc[index]


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write the table atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".csv.tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)
    return path


def plot_convergence(frame: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """Plot each trial's best value and the best so far against the trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = f"best_{metric}"
    completed = frame[(frame["status"] == STATUS_COMPLETED) & frame[column].notna()]
    values = completed[column].astype(float)
    best_so_far = values.cummin() if mode == "min" else values.cummax()

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    axes.scatter(completed["trial_number"], values, s=18, color="tab:blue", alpha=0.7, label="trial")
    axes.step(completed["trial_number"], best_so_far, where="post", color="tab:red", linewidth=2, label="best so far")
    failed = frame[frame["status"] != STATUS_COMPLETED]
    if not failed.empty:
        axes.scatter(failed["trial_number"], [values.max() if mode == "min" else values.min()] * len(failed),
                     marker="x", color="grey", label="failed")
    if mode == "min" and (values > 0).all() and values.max() / max(values.min(), 1e-12) > 20:
        axes.set_yscale("log")
    axes.set_xlabel("trial number")
    axes.set_ylabel(metric)
    axes.set_title(f"Convergence: best {metric} ({mode}) over {len(frame)} trials")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()

    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_report(
    frame: pd.DataFrame,
    config: Any,
    path: Path,
    *,
    best_trial: str,
    wall_seconds: float,
    model_path: Path,
    data_summary: dict[str, Any],
    test_scores: dict[str, Any] | None = None,
    top: int = 5,
    resumed: bool = False,
) -> Path:
    """Write report.md: the experiment, the best trials, failed trials and why, time spent.

    With `resumed`, `wall_seconds` covers only the command that resumed the
    run, and the report states it. When the search space has fewer
    configurations than `num_trials`, the report gives the reason the search ended
    early.
    """
    metric, mode = config.search.metric, config.search.mode
    parameters = list(config.search.space)
    completed = frame[frame["status"] == STATUS_COMPLETED].dropna(subset=[f"best_{metric}"])
    ranked = completed.sort_values(f"best_{metric}", ascending=(mode == "min")).head(top)
    failed = frame[frame["status"] != STATUS_COMPLETED]

    lines = [
        f"# Experiment `{config.name}`",
        "",
        f"Finished {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{len(frame)} trials ({len(completed)} completed, {len(failed)} failed) in {wall_seconds:.0f} s"
        f"{' since the resume' if resumed else ''}.",
        "",
        "## Set-up",
        "",
        f"- Dataset: `{config.dataset.name}`, classes {data_summary['classes']}, "
        f"{data_summary['train_images']} training and {data_summary['validation_images']} validation images",
        f"- Backbone: `{config.backbone.label}` ({data_summary['backbone_description']}), image size {config.backbone.image_size}, "
        f"embeddings of {data_summary['embedding_size']} floats computed in {data_summary['embedding_precision']} "
        f"({'from the cache' if data_summary['embedding_cache_hit'] else 'in this run'})",
        f"- Search: Gaussian process with `{config.search.acquisition}`, {config.search.initial_points} initial space-filling random points (Latin hypercube), "
        f"metric `{metric}` ({mode}), at most {config.search.max_concurrent} trials at a time, seed {config.search.seed}",
        *_space_size_lines(config.search),
        f"- Training: at most {config.training.max_epochs} epochs, early stop after {config.training.patience} epochs "
        f"without improvement; scheduler `{config.scheduler.name}`",
        "",
        "## Best trial",
        "",
        f"Trial {best_trial}; the model is `{model_path.name}` beside this report.",
        "",
        *_test_lines(test_scores, model_path.name),
        "## Top trials",
        "",
        _markdown_table(ranked, ["trial_number", "trial_id", *parameters, "best_epoch", *(f"best_{name}" for name in REPORTED_METRICS), "epochs_run"]),
        "",
        "## Failed trials",
        "",
    ]
    if failed.empty:
        lines.append("None.")
    else:
        lines.append(_markdown_table(failed, ["trial_number", "trial_id", *parameters, "epochs_run", "error"]))
    lines += [
        "",
        "## Time",
        "",
        f"- Resumed run, from the resume on: {wall_seconds:.1f} s (the time before the interruption is not counted)"
        if resumed else f"- Whole run: {wall_seconds:.1f} s",
        f"- Trial wall time: median {completed['wall_seconds'].median():.1f} s, total {frame['wall_seconds'].sum():.1f} s",
        f"- Trial start-up (worker start to first epoch): median {completed['startup_seconds'].median():.1f} s",
        "",
    ]

    temporary = path.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, path)
    return path


def _space_size_lines(search: Any) -> list[str]:
    """Return the set-up line that explains a run shorter than `num_trials` because the space ran out, if it did."""
    size = search.distinct_configurations
    if size is None or size >= search.num_trials:
        return []
    return [f"- The search space has {size} distinct configurations, fewer than `num_trials` ({search.num_trials}), so the search ended once each had been tried"]


def _test_lines(test_scores: dict[str, Any] | None, model_name: str) -> list[str]:
    if test_scores is None:
        return ["The dataset has no held-out test split, so the model was not scored on test images.", ""]
    lines = [
        f"On {test_scores['images']} held-out test images, which took no part in training or in choosing the best trial, "
        f"`{model_name}` reached test accuracy {test_scores['accuracy']:.4f} (test loss {test_scores['loss']:.4f}).",
        "",
        "| class | test accuracy |",
        "|---|---|",
    ]
    lines += [f"| {name} | {accuracy:.4f} |" for name, accuracy in test_scores["accuracy_per_class"].items()]
    return [*lines, ""]


def _markdown_table(frame: pd.DataFrame, columns: list[str]) -> str:
    columns = [column for column in columns if column in frame.columns]
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_format_cell(row[column]) for column in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join([header, rule, *body])


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
