"""Reading a run's executions and their output (docs/runs.md, "The controller's API"): what the
store holds first, then what the agents still hold, a page at a time.

The store answers for every execution it has recorded. An agent is asked only about nodes of the
run that are not swept (a node is swept once every execution of the ended run on it is stored
whole), always with the caller's own token: a finished run reads from the store alone, however
many of its agents are gone, and a running one costs one agent call per node of the answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from marco.discovery import NodeRegistry
from marco.errors import MarcoError, NotFound

from .connector import AgentConnector
from .runstore import ExecutionRecord, Run, RunStoreThread

log = logging.getLogger(__name__)

LIVE_TIMEOUT = 10.0        # seconds an agent gets to answer a read; a hung one adds nothing
LIVE_CONCURRENCY = 16      # agents asked at once by one listing (a run may have 10,000 hosts)
OUTPUT_DEFAULT_LINES = 5000
OUTPUT_MAX_LINES = 20_000
ENDED = "ended"            # the state of an archived execution whose agent was not asked


@dataclass(frozen=True)
class LiveExecution:
    """An execution of the run as its agent lists it now."""

    host: str
    node: str
    execution_id: str
    task_id: str | None
    state: str | None
    next_seq: int
    truncated_seq: int | None


def live_execution(run: Run, node: str, summary: dict[str, Any]) -> LiveExecution | None:
    """An agent's execution summary as one of the run's executions (None when its `run` tag is
    another: an agent older than tags ignores the filter and lists every execution)."""
    tags = summary.get("tags") or {}
    if tags.get("run") != run.id or not isinstance(summary.get("id"), str):
        return None
    next_seq, truncated = summary.get("next_seq"), summary.get("truncated_seq")
    return LiveExecution(host=str(tags.get("host") or node), node=node,
                         execution_id=summary["id"], task_id=tags.get("task"),
                         state=summary.get("state"),
                         next_seq=next_seq if isinstance(next_seq, int) else 0,
                         truncated_seq=truncated if isinstance(truncated, int) else None)


def execution_json(record: ExecutionRecord, live: LiveExecution | None) -> dict[str, Any]:
    """One execution as `GET /api/runs/ID/executions` answers it: the stored record, what its
    agent says of it when it was asked."""
    state = live.state if live else (ENDED if record.archived else None)
    truncated = live.truncated_seq if live else record.truncated_seq
    return {"host": record.host, "node": record.node, "execution_id": record.execution_id,
            "task_id": record.task_id, "archived": record.archived,
            "stored_seq": record.next_seq,
            "next_seq": max(live.next_seq, record.next_seq) if live else record.next_seq,
            "state": state, "truncated_seq": truncated}


def line_count(events: list[dict[str, Any]]) -> int:
    return sum(len(event["lines"]) for event in events)


def fit(events: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first `limit` lines of `events` (the agent may give a few more than asked)."""
    kept: list[dict[str, Any]] = []
    for event in events:
        if limit <= 0:
            break
        if len(event["lines"]) > limit:
            event = {**event, "lines": event["lines"][:limit]}
        kept.append(event)
        limit -= len(event["lines"])
    return kept


def has_ended(summary: dict[str, Any], next_seq: int) -> bool:
    """Whether no line after `next_seq` will ever come from an agent's execution: it is not
    running and every line it kept is read (up to its truncation, when it was cut)."""
    if summary.get("state") == "running":
        return False
    end = summary.get("next_seq")
    truncated = summary.get("truncated_seq")
    if isinstance(truncated, int):
        end = truncated if not isinstance(end, int) else min(end, truncated)
    return isinstance(end, int) and next_seq >= end


