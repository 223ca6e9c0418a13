"""CPU cost of a status snapshot: StatusSampler (psutil) vs the ancestor's shell pipelines.

Usage (from the repo root): ``python3 bench/status_cost.py [--snapshots 60] [--rounds 5]``

Both methods run in the same process, interleaved round by round; each round takes `--snapshots`
snapshots back to back (no sleeping) and measures CPU time, not wall time: this process's user +
system time plus that of its reaped children (``resource.getrusage``), so the shells and tools the
ancestor spawned are counted. The median round of each method is reported.

StatusSampler keeps some parts cached for seconds (see agent/status.py); to charge those caches
as at 1 Hz, the sampler's clock is simulated: it advances one second per snapshot. Two more rows:
every cache disabled (all TTLs 0) as a worst case, and the portable path that reads each
process's CPU time with psutil.Process.cpu_times() instead of /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from agent.status import StatusSampler  # noqa: E402

#: What the ancestor ran every second, one shell pipeline each (via subprocess, shell=True).
ANCESTOR_PIPELINES = [
    "hostname",
    "uname -r",
    "grep PRETTY_NAME /etc/os-release | cut -d= -f2",
    "cat /proc/uptime",
    "cat /proc/loadavg",
    "nproc",
    "top -bn1 | head -5",
    "grep '^cpu[0-9]' /proc/stat",
    "free -b | awk '/Mem:/ {print $2, $3, $4, $6, $7}'",
    "free -b | awk '/Swap:/ {print $2, $3}'",
    "grep -E '^(Buffers|Cached):' /proc/meminfo",
    "cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null || true",
    "df -h / | tail -1",
    "ip -o addr show | awk '{print $2, $4}'",
    "ifconfig 2>/dev/null | grep 'inet ' || true",
    "ip -s link | grep -A1 'RX:' | tail -1",
    "ip -s link | grep -A1 'TX:' | tail -1",
    "grep -v lo: /proc/net/dev | tail -n +3",
    "ps aux --sort=-%cpu | head -11",
    "uptime",
]


SAMPLER = "StatusSampler (as configured, caches as at 1 Hz)"


def ancestor_snapshot() -> dict[str, str]:
    """One status snapshot the ancestor's way: one subprocess per pipeline."""
    return {cmd: subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout
            for cmd in ANCESTOR_PIPELINES}


class SimulatedClock:
    """A monotonic clock the benchmark advances by hand (one second per snapshot)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sampler_method(cached: bool = True, fast_procfs: bool = True) -> Callable[[], object]:
    """A primed StatusSampler whose clock advances one second per snapshot."""
    sampler = StatusSampler("bench")
    clock = SimulatedClock()
    sampler.clock = clock  # type: ignore[method-assign]
    sampler.fast_procfs = fast_procfs
    if not cached:
        sampler.static_ttl = sampler.temperature_ttl = sampler.details_ttl = 0.0
    sampler.snapshot()  # the agent's sampler is long-lived: priming is not a per-second cost

    def take() -> object:
        clock.now += 1.0
        return sampler.snapshot()
    return take


def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(take: Callable[[], object], snapshots: int) -> float:
    """CPU seconds for `snapshots` calls of `take`, back to back."""
    start = cpu_seconds()
    for _ in range(snapshots):
        take()
    return cpu_seconds() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=60, help="snapshots per round (60)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per method (5)")
    args = parser.parse_args(argv)

    methods: dict[str, Callable[[], Callable[[], object]]] = {
        f"ancestor: {len(ANCESTOR_PIPELINES)} shell pipelines": lambda: ancestor_snapshot,
        SAMPLER: sampler_method,
        "StatusSampler, no caches (worst case)": lambda: sampler_method(cached=False),
        "StatusSampler, psutil cpu_times() per process": lambda: sampler_method(fast_procfs=False),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, make in methods.items():
            results[name].append(measure(make(), args.snapshots))

    n = args.snapshots
    medians = {name: statistics.median(values) for name, values in results.items()}
    baseline = medians[next(iter(medians))]
    print(f"Machine: {os.cpu_count()} cores, {len(psutil.pids())} processes, "
          f"Python {sys.version.split()[0]}, psutil {psutil.__version__}; "
          f"median of {args.rounds} rounds of {n} snapshots\n")
    print(f"| method | CPU s per {n} snapshots | ms per snapshot | % of a core at 1 Hz "
          "| ratio (ancestor / method) |")
    print("|---|---:|---:|---:|---:|")
    for name, cpu in medians.items():
        per = cpu / n
        ratio = baseline / cpu if cpu > 0 else float("inf")
        print(f"| {name} | {cpu:.4f} | {per * 1000:.2f} | {per * 100:.3f} % | {ratio:.0f}× |")
    best = medians[SAMPLER] / n * 1000
    print(f"\nTarget <= 2 ms CPU per snapshot (0.2 % of a core at 1 Hz): "
          f"{'met' if best <= 2.0 else 'missed'} ({best:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
