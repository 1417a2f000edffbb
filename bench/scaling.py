"""Run the 30-trial quickstart with 1 and with 2 trials at a time and compare wall time, CPU use and per-trial overhead.

Each setting runs `frozen-tune run` in a fresh process on a copy of
examples/quickstart.yaml that differs only in `search.max_concurrent`, with
the backbone and embeddings already cached (a warm-up run fills the cache
first). The settings alternate over `--repeats` rounds, so machine noise hits
both. CPU use is the busy share of all cores from /proc/stat over the run.
Per-trial overhead, from results.csv:

- start-up: from the trial's start to its first epoch (`startup_seconds`);
- gap: from the end of the trial that freed a slot to the start of the next
  trial in it (for each trial, its `started_at` minus the latest `ended_at`
  of the trials that ended before it started).

    python bench/scaling.py [--repeats 1]

Start Ray only where it cannot reach other hosts (see README: offline runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
QUICKSTART = REPOSITORY / "examples" / "quickstart.yaml"


def cpu_times() -> tuple[float, float]:
    """Return (busy, total) jiffies of all cores from the first line of /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_quickstart(folder: Path, concurrency: int, name: str, num_trials: int) -> dict:
    experiment = yaml.safe_load(QUICKSTART.read_text())
    experiment["search"]["max_concurrent"] = concurrency
    experiment["search"]["num_trials"] = num_trials
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment))

    busy_before, total_before = cpu_times()
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "tuning", "run", str(path), "--storage", str(folder / "runs"), "--name", name],
        capture_output=True, text=True, env=dict(os.environ),
    )
    wall = time.monotonic() - started
    busy_after, total_after = cpu_times()
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"{name} failed with exit code {completed.returncode}")

    frame = pd.read_csv(folder / "runs" / name / "results.csv")
    done = frame[frame["status"] == "TERMINATED"]
    training = done["ended_at"] - done["started_at"] - done["startup_seconds"]
    return {
        "max_concurrent": concurrency,
        "wall_seconds": round(wall, 1),
        "cpu_utilisation": round((busy_after - busy_before) / (total_after - total_before), 3),
        "trials": len(frame),
        "failed_trials": int(len(frame) - len(done)),
        "median_startup_seconds": round(float(done["startup_seconds"].median()), 3),
        "median_gap_seconds": round(float(np.median(gaps)), 3) if (gaps := slot_gaps(frame)) else None,
        "median_training_seconds": round(float(training.median()), 2),
        "total_epochs": int(done["epochs_run"].sum()),
        "best_val_loss": round(float(done["best_val_loss"].min()), 4),
    }


def slot_gaps(frame: pd.DataFrame) -> list[float]:
    """For each trial after the first ones, the time from the latest earlier trial end to its start."""
    gaps = []
    ordered = frame.sort_values("started_at")
    for _, trial in ordered.iterrows():
        ended_before = frame.loc[frame["ended_at"] <= trial["started_at"], "ended_at"]
        if not ended_before.empty:
            gaps.append(float(trial["started_at"] - ended_before.max()))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of (1 at a time, 2 at a time), alternating.")
    parser.add_argument("--num-trials", type=int, default=30, help="Trials per run.")
    parser.add_argument("--output", default=str(REPOSITORY / "bench" / "scaling.json"), help="JSON file for the results.")
    arguments = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="frozen-tune-scaling-"))
    run_quickstart(folder, 2, "warm-up", 2)
    runs = []
    for repeat in range(arguments.repeats):
        for concurrency in (1, 2):
            result = run_quickstart(folder, concurrency, f"c{concurrency}-r{repeat}", arguments.num_trials)
            print(json.dumps(result), flush=True)
            runs.append(result)

    summary = {}
    for concurrency in (1, 2):
        walls = [run["wall_seconds"] for run in runs if run["max_concurrent"] == concurrency]
        summary[f"median_wall_seconds_{concurrency}"] = float(np.median(walls))
    summary["time_ratio_2_over_1"] = round(summary["median_wall_seconds_2"] / summary["median_wall_seconds_1"], 3)
    Path(arguments.output).write_text(json.dumps({"runs": runs, "summary": summary, "cpus": os.cpu_count()}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
