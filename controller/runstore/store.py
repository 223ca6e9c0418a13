"""SqlRunStore: the run store's logic in SQL that SQLite and PostgreSQL both run, written once
so both stores keep the same semantics. A subclass gives the connection (`_db`, `?`
placeholders), the write transaction, the few phrases the two dialects spell apart, lazy
reads of large rows and its error mapping. Every method checks the owner: another user's run is
exactly like a missing one. Stored bytes (a run's row, its events and its compressed output)
are charged to the run and the caps kept by pruning (budget.py).
"""

from __future__ import annotations

import builtins
import functools
import json
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, closing
from typing import Any, Concatenate, ParamSpec, TypeVar

from marco.errors import BadRequest, Conflict, MarcoError, NotFound, TooManyRuns
from marco.runs import KINDS, RUN_ID

from .budget import Budget
from .chunks import Page, after, check_events, check_page, check_seq, decode, encode, end_of
from .dbapi import Database, Row
from .records import (
    MAX_EVENTS_PER_CALL,
    MAX_EVENTS_READ,
    MAX_HOSTS,
    MAX_LIST,
    MAX_TITLE,
    NUL,
    ExecutionRecord,
    Run,
    RunLimits,
    check_execution,
    check_hosts,
    check_name,
    check_run,
    check_stats,
    check_status,
    event_row,
    execution_from_row,
    is_time,
    json_text,
    row_bytes,
    run_from_row,
)

STORED_IDS_PER_QUERY = 500  # ids in one IN (...) of stored_ids, under SQLite's variable limit
RC_MIN, RC_MAX = -(1 << 31), (1 << 31) - 1  # exit codes: signed 32-bit integers on every OS
P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="SqlRunStore")


