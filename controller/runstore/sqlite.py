"""SqliteRunStore: the embedded run store, one SQLite file under the state dir (WAL, mode 0600,
schema versions applied in order at open). Every method checks the owner: another user's run is
exactly like a missing one. Stored bytes (a run's row, its events and its compressed output) are
charged to the run and the caps kept by pruning (budget.py; the store keeps the per-owner sums
in memory: one process owns the file).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from marco.errors import BadRequest, Conflict, InsufficientStorage, NotFound, TooManyRuns
from marco.runs import KINDS, RUN_ID

from .budget import Budget
from .records import (
    DEFAULT_LIMITS,
    MAX_EVENTS_PER_CALL,
    MAX_LIST,
    MAX_TITLE,
    Run,
    RunLimits,
    StoredOutput,
    check_hosts,
    check_output,
    check_run,
    check_stats,
    check_status,
    decode_output,
    event_row,
    is_time,
    json_text,
    row_bytes,
    run_from_row,
)
from .schema import open_database

SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"


class SqliteRunStore:
    """The embedded run store: one SQLite file (use it from one thread: see RunStoreThread)."""

    def __init__(self, path: Path, limits: RunLimits = DEFAULT_LIMITS) -> None:
        self.path, self.limits = path, limits
        self._db = open_database(path)
        self._db.row_factory = sqlite3.Row
        self._budget = Budget(self._db, limits)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing (a full disk is InsufficientStorage)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as error:
            self._budget.forget()
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error) and error.sqlite_errorcode == SQLITE_FULL:
                raise InsufficientStorage("the controller's disk is full") from error
            raise

    def _row(self, owner: str, run_id: str) -> sqlite3.Row | None:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            return None
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM runs WHERE id = ? AND owner = ?", (run_id, owner)).fetchone()
        return row

    def _existing(self, owner: str, run_id: str) -> sqlite3.Row:
        row = self._row(owner, run_id)
        if row is None:
            raise NotFound(f"no run {run_id}")
        return row

    # Runs

    def create(self, run: Run) -> None:
        """Record a new run; TooManyRuns (429) when its owner has too many running, and
        the owner's oldest ended runs go when they have `max_per_user` runs."""
        check_run(run)
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM runs WHERE owner = ? AND ended IS NULL",
                                 (run.owner,)).fetchone()[0]
            if run.ended is None and running >= self.limits.max_running_per_user:
                raise TooManyRuns(
                    f"{run.owner} has {running} runs running (at most "
                    f"{self.limits.max_running_per_user})",
                    hint="wait for one to end")
            total = db.execute("SELECT COUNT(*) FROM runs WHERE owner = ?",
                               (run.owner,)).fetchone()[0]
            if total >= self.limits.max_per_user:
                excess = total - self.limits.max_per_user + 1
                if self._budget.drop_oldest_ended(run.owner, excess) < excess:
                    raise TooManyRuns(f"{run.owner} has {total} runs, none ended",
                                      hint="end a run first")
            try:
                db.execute(
                    "INSERT INTO runs (id, owner, kind, title, hosts, started, ended, status,"
                    " stats, meta, last_activity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.id, run.owner, run.kind, run.title, json_text(run.hosts),
                     float(run.started), run.ended, run.status, json_text(run.stats),
                     json_text(run.meta), float(run.started)))
            except sqlite3.IntegrityError as error:
                raise Conflict(f"run {run.id} already exists") from error
            self._budget.charge(run.owner, run.id, row_bytes(run))

    def get(self, owner: str, run_id: str) -> Run | None:
        """The run, or None (also for another owner's run)."""
        row = self._row(owner, run_id)
        return None if row is None else run_from_row(row)

    def list(self, owner: str, kind: str | None = None, status: str | None = None,
             text: str | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[Run], bool]:
        """The owner's runs, newest first (by id), and whether there are more: `before` is the
        last id of the previous page; `text` matches the title, ignoring ASCII case."""
        where, args = ["owner = ?"], [owner]
        if kind is not None:
            if kind not in KINDS:
                raise BadRequest(f"kind must be one of {', '.join(sorted(KINDS))}")
            where.append("kind = ?")
            args.append(kind)
        if status is not None:
            where.append("status = ?")
            args.append(check_status(status))
        if text:
            if len(text) > MAX_TITLE:
                raise BadRequest(f"the text to match is longer than {MAX_TITLE} characters")
            where.append("instr(lower(title), lower(?)) > 0")  # no LIKE: no wildcards to escape
            args.append(text)
        if before is not None:
            if not isinstance(before, str) or not RUN_ID.fullmatch(before):
                raise BadRequest("before must be a run id")
            where.append("id < ?")
            args.append(before)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIST:
            raise BadRequest(f"limit must be 1 to {MAX_LIST}")
        rows = self._db.execute(
            f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*args, limit + 1)).fetchall()
        return [run_from_row(row) for row in rows[:limit]], len(rows) > limit

    def update(self, owner: str, run_id: str, *, hosts: builtins.list[str] | None = None,
               status: str | None = None, ended: float | None = None,
               stats: dict[str, dict[str, int]] | None = None) -> Run:
        """Change what is given and return the run. A final status without `ended` ends the
        run now; an ended run cannot be `running`, and ending a run that has ended already is
        a Conflict (checked in the same transaction: of two racing ends, one wins)."""
        hosts = None if hosts is None else check_hosts(hosts)
        stats = None if stats is None else check_stats(stats)
        status = None if status is None else check_status(status)
        if ended is not None and not is_time(ended):
            raise BadRequest("ended must be a number (Unix time)")
        with self._transaction():
            run = run_from_row(self._existing(owner, run_id))
            if run.ended is not None and (status is not None or ended is not None):
                raise Conflict(f"run {run_id} has ended already")
            size_before = row_bytes(run)
            if hosts is not None:
                run.hosts = hosts
            if stats is not None:
                run.stats = stats
            if status is not None:
                run.status = status
            if ended is not None:
                run.ended = float(ended)
            if run.status != "running" and run.ended is None:
                run.ended = time.time()
            if run.status == "running" and run.ended is not None:
                raise BadRequest("an ended run needs a final status")
            self._db.execute(
                "UPDATE runs SET hosts = ?, status = ?, ended = ?, stats = ? WHERE id = ?",
                (json_text(run.hosts), run.status, run.ended, json_text(run.stats), run_id))
            self._budget.charge(owner, run_id, row_bytes(run) - size_before)
        return run

    def interrupt_running(self, now: float | None = None) -> int:
        """At start-up: the runs a previous process left running end as `interrupted`."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? "
                                "WHERE ended IS NULL", (time.time() if now is None else now,))
            return cursor.rowcount

    def interrupt_stale(self, before: float, now: float | None = None) -> int:
        """Running runs with no activity (start or events) since `before` end as
        `interrupted`: their client is gone (docs/runs.md "Stale runs")."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? WHERE "
                                "ended IS NULL AND COALESCE(last_activity, started) < ?",
                                (time.time() if now is None else now, before))
            return cursor.rowcount

    # Events

    def append_events(self, owner: str, run_id: str, events: builtins.list[dict[str, Any]]) -> int:
        """Append events (seq 1, 2, ... per run); returns the next seq. NotFound for a
        missing or foreign run, Conflict for an ended one, BadRequest for bad events (then
        none is stored); their bytes are charged to the owner like output."""
        if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_CALL:
            raise BadRequest(f"events must be a list of at most {MAX_EVENTS_PER_CALL}")
        now = time.time()
        rows = [event_row(event, now) for event in events]
        with self._transaction() as db:
            if self._existing(owner, run_id)["ended"] is not None:
                raise Conflict(f"run {run_id} has ended", hint="start a new run")
            last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?",
                              (run_id,)).fetchone()[0]
            size = sum(len(body.encode("utf-8")) + len(kind.encode("utf-8"))
                       for _, kind, body in rows)
            self._budget.charge(owner, run_id, size)
            db.executemany(
                "INSERT INTO events (run_id, seq, time, type, body) VALUES (?, ?, ?, ?, ?)",
                [(run_id, last + n, *row) for n, row in enumerate(rows, start=1)])
            db.execute("UPDATE runs SET last_activity = MAX(COALESCE(last_activity, 0), ?) "
                       "WHERE id = ?", (now, run_id))
        return int(last) + len(rows) + 1

    def events(self, owner: str, run_id: str, since: int = 0) -> builtins.list[dict[str, Any]]:
        """The run's events after seq `since`, in order (NotFound for a missing or foreign run)."""
        self._existing(owner, run_id)
        rows = self._db.execute("SELECT seq, time, type, body FROM events WHERE run_id = ? "
                                "AND seq > ? ORDER BY seq", (run_id, since)).fetchall()
        return [{"seq": r["seq"], "time": r["time"], "type": r["type"], **json.loads(r["body"])}
                for r in rows]

    # Output

    def put_output(self, owner: str, run_id: str, output: StoredOutput) -> None:
        """Store one execution's output compressed (replacing what the run had stored for that
        execution). Room is made by pruning the oldest ended runs, the owner's first; when
        that cannot make enough, nothing changes and DiskBudgetExhausted (the owner's cap) or
        InsufficientStorage (the total cap) says so."""
        data = check_output(output)
        with self._transaction() as db:
            self._existing(owner, run_id)
            old = db.execute("SELECT bytes FROM outputs WHERE run_id = ? AND execution_id = ?",
                             (run_id, output.execution_id)).fetchone()
            self._budget.charge(owner, run_id, len(data) - (old[0] if old else 0))
            db.execute("INSERT OR REPLACE INTO outputs (run_id, execution_id, host, task_id, "
                       "archived, bytes, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run_id, output.execution_id, output.host, output.task_id,
                        int(bool(output.archived)), len(data), data))

    def outputs(self, owner: str, run_id: str,
                host: str | None = None) -> builtins.list[StoredOutput]:
        """The run's stored outputs (one host's if given), in the order they were stored."""
        self._existing(owner, run_id)
        sql, args = "SELECT * FROM outputs WHERE run_id = ?", [run_id]
        if host is not None:
            sql, args = sql + " AND host = ?", [*args, host]
        rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        return [StoredOutput(host=r["host"], execution_id=r["execution_id"],
                             task_id=r["task_id"], events=decode_output(r["data"]),
                             archived=bool(r["archived"])) for r in rows]

    # Limits

    def prune(self, now: float | None = None) -> int:
        """Apply the limits to what is stored (budget.Budget.prune); returns how many runs
        went."""
        with self._transaction():
            removed = self._budget.prune(time.time() if now is None else now)
        if removed:
            # Give the freed pages back to the disk. executescript() steps it to the end;
            # execute() steps once, which frees a single page.
            self._db.executescript("PRAGMA incremental_vacuum;")
        return removed
