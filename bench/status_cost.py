"""CPU cost of one status snapshot with 30, 300 and 1,000 processes: before and after (issue 15).

Usage (as root, from the repo root, under the tests' lock since it loads the machine)::

    flock /tmp/marco-tests.lock .venv/bin/python bench/status_cost.py [--processes 30 300 1000]
        [--base 2e027ef] [--snapshots 100] [--rounds 7] [--busy 3]

Compared in the same run: `StatusSampler` as it was at `--base` (its agent/status.py, read with
``git show`` and imported under another name) and as it is in this checkout, with its default
`process_refresh` and with ``process_refresh = 0`` (every process read at every snapshot, as
before: shows what the incremental reading brings apart from the rest of the code).

The node's process count is made exact: the benchmark re-runs itself in a new PID namespace
(``unshare --pid --fork --mount-proc``), where /proc lists only its own processes, and starts
idle ``sleep`` processes until the namespace holds N processes (the benchmark itself and
`--busy` light-busy ones included: each spins about 2 ms every 100 ms, so the top list moves).
``--no-namespace`` measures the whole node instead (rows below its process count are skipped).

Each sampler is long-lived, as the agent's is (primed, then 5 snapshots of warm-up): its clock
is simulated and advances one second per snapshot, so its caches and the turns in which idle
processes are read are charged as at 1 Hz, while snapshots run back to back. CPU is this
process's own (``time.process_time()``); rounds alternate between the samplers and the median
round is reported, with the ratio of the medians (base / method).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.status import StatusSampler  # noqa: E402

#: Inside the PID namespace: the spinning loop of a light-busy process (about 2 % of a core).
BUSY_LOOP = ("import time\n"
             "while True:\n"
             "    end = time.perf_counter() + 0.002\n"
             "    while time.perf_counter() < end: pass\n"
             "    time.sleep(0.1)\n")
INSIDE = "MARCO_STATUS_BENCH_INSIDE"


class SimulatedClock:
    """A monotonic clock the benchmark advances by hand (one second per snapshot)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Method:
    """One long-lived sampler under test and the CPU seconds of each of its rounds."""

    def __init__(self, name: str, sampler: Any) -> None:
        self.name = name
        self.sampler = sampler
        self.clock = SimulatedClock()
        sampler.clock = self.clock
        self.rounds: list[float] = []

    def warm(self, snapshots: int = 5) -> None:
        """Prime, then a few snapshots: the agent's sampler is long-lived."""
        self.sampler.prime()
        self.take(snapshots)

    def take(self, snapshots: int) -> None:
        for _ in range(snapshots):
            self.clock.now += 1.0
            self.sampler.snapshot()

    def measure(self, snapshots: int) -> None:
        """One round: CPU seconds per snapshot over `snapshots` snapshots back to back."""
        start = time.process_time()
        self.take(snapshots)
        self.rounds.append((time.process_time() - start) / snapshots)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def load_base_module(commit: str) -> ModuleType:
    """agent/status.py as it was at `commit`, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:agent/status.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="status-base-")) / "status_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("status_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def process_count() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


class Population:
    """The processes the benchmark starts to reach a process count: idle and light-busy."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start_busy(self, count: int) -> None:
        for _ in range(count):
            self.children.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]))

    def fill_to(self, total: int) -> int:
        """Start `sleep` processes until /proc lists `total` (returns the count reached)."""
        for _ in range(max(0, total - process_count())):
            self.children.append(subprocess.Popen(["sleep", "3600"]))
        return process_count()

    def stop(self) -> None:
        for child in self.children:
            child.kill()
        for child in self.children:
            child.wait()


def methods(base: ModuleType, commit: str) -> list[Method]:
    """The samplers compared: the base commit's, this checkout's, this one reading everything."""
    full = StatusSampler("bench")
    full.process_refresh = 0.0
    current = StatusSampler("bench")
    return [Method(f"{commit} (base)", base.StatusSampler("bench")),
            Method(f"now, process_refresh={current.process_refresh:g} s (default)", current),
            Method("now, process_refresh=0 (every process every snapshot)", full)]


def measure_row(base: ModuleType, commit: str, snapshots: int, rounds: int) -> list[Method]:
    compared = methods(base, commit)
    for method in compared:
        method.warm()
    for index in range(rounds):
        # Alternate the order so drift and cache effects hit every method alike.
        for method in compared if index % 2 == 0 else list(reversed(compared)):
            method.measure(snapshots)
    return compared


def print_table(rows: list[tuple[int, list[Method]]], snapshots: int, rounds: int) -> None:
    print(f"| processes | method | ms CPU per snapshot (median of {rounds} rounds of "
          f"{snapshots}) | min–max round | ratio (base / method) |")
    print("|---:|---|---:|---:|---:|")
    for count, compared in rows:
        base = compared[0].median
        for method in compared:
            spread = f"{min(method.rounds) * 1e3:.3f}–{max(method.rounds) * 1e3:.3f}"
            print(f"| {count} | {method.name} | {method.median * 1e3:.3f} | {spread} | "
                  f"{base / method.median:.2f}× |")


def run_inside(args: argparse.Namespace) -> int:
    """The measurement proper (in the PID namespace unless --no-namespace)."""
    base = load_base_module(args.base)
    population = Population()
    rows: list[tuple[int, list[Method]]] = []
    try:
        population.start_busy(args.busy)
        for wanted in sorted(args.processes):
            reached = population.fill_to(wanted)
            if reached > wanted:
                print(f"skipping {wanted} processes: the node already has {reached}",
                      file=sys.stderr)
                continue
            rows.append((reached, measure_row(base, args.base, args.snapshots, args.rounds)))
    finally:
        population.stop()
    print(f"Machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{'own PID namespace' if os.environ.get(INSIDE) else 'whole node'}, "
          f"{args.busy} light-busy processes among the N\n")
    print_table(rows, args.snapshots, args.rounds)
    return 0


def run_in_namespace(argv: list[str]) -> int:
    """Re-run this script in a new PID namespace with its own /proc (needs root)."""
    env = dict(os.environ, **{INSIDE: "1"})
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
               str(Path(__file__).resolve()), *argv]
    return subprocess.run(command, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[30, 300, 1000],
                        help="process counts, one row each (30 300 1000)")
    parser.add_argument("--base", default="2e027ef", help="commit to compare with (2e027ef)")
    parser.add_argument("--snapshots", type=int, default=100, help="snapshots per round (100)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per method (7)")
    parser.add_argument("--busy", type=int, default=3, help="light-busy processes (3)")
    parser.add_argument("--no-namespace", action="store_true",
                        help="measure the whole node instead of a PID namespace")
    args = parser.parse_args(argv)
    if args.no_namespace or os.environ.get(INSIDE):
        return run_inside(args)
    if os.geteuid() != 0:
        parser.error("a PID namespace needs root: run as root or pass --no-namespace")
    return run_in_namespace(argv)


if __name__ == "__main__":
    sys.exit(main())
