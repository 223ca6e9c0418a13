"""What the run store keeps, as values: runs, stored output, the limits, and the checks every
value passes before it is stored (docs/runs.md "The model")."""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, cast

from marco.errors import BadRequest
from marco.runs import KINDS, MAX_META_BYTES, MAX_TITLE, RUN_ID, STATUSES

from .dbapi import Row

MAX_EVENTS_PER_CALL = 1000
MAX_EVENTS_READ = 100_000  # events one read of a run's events gives at most
MAX_EVENT_BYTES = 64 * 1024
MAX_LIST = 1000
MAX_NAME = 255  # a host name, an execution or task id
MAX_HOSTS = 10_000  # hosts of one run
DAY = 86400.0
NUL = "\x00"  # no stored text holds one (PostgreSQL's text cannot): refused, never found


@dataclass
class Run:
    """One thing a user did (docs/runs.md "The model")."""

    id: str
    owner: str
    kind: str
    title: str
    hosts: list[str]
    started: float
    ended: float | None = None
    status: str = "running"
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The run's JSON form, without its events."""
        return {"id": self.id, "owner": self.owner, "kind": self.kind, "title": self.title,
                "hosts": list(self.hosts), "started": self.started, "ended": self.ended,
                "status": self.status, "stats": {h: dict(c) for h, c in self.stats.items()},
                "meta": dict(self.meta)}


@dataclass(frozen=True)
class ExecutionRecord:
    """One execution of a run as stored (without its output)."""

    host: str  # the inventory host it ran for (its `host` tag, else the node)
    node: str  # the node (agent) it ran on
    execution_id: str
    task_id: str | None
    next_seq: int  # lines 0 .. next_seq-1 are stored (the seq after the last one)
    archived: bool  # all of its output is stored: it has ended, every line is here
    truncated_seq: int | None  # the agent's truncated_seq: its record was cut from this seq on
    bytes: int  # compressed bytes of its chunks
    started: float | None = None  # its node's Unix time it started, once an agent said it
    ended: float | None = None    # and ended
    rc: int | None = None         # its exit code


@dataclass(frozen=True)
class RunLimits:
    """The `runs_*` settings (docs/runs.md "Settings")."""

    retention_days: float = 90
    max_bytes: int = 1 << 30
    max_running_per_user: int = 20
    max_per_user: int = 10_000
    max_bytes_per_user: int = 256 << 20


DEFAULT_LIMITS = RunLimits()


def new_run_id(now: float | None = None) -> str:
    """`r` + 8 hex of the start second + 12 random hex: ids sort by start."""
    seconds = int(time.time() if now is None else now)
    return f"r{seconds:08x}{secrets.token_hex(6)}"


def json_text(value: Any) -> str:
    """Compact JSON as UTF-8 text (escaped only if a lone surrogate needs it)."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)


def encoded_json(value: Any, what: str) -> str:
    """`json_text`, or BadRequest naming `what` when the value is not JSON."""
    try:
        return json_text(value)
    except (TypeError, ValueError) as error:
        raise BadRequest(f"{what} is not JSON: {error}") from error


def is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise BadRequest(f"{what} must be a string of 1 to {MAX_NAME} characters")
    return check_text(value, what)


def check_text(value: str, what: str) -> str:
    """Text stored as it is (not inside JSON, which escapes it) holds no NUL character."""
    if NUL in value:
        raise BadRequest(f"{what} must not hold a NUL character")
    return value


def check_execution(host: Any, node: Any, execution_id: Any,
                    task_id: Any) -> tuple[str, str, str, str | None]:
    """An execution's names (host, node, id, task id or None), or BadRequest."""
    return (check_name(host, "the host"), check_name(node, "the node"),
            check_name(execution_id, "the execution id"),
            None if task_id is None else check_name(task_id, "the task id"))


def check_hosts(hosts: Any) -> list[str]:
    """The hosts of a run, or BadRequest (also for callers that check before storing)."""
    if not isinstance(hosts, list):
        raise BadRequest("hosts must be a list of node names")
    if len(hosts) > MAX_HOSTS:
        raise BadRequest(f"a run has at most {MAX_HOSTS} hosts")
    return [check_name(host, "a host") for host in hosts]


def row_bytes(run: Run) -> int:
    """The bytes a run's own row holds (title, hosts, stats, meta): charged against the byte
    caps like its events and outputs, so runs with huge host lists cannot fill the disk."""
    return sum(len(text.encode("utf-8", "surrogatepass"))
               for text in (run.title, json_text(run.hosts), json_text(run.stats),
                            json_text(run.meta)))


def check_status(status: Any) -> str:
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(sorted(STATUSES))}")
    return str(status)


def check_stats(stats: Any) -> dict[str, dict[str, int]]:
    ok = isinstance(stats, dict) and all(
        isinstance(host, str) and isinstance(counts, dict) and all(
            isinstance(name, str) and isinstance(n, int) and not isinstance(n, bool)
            for name, n in counts.items())
        for host, counts in stats.items())
    if not ok:
        raise BadRequest("stats must map each host to {name: integer} counts")
    return cast(dict[str, dict[str, int]], stats)


def check_run(run: Run) -> None:
    if not isinstance(run.id, str) or not RUN_ID.fullmatch(run.id):
        raise BadRequest("a run id is r and 20 lowercase hex characters")
    check_name(run.owner, "the owner")
    if run.kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(sorted(KINDS))}")
    if not isinstance(run.title, str) or len(run.title) > MAX_TITLE:
        raise BadRequest(f"the title must be a string of at most {MAX_TITLE} characters")
    check_text(run.title, "the title")
    check_hosts(run.hosts)
    if not is_time(run.started) or not (run.ended is None or is_time(run.ended)):
        raise BadRequest("started and ended must be numbers (Unix time)")
    check_status(run.status)
    check_stats(run.stats)
    if not isinstance(run.meta, dict):
        raise BadRequest("meta must be an object")
    if len(encoded_json(run.meta, "meta").encode("utf-8")) > MAX_META_BYTES:
        raise BadRequest(f"meta is larger than {MAX_META_BYTES} bytes as JSON")


def event_row(event: Any, now: float) -> tuple[float, str, str]:
    """(time, type, body JSON) of one event, or BadRequest; `seq` is the store's to give."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) \
            or not event["type"]:
        raise BadRequest("each event must be an object with a string type")
    check_text(event["type"], "an event's type")
    stamp = event.get("time", now)
    if not is_time(stamp):
        raise BadRequest("an event's time must be a number (Unix time)")
    body = {k: v for k, v in event.items() if k not in ("seq", "time", "type")}
    text = encoded_json(body, "an event")
    if len(text.encode("utf-8")) + len(event["type"].encode("utf-8")) > MAX_EVENT_BYTES:
        raise BadRequest(f"an event is larger than {MAX_EVENT_BYTES} bytes as JSON")
    return float(stamp), event["type"], text


def execution_from_row(row: Row) -> ExecutionRecord:
    return ExecutionRecord(host=row["host"], node=row["node"], execution_id=row["execution_id"],
                           task_id=row["task_id"], next_seq=row["next_seq"],
                           archived=bool(row["archived"]), truncated_seq=row["truncated_seq"],
                           bytes=row["bytes"], started=row["started"], ended=row["ended"],
                           rc=row["rc"])


def run_from_row(row: Row) -> Run:
    return Run(id=row["id"], owner=row["owner"], kind=row["kind"], title=row["title"],
               hosts=json.loads(row["hosts"]), started=row["started"], ended=row["ended"],
               status=row["status"], stats=json.loads(row["stats"]), meta=json.loads(row["meta"]))
