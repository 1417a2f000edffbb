"""Run a command and sample the memory of its whole process tree (Linux /proc)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class TreeRun:
    """Outcome of one command: exit code, output, wall time and memory peaks in MB."""

    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_rss_mb: float
    peak_pss_mb: float
    peak_processes: int


def run_sampled(command: list[str], env: dict[str, str], cwd: Path | None = None) -> TreeRun:
    """Run `command` to its end while a thread sums the memory of the process and its descendants.

    Every SAMPLE_SECONDS the thread adds up VmRSS and Pss over the process tree
    and keeps the largest sums. VmRSS counts a page shared by several
    processes (Ray's object store, shared libraries) once per process, so its
    sum overstates the tree's memory. Pss divides each shared page among the
    processes that map it, so its sum is the tree's share of physical memory.
    A process that starts and ends between two samples is missed.
    """
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"rss_kb": 0, "pss_kb": 0, "processes": 0}
    finished = threading.Event()

    def sample() -> None:
        while not finished.wait(SAMPLE_SECONDS):
            pids = [process.pid, *descendants(process.pid)]
            rss = sum(_status_kb(pid, "VmRSS") for pid in pids)
            pss = sum(_smaps_rollup_kb(pid, "Pss") for pid in pids)
            peaks["rss_kb"] = max(peaks["rss_kb"], rss)
            peaks["pss_kb"] = max(peaks["pss_kb"], pss)
            peaks["processes"] = max(peaks["processes"], len(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    finished.set()
    sampler.join()
    return TreeRun(
        returncode=process.returncode, stdout=stdout, stderr=stderr, wall_seconds=time.monotonic() - started,
        peak_rss_mb=peaks["rss_kb"] / 1024, peak_pss_mb=peaks["pss_kb"] / 1024, peak_processes=peaks["processes"],
    )


def descendants(root: int) -> list[int]:
    """List the ids of every live descendant of process `root`, from the parent ids in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so the fields after it are split from its end.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))

    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _status_kb(pid: int, field: str) -> int:
    return _field_kb(Path(f"/proc/{pid}/status"), field)


def _smaps_rollup_kb(pid: int, field: str) -> int:
    return _field_kb(Path(f"/proc/{pid}/smaps_rollup"), field)


def _field_kb(path: Path, field: str) -> int:
    # A process may end between listing and reading; it then counts as 0.
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0])
    return 0
