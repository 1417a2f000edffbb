"""Run a command and sample the memory and CPU time of its whole process tree (Linux /proc)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_SECONDS = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeRun:
    """Outcome of one command: exit code, output, wall time, CPU time and memory peaks in MB."""

    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    peak_pss_mb: float
    peak_processes: int
    # (Unix time, CPU seconds of the tree so far) at every sample.
    cpu_timeline: list[tuple[float, float]] = field(default_factory=list)

    def cpu_between(self, start: float, end: float) -> float:
        """Return the tree's CPU seconds between two Unix times, interpolated linearly between samples."""
        times = [moment for moment, _ in self.cpu_timeline]
        totals = [total for _, total in self.cpu_timeline]
        return float(np.interp(end, times, totals) - np.interp(start, times, totals))


def run_sampled(command: list[str], env: dict[str, str], cwd: Path | None = None) -> TreeRun:
    """Run `command` to its end while a thread sums the memory of the process and its descendants.

    Every SAMPLE_SECONDS the thread adds up VmRSS and Pss over the process tree
    and keeps the largest sums. VmRSS counts a page shared by several
    processes (Ray's object store, shared libraries) once per process, so its
    sum overstates the tree's memory. Pss divides each shared page among the
    processes that map it, so its sum is the tree's share of physical memory.
    CPU time is the user and system time of each process at its last sample,
    summed over the tree. A process that starts and ends between two samples
    is missed, and so is the last sampling interval of a process that ends, so
    both figures are lower bounds.
    """
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"rss_kb": 0, "pss_kb": 0, "processes": 0}
    cpu_ticks: dict[int, int] = {}
    cpu_timeline: list[tuple[float, float]] = []
    finished = threading.Event()

    def sample() -> None:
        while not finished.wait(SAMPLE_SECONDS):
            pids = [process.pid, *descendants(process.pid)]
            rss = sum(_status_kb(pid, "VmRSS") for pid in pids)
            pss = sum(_smaps_rollup_kb(pid, "Pss") for pid in pids)
            peaks["rss_kb"] = max(peaks["rss_kb"], rss)
            peaks["pss_kb"] = max(peaks["pss_kb"], pss)
            peaks["processes"] = max(peaks["processes"], len(pids))
            for pid in pids:
                cpu_ticks[pid] = max(cpu_ticks.get(pid, 0), _cpu_ticks(pid))
            cpu_timeline.append((time.time(), sum(cpu_ticks.values()) / CLOCK_TICKS))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    finished.set()
    sampler.join()
    return TreeRun(
        returncode=process.returncode, stdout=stdout, stderr=stderr, wall_seconds=time.monotonic() - started,
        cpu_seconds=sum(cpu_ticks.values()) / CLOCK_TICKS,
        peak_rss_mb=peaks["rss_kb"] / 1024, peak_pss_mb=peaks["pss_kb"] / 1024, peak_processes=peaks["processes"],
        cpu_timeline=cpu_timeline,
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
        parent = int(_stat_fields(stat)[1])
        children.setdefault(parent, []).append(int(entry.name))

    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _stat_fields(stat: str) -> list[str]:
    # The command name in brackets may contain spaces, so the fields after it are split from its end.
    # The list starts at field 3 of proc(5): state, ppid, ...
    return stat.rsplit(")", 1)[1].split()


def _cpu_ticks(pid: int) -> int:
    try:
        fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0
    # utime and stime are fields 14 and 15 of proc(5), so 11 and 12 here.
    return int(fields[11]) + int(fields[12])


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