class RunReader:
    """The read side of a run's executions: the store's records and pages, the agents' for
    what the store does not hold yet. Holds nothing between calls."""

    def __init__(self, store: RunStoreThread, connector: AgentConnector,
                 registry: NodeRegistry) -> None:
        self.store = store
        self.connector = connector
        self.registry = registry

    # -- executions -------------------------------------------------------------------------------

    async def executions(self, run: Run, token: str, host: str | None = None,
                         task: str | None = None) -> list[dict[str, Any]]:
        """The run's executions (one host's, one task's): stored ones in the order stored, then
        those only an agent knows so far (registered in the store now, so `output` finds their
        node even after the agent is gone)."""
        records: list[ExecutionRecord] = await self.store.call(
            "executions", run.owner, run.id, host=host, task=task)
        swept: set[str] = await self.store.call("swept", run.owner, run.id)
        nodes = self._nodes_to_ask(run, records, swept, host)
        live = {item.execution_id: item for item in await self._listings(run, token, nodes)
                if (host is None or item.host == host) and (task is None or item.task_id == task)}
        answer = [execution_json(r, live.pop(r.execution_id, None)) for r in records]
        for item in live.values():
            record = await self._register(run, item)
            if record is not None:
                answer.append(execution_json(record, item))
        return answer

    def _nodes_to_ask(self, run: Run, records: list[ExecutionRecord], swept: set[str],
                      host: str | None) -> list[str]:
        """Known nodes that may hold executions of the run the store does not have whole: the
        run's hosts (just `host` when filtered) and the nodes of its stored executions, less
        the swept ones."""
        names = [host] if host is not None else list(run.hosts)
        names += [r.node for r in records]
        return [name for name in dict.fromkeys(names)
                if name not in swept and self.registry.get(name) is not None]

    async def _listings(self, run: Run, token: str, nodes: list[str]) -> list[LiveExecution]:
        """What the nodes list tagged with the run, a few nodes at a time."""
        gate = asyncio.Semaphore(LIVE_CONCURRENCY)

        async def one(name: str) -> list[LiveExecution]:
            async with gate:
                return await self._listing(run, token, name)

        found = await asyncio.gather(*(one(name) for name in nodes))
        return [item for items in found for item in items]

    async def _listing(self, run: Run, token: str, name: str) -> list[LiveExecution]:
        node = self.registry.get(name)
        if node is None:
            return []
        client = self.connector.client(node, token, timeout=LIVE_TIMEOUT)
        try:
            summaries = await client.executions(run=run.id)
        except MarcoError as error:  # an agent that cannot answer adds nothing
            log.debug("run %s: executions on %s not listed: %s", run.id, name, error.message)
            return []
        return [item for s in summaries if (item := live_execution(run, name, s)) is not None]

    async def _register(self, run: Run, item: LiveExecution) -> ExecutionRecord | None:
        """Record an execution only its agent knows so far (no output: the collector stores
        that); a store that refuses (caps, busy) leaves it out of this answer."""
        try:
            record: ExecutionRecord = await self.store.call(
                "add_output", run.owner, run.id, host=item.host, node=item.node,
                execution_id=item.execution_id, task_id=item.task_id, events=[])
        except MarcoError as error:
            log.info("run %s: execution %s on %s not registered: %s", run.id,
                     item.execution_id, item.node, error.message)
            return None
        return record

    # -- output -----------------------------------------------------------------------------------

    async def output(self, run: Run, token: str, execution_id: str, since: int,
                     limit: int) -> dict[str, Any]:
        """Lines `since` on of one execution, at most `limit`: from the store below what it
        holds, then from the execution's agent (when not archived). NotFound when the run has
        no such execution."""
        record = await self._record(run, execution_id)
        events: list[dict[str, Any]] = []
        next_seq = since
        if since < record.next_seq:
            events, next_seq = await self.store.call("output_page", run.owner, run.id,
                                                     execution_id, since=since, limit=limit)
        end = record.archived and next_seq >= record.next_seq
        left = limit - line_count(events)
        if not record.archived and left > 0 and next_seq >= record.next_seq:
            more, next_seq, end = await self._from_agent(run, token, record, next_seq, left)
            events += more
        return {"execution_id": record.execution_id, "host": record.host, "node": record.node,
                "task_id": record.task_id, "events": events, "next": next_seq,
                "archived": record.archived, "end": end}

    async def _record(self, run: Run, execution_id: str) -> ExecutionRecord:
        records: list[ExecutionRecord] = await self.store.call("executions", run.owner, run.id)
        for record in records:
            if record.execution_id == execution_id:
                return record
        raise NotFound(f"run {run.id} has no execution {execution_id}")

    async def _from_agent(self, run: Run, token: str, record: ExecutionRecord, since: int,
                          left: int) -> tuple[list[dict[str, Any]], int, bool]:
        """Up to `left` lines from `since` on from the execution's agent, the seq after them,
        and whether nothing more will come. An agent that cannot answer gives nothing (more
        may come later); one that no longer has the execution never will."""
        node = self.registry.get(record.node)
        if node is None:
            return [], since, False
        client = self.connector.client(node, token, timeout=LIVE_TIMEOUT)
        events: list[dict[str, Any]] = []
        next_seq, end = since, False
        while left > 0 and not end:
            try:
                page = await client.output(record.execution_id, since=next_seq, limit=left)
            except NotFound:  # dropped by the agent's retention: those lines are gone
                return events, next_seq, True
            except MarcoError as error:
                log.debug("run %s: output of %s on %s not read: %s", run.id,
                          record.execution_id, record.node, error.message)
                return events, next_seq, False
            got = fit(page["events"], left)
            events += got
            left -= line_count(got)
            after = got[-1]["seq"] + len(got[-1]["lines"]) if got else next_seq
            end = has_ended(page["execution"], after)
            if after <= next_seq:
                break
            next_seq = after
        return events, next_seq, end
