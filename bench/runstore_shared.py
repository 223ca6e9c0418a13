"""Writers on one run store at once: what the PostgreSQL store's one writer lock costs.

    .venv/bin/python bench/runstore_shared.py [--writers 1 2 4] [--calls 300] [--events 20]

Each writer is a store of its own (as each controller sharing a database has), on a thread,
appending `--events` events (~300 bytes each, like a playbook's results) to a run of its own
`--calls` times, all writers started together. Per writer count, reported: write calls per
second in all, and the median and 99th percentile of one call. PostgreSQL: a fresh database of
a throwaway server on this machine (tests/support/postgres.py, loopback TCP); SQLite (one file,
its own lock) beside it for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.runstore import RunLimits, open_store  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.unit.test_runstore import make_run  # noqa: E402

LIMITS = RunLimits(max_bytes=1 << 40, max_bytes_per_user=1 << 40, max_running_per_user=1000)


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix=f"marcotest-{this_run().tag}-pg-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def events(count: int, call: int) -> list[dict[str, Any]]:
    return [{"type": "host_result", "task_id": f"t{call}", "host": f"web{n:03d}",
             "status": "ok", "msg": "x" * 200, "duration": 0.25} for n in range(count)]


def measure(database: Path | str, writers: int, calls: int, count: int) -> tuple[float, list[float]]:
    """Calls per second in all and each call's seconds, `writers` stores at once (each opened
    on its writer's thread: a SQLite connection stays on its thread)."""
    start = threading.Barrier(writers + 1)
    times: list[list[float]] = [[] for _ in range(writers)]

    def write(n: int) -> None:
        store = open_store(database, LIMITS, busy_timeout=60)
        run = make_run(owner=f"user{n}")
        store.create(run)
        start.wait()
        for call in range(calls):
            began = time.perf_counter()
            store.append_events(run.owner, run.id, events(count, call))
            times[n].append(time.perf_counter() - began)
        store.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return writers * calls / elapsed, [t for each in times for t in each]


def report(name: str, database: Path | str, writers: int, calls: int, count: int) -> None:
    rate, times = measure(database, writers, calls, count)
    times.sort()
    print(f"{name:10} writers {writers}: {rate:7.0f} calls/s in all, one call "
          f"p50 {statistics.median(times) * 1000:.2f} ms, "
          f"p99 {times[int(len(times) * 0.99) - 1] * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    print(f"append_events of {args.events} events, {args.calls} calls per writer")
    with postgres() as server:
        for writers in args.writers:
            report("postgresql", server.url(server.create_database()), writers, args.calls,
                   args.events)
    for writers in args.writers:
        with tempfile.TemporaryDirectory() as tmp:
            report("sqlite", Path(tmp) / "runs.sqlite3", writers, args.calls, args.events)


if __name__ == "__main__":
    main()
