"""What an agent says of a run's execution, read the one way both the collector (collector.py)
and the read side (run_output.py) need it (docs/runs.md, "Keeping output"): which host, node
and task it belongs to (from its tags), how far its output goes, whether it has ended with
every line read, and its output events cut to a number of lines.

An agent's execution summary is `GET /v1/executions` / `GET /v1/executions/ID` as
docs/protocol.md gives it; its `truncated_seq`, when set, is where the agent stopped keeping
lines (its spool was full): no line from there on will ever be read from it, though its
`next_seq` counts on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .runstore.chunks import end_of, trim
from .runstore.sqlite import RC_MAX, RC_MIN

__all__ = ["AgentExecution", "end_of", "fit", "has_ended", "last_seq", "line_count", "of_run",
           "times"]


@dataclass(frozen=True)
class AgentExecution:
    """One execution of a run as its agent lists it now."""

    host: str                  # the inventory host it ran for: its `host` tag, else the node
    node: str                  # the node (agent) listing it
    execution_id: str
    task_id: str | None        # its `task` tag
    state: str | None          # running, exited, killed, lost
    next_seq: int              # the agent's: the seq after its last line (kept or not)
    truncated_seq: int | None  # the agent kept no line from this seq on
    no_log: bool               # it keeps no output at all
    started: float | None = None  # the node's Unix time it started
    ended: float | None = None    # and ended (None while it runs)
    rc: int | None = None         # its exit code, once it exited

    @property
    def readable_seq(self) -> int:
        """The seq after the last line the agent can give (its truncation, when cut)."""
        return self.next_seq if self.truncated_seq is None \
            else min(self.next_seq, self.truncated_seq)


def _seq(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0 else None


def _rc(value: Any) -> int | None:
    """An exit code the store can keep, else None (an agent's 2**64 would overflow SQLite)."""
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and RC_MIN <= value <= RC_MAX else None


def times(summary: Any) -> dict[str, Any]:
    """An agent's execution summary's `started`, `ended` and `rc`, each None when missing
    or not a number (add_output's arguments of the same names)."""
    if not isinstance(summary, dict):
        return {"started": None, "ended": None, "rc": None}
    return {"started": _time(summary.get("started")), "ended": _time(summary.get("ended")),
            "rc": _rc(summary.get("rc"))}


def of_run(run_id: str, node: str, summary: Any) -> AgentExecution | None:
    """The agent's summary as an execution of the run (None when it is not tagged with the
    run: an agent older than tags ignores the filter and lists every execution, or when it
    has no id)."""
    if not isinstance(summary, dict):
        return None
    tags = summary.get("tags")
    if not isinstance(tags, dict):
        return None
    execution_id = summary.get("id")
    if tags.get("run") != run_id or not isinstance(execution_id, str) or not execution_id:
        return None
    host, task = tags.get("host"), tags.get("task")
    state = summary.get("state")
    return AgentExecution(host=host if isinstance(host, str) and host else node, node=node,
                          execution_id=execution_id,
                          task_id=task if isinstance(task, str) and task else None,
                          state=state if isinstance(state, str) else None,
                          next_seq=_seq(summary.get("next_seq")) or 0,
                          truncated_seq=_seq(summary.get("truncated_seq")),
                          no_log=bool(summary.get("no_log")), **times(summary))


def last_seq(summary: dict[str, Any], truncated_seq: Any = None) -> int | None:
    """The seq after the last line the agent can ever give of the execution: its next_seq, or
    its truncation when it was cut (`truncated_seq` given apart, as an output page does,
    counts too); None when it says neither."""
    end = _seq(summary.get("next_seq"))
    for cut in (_seq(summary.get("truncated_seq")), _seq(truncated_seq)):
        if cut is not None:
            end = cut if end is None else min(end, cut)
    return end


def has_ended(summary: dict[str, Any], next_seq: int, truncated_seq: Any = None) -> bool:
    """Whether no line from `next_seq` on will ever come from the agent's execution: it is
    not running and every line it kept is read (up to its truncation, when it was cut)."""
    if summary.get("state") == "running":
        return False
    end = last_seq(summary, truncated_seq)
    return end is not None and next_seq >= end


def line_count(events: list[dict[str, Any]]) -> int:
    return sum(len(event["lines"]) for event in events)


def fit(events: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first `limit` lines of `events` (an agent may give a few more than asked), cut as
    the store cuts its pages (chunks.trim)."""
    kept: list[dict[str, Any]] = []
    for event in events:
        if limit <= 0:
            break
        part = trim(event, int(event["seq"]), int(event["seq"]) + limit)
        if part is not None:
            kept.append(part)
            limit -= len(part["lines"])
    return kept