def storage_errors(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """The method, its database's errors turned into the error ladder's by the store's
    `_storage_error` (decided by type and code, never by message); others pass unchanged."""

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except MarcoError:
            raise
        except Exception as error:
            mapped = self._storage_error(error)
            if mapped is None:
                raise
            raise mapped from error

    return wrapper


def check_events_limit(limit: Any) -> int:
    """A count of rows one read gives (events, executions)."""
    if isinstance(limit, bool) or not isinstance(limit, int) \
            or not 0 < limit <= MAX_EVENTS_READ:
        raise BadRequest(f"limit must be 1 to {MAX_EVENTS_READ}")
    return limit


def check_times(started: Any, ended: Any, rc: Any) -> None:
    """An execution's times are finite numbers or None, its exit code a signed 32-bit integer
    or None (a larger one would overflow the column: OverflowError, not a MarcoError)."""
    for name, value in (("started", started), ("ended", ended)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise BadRequest(f"{name} must be null or a finite number")
    if rc is not None and (isinstance(rc, bool) or not isinstance(rc, int)
                           or not RC_MIN <= rc <= RC_MAX):
        raise BadRequest(f"rc must be null or an integer from {RC_MIN} to {RC_MAX}")


def event_from_row(row: Row) -> dict[str, Any]:
    return {"seq": row["seq"], "time": row["time"], "type": row["type"],
            **json.loads(row["body"])}


# The chunk holding `since` (the last starting at or before it), then the later ones.
CHUNKS_FROM = ("SELECT {columns} FROM chunks WHERE run_id = ? AND execution_id = ? AND "
               "first_seq >= COALESCE((SELECT MAX(first_seq) FROM chunks WHERE run_id = ? AND "
               "execution_id = ? AND first_seq <= ?), 0) ORDER BY first_seq")


class SqlRunStore:
    """The run store's logic over one connection (use it from one thread: RunStoreThread)."""

    # What the dialects spell apart (SQLite's here).
    TITLE_CONTAINS = "instr(lower(title), lower(?)) > 0"  # ASCII case only; no wildcards
    EVENT_SIZE = "length(CAST(type AS BLOB)) + length(CAST(body AS BLOB))"  # UTF-8 bytes
    GREATEST = "MAX"
    ORDER = "rowid"  # the column rows of outputs and nodes are added in the order of
    NO_LIMIT: int | None = -1
    REGISTER = ("INSERT INTO outputs (run_id, execution_id, host, node, task_id, archived, "
                "bytes, next_seq) VALUES (?, ?, ?, ?, ?, 0, 0, 0)")
    EVENTS_BATCH = 64  # rows of events a lazy read fetches at once (of 64 KiB at most each)

    _db: Database
    _budget: Budget
    limits: RunLimits

    def close(self) -> None:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Database]:
        """One write transaction: all of it or nothing."""
        raise NotImplementedError

    def _storage_error(self, error: Exception) -> MarcoError | None:
        """The error ladder's error for a database error, or None to let it pass."""
        raise NotImplementedError

    def _is_duplicate(self, error: Exception) -> bool:
        """Whether an INSERT failed on a primary key already there."""
        raise NotImplementedError

    def _lazy_rows(self, sql: str, args: Sequence[Any],
                   batch: int) -> AbstractContextManager[Iterator[Any]]:
        """Rows fetched as they are read, `batch` at a time at most (large rows are read
        only when the caller gets to them)."""
        return closing(self._db.execute(sql, args))

    def _after_prune(self) -> None:
        """Give the space of pruned runs back (a dialect's own way; nothing by default)."""

    def _row(self, owner: str, run_id: str) -> Row | None:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            return None
        row: Row | None = self._db.execute(
            "SELECT * FROM runs WHERE id = ? AND owner = ?", (run_id, owner)).fetchone()
        return row

    def _existing(self, owner: str, run_id: str) -> Row:
        row = self._row(owner, run_id)
        if row is None:
            raise NotFound(f"no run {run_id}")
        return row

    # Runs

    @storage_errors
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
            except Exception as error:
                if self._is_duplicate(error):
                    raise Conflict(f"run {run.id} already exists") from error
                raise
            self._budget.charge(run.owner, run.id, row_bytes(run))

    @storage_errors
    def get(self, owner: str, run_id: str) -> Run | None:
        """The run, or None (also for another owner's run)."""
        row = self._row(owner, run_id)
        return None if row is None else run_from_row(row)

    @storage_errors
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
            if not isinstance(text, str) or len(text) > MAX_TITLE:
                raise BadRequest(f"the text to match is a string of at most {MAX_TITLE} "
                                 "characters")
            if NUL in text:  # no title holds one (check_run)
                return [], False
            where.append(self.TITLE_CONTAINS)
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

    @storage_errors
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
        with self._transaction() as db:
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
            db.execute(
                "UPDATE runs SET hosts = ?, status = ?, ended = ?, stats = ? WHERE id = ?",
                (json_text(run.hosts), run.status, run.ended, json_text(run.stats), run_id))
            self._budget.charge(owner, run_id, row_bytes(run) - size_before)
        return run

    @storage_errors
    def interrupt_running(self, now: float | None = None) -> int:
        """At start-up: the runs a previous process left running end as `interrupted`."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? "
                                "WHERE ended IS NULL", (time.time() if now is None else now,))
            return int(cursor.rowcount)

    @storage_errors
    def interrupt_stale(self, before: float, now: float | None = None) -> int:
        """Running runs with no activity (start or events) since `before` end as
        `interrupted`: their client is gone (docs/runs.md "Stale runs")."""
        with self._transaction() as db:
            cursor = db.execute("UPDATE runs SET status = 'interrupted', ended = ? WHERE "
                                "ended IS NULL AND COALESCE(last_activity, started) < ?",
                                (time.time() if now is None else now, before))
            return int(cursor.rowcount)

    # Events

    @storage_errors
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
            db.execute(f"UPDATE runs SET last_activity = {self.GREATEST}("
                       "COALESCE(last_activity, 0), ?) WHERE id = ?", (now, run_id))
        return int(last) + len(rows) + 1

    @storage_errors
    def events(self, owner: str, run_id: str, since: int = 0,
               limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """The run's events after seq `since`, in order, at most `limit` of them (NotFound for
        a missing or foreign run)."""
        check_seq(since, "since")
        if limit is not None:
            check_events_limit(limit)
        self._existing(owner, run_id)
        rows = self._db.execute("SELECT seq, time, type, body FROM events WHERE run_id = ? "
                                "AND seq > ? ORDER BY seq LIMIT ?",
                                (run_id, since, self.NO_LIMIT if limit is None else limit)
                                ).fetchall()
        return [event_from_row(row) for row in rows]

    @storage_errors
    def events_page(self, owner: str, run_id: str, since: int, limit: int,
                    max_bytes: int) -> tuple[builtins.list[dict[str, Any]], bool]:
        """One page of the run's events after seq `since`: at most `limit` of them and at most
        `max_bytes` (as charged: type and body; the first is given whatever its size), and
        whether more follow. Rows past the page are not decoded."""
        check_seq(since, "since")
        check_events_limit(limit)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise BadRequest("max_bytes must be an integer >= 1")
        self._existing(owner, run_id)
        page: builtins.list[dict[str, Any]] = []
        used, more = 0, False
        with self._lazy_rows(f"SELECT seq, time, type, body, {self.EVENT_SIZE} AS size "
                             "FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                             (run_id, since, limit + 1), self.EVENTS_BATCH) as rows:
            for row in rows:
                if len(page) == limit or (page and used + row["size"] > max_bytes):
                    more = True
                    break
                page.append(event_from_row(row))
                used += row["size"]
        return page, more

    # Output

    @storage_errors
    def add_output(self, owner: str, run_id: str, *, host: str, node: str, execution_id: str,
                   task_id: str | None, events: builtins.list[dict[str, Any]],
                   archived: bool = False, truncated_seq: int | None = None,
                   started: float | None = None, ended: float | None = None,
                   rc: int | None = None) -> ExecutionRecord:
        """Store what is new of one execution's output (its lines from the stored next_seq on,
        as one compressed chunk) and return its record. The first call registers the
        execution (host, node and task stay as first given); `started`, `ended` and `rc` are
        kept as the agent last gave them (None keeps what is stored); once it is archived,
        later calls change nothing. Room is made by pruning the oldest ended runs, the
        owner's first; when that cannot make enough, nothing changes and DiskBudgetExhausted
        (the owner's cap) or InsufficientStorage (the total cap) says so. Ended runs take
        output too (it is collected after the end)."""
        names = check_execution(host, node, execution_id, task_id)
        check_events(events)
        if truncated_seq is not None and (isinstance(truncated_seq, bool)
                                          or not isinstance(truncated_seq, int)
                                          or truncated_seq < 0):
            raise BadRequest("truncated_seq must be null or an integer >= 0")
        check_times(started, ended, rc)
        with self._transaction() as db:
            self._existing(owner, run_id)
            row = self._execution_row(run_id, execution_id)
            if row is None:
                row = self._register(owner, run_id, names)
            if row["archived"]:
                return execution_from_row(row)
            self._append_chunk(owner, run_id, row, after(events, row["next_seq"]))
            db.execute(
                "UPDATE outputs SET archived = ?, truncated_seq = COALESCE(?, truncated_seq), "
                "started = COALESCE(?, started), ended = COALESCE(?, ended), "
                "rc = COALESCE(?, rc) WHERE run_id = ? AND execution_id = ?",
                (int(bool(archived)), truncated_seq, started, ended, rc, run_id, execution_id))
            return execution_from_row(self._stored_execution(run_id, execution_id))

    def _execution_row(self, run_id: str, execution_id: str) -> Row | None:
        if not isinstance(execution_id, str) or NUL in execution_id:
            return None  # no stored id holds one (check_name)
        row: Row | None = self._db.execute(
            "SELECT * FROM outputs WHERE run_id = ? AND execution_id = ?",
            (run_id, execution_id)).fetchone()
        return row

    def _stored_execution(self, run_id: str, execution_id: str) -> Row:
        """The execution's row, or NotFound when it is not stored for that run."""
        row = self._execution_row(run_id, execution_id)
        if row is None:
            raise NotFound(f"no execution {execution_id} in run {run_id}")
        return row

    def _register(self, owner: str, run_id: str,
                  names: tuple[str, str, str, str | None]) -> Row:
        """A new execution's row; its names are charged to the run like its output."""
        host, node, execution_id, task_id = names
        self._budget.charge(owner, run_id, sum(len(name.encode("utf-8", "surrogatepass"))
                                               for name in names if name is not None))
        self._db.execute(self.REGISTER, (run_id, execution_id, host, node, task_id))
        return self._stored_execution(run_id, execution_id)

    def _append_chunk(self, owner: str, run_id: str, row: Row,
                      events: builtins.list[dict[str, Any]]) -> None:
        """Store `events` (lines past the execution's next_seq) as one chunk, charged."""
        if not events:
            return
        data = encode(events)
        self._budget.charge(owner, run_id, len(data))
        first, end = events[0]["seq"], end_of(events[-1])
        self._db.execute("INSERT INTO chunks (run_id, execution_id, first_seq, next_seq, bytes, "
                         "data) VALUES (?, ?, ?, ?, ?, ?)",
                         (run_id, row["execution_id"], first, end, len(data), data))
        self._db.execute("UPDATE outputs SET next_seq = ?, bytes = bytes + ? "
                         "WHERE run_id = ? AND execution_id = ?",
                         (end, len(data), run_id, row["execution_id"]))

    @storage_errors
    def stored_ids(self, owner: str, run_id: str,
                   execution_ids: builtins.list[str]) -> set[str]:
        """Which of these execution ids the run has stored (by primary key, a few hundred per
        query): the read side registers only the others."""
        self._existing(owner, run_id)
        found: set[str] = set()
        ids = [key for key in dict.fromkeys(execution_ids) if NUL not in key]  # none stored
        for start in range(0, len(ids), STORED_IDS_PER_QUERY):
            part = ids[start:start + STORED_IDS_PER_QUERY]
            marks = ", ".join("?" * len(part))
            found.update(row[0] for row in self._db.execute(
                f"SELECT execution_id FROM outputs WHERE run_id = ? AND execution_id IN ({marks})",
                (run_id, *part)))
        return found

    @storage_errors
    def execution(self, owner: str, run_id: str,
                  execution_id: str) -> ExecutionRecord | None:
        """One stored execution of the run by its id (None when the run has no such
        execution; NotFound for a missing or foreign run); no output is read."""
        self._existing(owner, run_id)
        row = self._execution_row(run_id, execution_id)
        return None if row is None else execution_from_row(row)

    @storage_errors
    def executions(self, owner: str, run_id: str, host: str | None = None,
                   task: str | None = None, node: str | None = None, offset: int = 0,
                   limit: int | None = None) -> builtins.list[ExecutionRecord]:
        """The run's stored executions (of one host, task and/or node if given, found by
        index), in the order they were first stored, from the `offset`-th on, at most `limit`
        of them (rows are only ever added at the end, so pages are stable); no output is
        read."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise BadRequest("offset must be an integer >= 0")
        if limit is not None:
            check_events_limit(limit)
        self._existing(owner, run_id)
        if any(isinstance(value, str) and NUL in value for value in (host, task, node)):
            return []  # no stored name holds one (check_name)
        sql, args = "SELECT * FROM outputs WHERE run_id = ?", [run_id]
        for column, value in (("host", host), ("task_id", task), ("node", node)):
            if value is not None:
                sql, args = f"{sql} AND {column} = ?", [*args, value]
        sql = f"{sql} ORDER BY {self.ORDER} LIMIT ? OFFSET ?"
        return [execution_from_row(row) for row in self._db.execute(
            sql, [*args, self.NO_LIMIT if limit is None else limit, offset]).fetchall()]

    @storage_errors
    def add_nodes(self, owner: str, run_id: str, nodes: builtins.list[str]) -> None:
        """Record nodes the run's output is on beyond its hosts (a task's delegate): the final
        collection and the read side ask them too. Already recorded ones are kept once; their
        names are charged like the run's other rows; a run records at most MAX_HOSTS nodes
        (BadRequest beyond, nothing recorded)."""
        if not isinstance(nodes, list):
            raise BadRequest("nodes must be a list of node names")
        names = list(dict.fromkeys(check_name(node, "a node") for node in nodes))
        with self._transaction() as db:
            self._existing(owner, run_id)
            new = [name for name in names if db.execute(
                "SELECT 1 FROM nodes WHERE run_id = ? AND node = ?", (run_id, name)).fetchone()
                is None]
            if not new:
                return
            count = db.execute("SELECT COUNT(*) FROM nodes WHERE run_id = ?",
                               (run_id,)).fetchone()[0]
            if count + len(new) > MAX_HOSTS:
                raise BadRequest(f"a run records at most {MAX_HOSTS} nodes")
            self._budget.charge(owner, run_id, sum(len(name.encode("utf-8", "surrogatepass"))
                                                   for name in new))
            db.executemany("INSERT INTO nodes (run_id, node) VALUES (?, ?)",
                           [(run_id, name) for name in new])

    @storage_errors
    def nodes(self, owner: str, run_id: str) -> builtins.list[str]:
        """The nodes recorded for the run by add_nodes, in the order recorded."""
        self._existing(owner, run_id)
        return [row[0] for row in self._db.execute(
            f"SELECT node FROM nodes WHERE run_id = ? ORDER BY {self.ORDER}", (run_id,))]

    @storage_errors
    def output_page(self, owner: str, run_id: str, execution_id: str, since: int = 0,
                    limit: int = 5000) -> tuple[builtins.list[dict[str, Any]], int]:
        """The stored lines of one execution from seq `since` on, at most `limit` of them, as
        output events (the first and last cut to fit), and the seq after the last line given
        (`since` when none). Reads only the chunks holding them. NotFound when the run or the
        execution is not stored."""
        check_page(since, limit)
        self._existing(owner, run_id)
        self._stored_execution(run_id, execution_id)
        page = Page(since, limit)
        with self._lazy_rows(CHUNKS_FROM.format(columns="next_seq, data"),
                             (run_id, execution_id, run_id, execution_id, since), 1) as rows:
            for chunk_end, data in rows:
                if chunk_end > since:
                    page.add(decode(data))
                if page.full:
                    break  # before the next row: its blob is not read
        return page.events, page.next

    @storage_errors
    def scan_output(self, owner: str, run_id: str, execution_id: str,
                    visit: Callable[[builtins.list[dict[str, Any]]], bool],
                    since: int = 0) -> None:
        """Give `visit` the stored lines of one execution from seq `since` on, as output events
        (the first cut to start there), one chunk's events at a time: one chunk is decoded
        at a time, never the whole output. Stops when `visit` returns False (before the next
        chunk is read) or the lines end. NotFound when the run or the execution is not
        stored."""
        check_seq(since, "since")
        self._existing(owner, run_id)
        self._stored_execution(run_id, execution_id)
        with closing(self._chunks_from(run_id, execution_id, since)) as chunks:
            for events in chunks:
                if events and not visit(events):
                    return  # closing() ends the read now, its later blobs unread

    def _chunks_from(self, run_id: str, execution_id: str,
                     since: int) -> Generator[builtins.list[dict[str, Any]], None, None]:
        """The events of each chunk holding lines from `since` on, in order, cut to start
        there; a chunk's blob is read only when the caller asks for it."""
        with self._lazy_rows(CHUNKS_FROM.format(columns="next_seq, data"),
                             (run_id, execution_id, run_id, execution_id, since), 1) as rows:
            for chunk_end, data in rows:
                if chunk_end > since:
                    yield after(decode(data), since)

    @storage_errors
    def mark_swept(self, owner: str, run_id: str, node: str) -> None:
        """Every execution of the run on `node` is listed and stored whole: nobody needs to
        ask that node about the run again."""
        check_name(node, "the node")
        with self._transaction() as db:
            self._existing(owner, run_id)
            added = db.execute("INSERT INTO swept (run_id, node) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING", (run_id, node)).rowcount
            if added:
                self._budget.charge(owner, run_id, len(node.encode("utf-8", "surrogatepass")))

    @storage_errors
    def swept(self, owner: str, run_id: str) -> set[str]:
        """The nodes marked swept for the run."""
        self._existing(owner, run_id)
        return {row[0] for row in self._db.execute("SELECT node FROM swept WHERE run_id = ?",
                                                   (run_id,))}

    # Limits

    @storage_errors
    def prune(self, now: float | None = None) -> int:
        """Apply the limits to what is stored (budget.Budget.prune); returns how many runs
        went."""
        with self._transaction():
            removed = self._budget.prune(time.time() if now is None else now)
        if removed:
            self._after_prune()
        return removed
