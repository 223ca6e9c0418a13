"""Run store output: appending a page and reading a page of a 1,000,000-line execution.

    .venv/bin/python bench/runstore_output.py [--lines 1000000] [--chunk 20000] [--repeat 20]
        [--store sqlite|postgres]

One execution of `--lines` lines (events of 100 lines, each line ~60 characters with a
counter, like a build log) is stored through the store's `add_output` in pages of `--chunk`
lines (one chunk each), on a real SQLite file in a temp dir (`--store sqlite`, the default) or
in a fresh database of a throwaway PostgreSQL server on this machine (`--store postgres`:
Debian's server, started as tests/support/postgres.py does, over loopback TCP; as root it runs
as the `postgres` user). Reported (medians):

- add_output of one `--chunk`-line page (the 50 appends of the default, each a transaction
  with its compression, charge and commit);
- output_page of the last 1,000 lines (999,000..999,999 by default) and of the first 1,000,
  the store kept open (its file in the page cache, as on a busy controller);
- against the same run's baseline, the store before chunks: the whole execution as one
  compressed blob (what `outputs` decoded), decoded in full and sliced to the same lines;
- the bytes stored per 1,000,000 lines.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.runstore import RunLimits, SqlRunStore, open_store  # noqa: E402
from controller.runstore.chunks import decode, encode  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.unit.test_runstore import make_run  # noqa: E402

PER_EVENT = 100


def page_events(first: int, count: int) -> list[dict[str, Any]]:
    """Agent output events for lines first .. first+count-1."""
    events = []
    for seq in range(first, first + count, PER_EVENT):
        end = min(seq + PER_EVENT, first + count)
        events.append({"type": "output", "id": "e1", "seq": seq, "time": 1.7e9 + seq / 1000,
                       "stream": "stdout",
                       "lines": [f"[{n:07d}] compiling module_{n % 997}.c -> build/obj_{n}.o ok"
                                 for n in range(seq, end)]})
    return events


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.2f} ms (min {min(seconds) * 1000:.2f})"


@contextlib.contextmanager
def database(kind: str) -> Iterator[Path | str]:
    """A SQLite file in a temp dir, or a database of a throwaway PostgreSQL server."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp) / "runs.sqlite3"
        return
    server = PostgresServer(Path(tempfile.mkdtemp(prefix=f"marcotest-{this_run().tag}-pg-")))
    try:
        server.start()
        yield server.url(server.create_database())
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    with database(args.store) as where:
        store: SqlRunStore = open_store(where, RunLimits(max_bytes=1 << 40,
                                                         max_bytes_per_user=1 << 40))
        run = make_run()
        store.create(run)
        adds = []
        for first in range(0, args.lines, args.chunk):
            events = page_events(first, min(args.chunk, args.lines - first))
            start = time.perf_counter()
            record = store.add_output("alice", run.id, host="h", node="n", execution_id="e1",
                                      task_id=None, events=events)
            adds.append(time.perf_counter() - start)
        since = args.lines - 1000
        reads = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            page, end = store.output_page("alice", run.id, "e1", since, 1000)
            reads.append(time.perf_counter() - start)
        assert end == args.lines and page[0]["seq"] == since
        first_page = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            store.output_page("alice", run.id, "e1", 0, 1000)
            first_page.append(time.perf_counter() - start)
        store.close()

    blob = encode(page_events(0, args.lines))
    whole = []
    for _ in range(max(3, args.repeat // 4)):
        start = time.perf_counter()
        lines = [line for event in decode(blob) for line in event["lines"]][since:]
        whole.append(time.perf_counter() - start)
    assert len(lines) == 1000

    print(f"store: {args.store}")
    print(f"execution: {args.lines} lines in {len(adds)} chunks of {args.chunk}; "
          f"stored {record.bytes} bytes ({record.bytes / args.lines * 1e6 / 2**20:.1f} MiB "
          f"per 1,000,000 lines)")
    print(f"add_output of a {args.chunk}-line page:        {ms(adds)}")
    print(f"output_page lines {since}..{args.lines - 1}:  {ms(reads)}")
    print(f"output_page lines 0..999:              {ms(first_page)}")
    print(f"baseline, one blob decoded and sliced: {ms(whole)} "
          f"({statistics.median(whole) / statistics.median(reads):.0f}x the page)")


if __name__ == "__main__":
    main()
