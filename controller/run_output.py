"""Reading a run's executions and their output (docs/runs.md, "The controller's API"): what the
store holds first, then what the agents still hold, a page at a time.

The store answers for every execution it has recorded. An agent is asked only about what the
store cannot say: executions on it not yet stored whole, and, while the run runs, hosts and
recorded nodes with no execution stored yet; never a swept node (every execution of the ended
run on it is stored whole), always with the caller's own token, at most
`runs_read_listings_per_user` listings of one user at once (beyond, the answer is the store's
alone). A finished run reads from the store alone, however many of its agents are gone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from marco.errors import MarcoError, NotFound
from marco.nodes import NodeRegistry
from marco.runs import WITHOUT_EXECUTIONS

from .agent_records import AgentExecution, fit, has_ended, line_count, of_run
from .connector import AgentConnector
from .runstore import ExecutionRecord, Run, RunStoreThread
from .user_slots import UserSlots

log = logging.getLogger(__name__)

OUTPUT_DEFAULT_LINES = 5000  # lines of an output page when the caller gives no limit
ENDED = "ended"            # the state of an archived execution whose agent was not asked
# The escapes ansi.js drops (one class each): CSI (ESC [ params intermediates final, cut short
# at the line's end), strings (OSC, DCS, SOS, PM, APC: up to BEL or ST, or the line's end),
# other escapes (ESC, intermediates, final).
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b[\]P^_X][^\x07\x1b]*(?:\x07|\x1b\\)?"
                     r"|\x1b[ -/]*[0-~]?")


def strip_ansi(line: str) -> str:
    """A line without its terminal escapes (colours, titles, cursor moves), as plain text."""
    return ESCAPES.sub("", line) if "\x1b" in line else line


@dataclass(frozen=True)
class ReadLimits:
    """The read side's settings (runs_read_*)."""

    agent_timeout: float = 10.0   # seconds an agent gets to answer a read; a hung one adds nothing
    agents_at_once: int = 16      # agents asked at once by one listing
    listings_per_user: int = 4    # listings of one user asking agents at once
    output_lines: int = 20_000    # most lines one output page gives


DEFAULT_READ_LIMITS = ReadLimits()


def execution_json(record: ExecutionRecord, live: AgentExecution | None) -> dict[str, Any]:
    """One execution as `GET /api/runs/ID/executions` answers it: the stored record, what its
    agent says of it when it was asked."""
    state = live.state if live else (ENDED if record.archived else None)
    truncated = live.truncated_seq if live else record.truncated_seq
    started, ended, rc = (live.started, live.ended, live.rc) if live else (None, None, None)
    return {"host": record.host, "node": record.node, "execution_id": record.execution_id,
            "task_id": record.task_id, "archived": record.archived,
            "stored_seq": record.next_seq,
            "next_seq": max(live.next_seq, record.next_seq) if live else record.next_seq,
            "state": state, "truncated_seq": truncated,
            "started": started if started is not None else record.started,
            "ended": ended if ended is not None else record.ended,
            "rc": rc if rc is not None else record.rc}


class RunReader:
    """The read side of a run's executions: the store's records and pages, the agents' for
    what the store does not hold yet. Holds nothing between calls but the shared gate."""

    def __init__(self, store: RunStoreThread, connector: AgentConnector,
                 registry: NodeRegistry, limits: ReadLimits = DEFAULT_READ_LIMITS,
                 gate: UserSlots | None = None) -> None:
        self.store = store
        self.connector = connector
        self.registry = registry
        self.limits = limits
        self.gate = gate if gate is not None else UserSlots(limits.listings_per_user)

    # -- executions -------------------------------------------------------------------------------

    async def executions(self, run: Run, token: str, host: str | None = None,
                         task: str | None = None, live: bool = True, offset: int = 0,
                         limit: int = 5000) -> tuple[list[dict[str, Any]], bool, bool]:
        """One page of the run's executions (one host's, one task's): stored ones in the order
        stored from the `offset`-th on, at most `limit`; on the last page, then, those only an
        agent knows so far (registered in the store now, so `output` finds their node even
        after the agent is gone). Also whether the agents that could add to it were asked (not
        when `live` is false, nor beyond the caller's listings at once), and whether more
        stored executions follow the page."""
        records: list[ExecutionRecord] = await self.store.call(
            "executions", run.owner, run.id, host=host, task=task, offset=offset,
            limit=limit + 1)
        more = len(records) > limit
        records = records[:limit]
        stored = [execution_json(r, None) for r in records]
        if not live or more:  # agents are asked on the last page, which lists what they add
            return stored, live, more
        nodes = await self._nodes_to_ask(run, records, host)
        if not nodes:
            return stored, True, more
        with self.gate.admit(run.owner) as admitted:
            if not admitted:
                log.debug("run %s: %s lists from the store alone (%d listings at once)",
                          run.id, run.owner, self.gate.per_user)
                return stored, False, more
            log.debug("run %s: a listing of %s asks %d node(s)", run.id, run.owner, len(nodes))
            found = await self._listings(run, token, nodes)
        live_items = {item.execution_id: item for item in found
                      if (host is None or item.host == host)
                      and (task is None or item.task_id == task)}
        answer = [execution_json(r, live_items.pop(r.execution_id, None)) for r in records]
        # Those stored on earlier pages are listed there; only new ones are added here. (One
        # stored meanwhile by a collection is then left to the next listing, where it is on
        # the last page.)
        earlier: set[str] = await self.store.call(
            "stored_ids", run.owner, run.id, list(live_items)) if live_items and offset else set()
        for item in live_items.values():
            if item.execution_id in earlier:
                continue
            record = await self._register(run, item)
            if record is not None:
                answer.append(execution_json(record, item))
        return answer, True, more

    async def _nodes_to_ask(self, run: Run, records: list[ExecutionRecord],
                            host: str | None) -> list[str]:
        """Known nodes that may add to what the store says, none of them swept: the nodes of
        executions not stored whole, the run's hosts (just `host` when filtered) and its
        recorded nodes (delegates). A node with executions stored may start another (a
        playbook's next task), and an ended run's node that is not swept may hold some its
        collection never stored (a controller restart, a refused final collection). None for
        a kind of run that starts no executions (a terminal's)."""
        if run.kind in WITHOUT_EXECUTIONS:
            return []
        recorded: list[str] = await self.store.call("nodes", run.owner, run.id)
        candidates = [host] if host is not None else list(run.hosts)
        names = [*(r.node for r in records if not r.archived), *candidates, *recorded]
        swept: set[str] = await self.store.call("swept", run.owner, run.id)
        return [name for name in dict.fromkeys(names)
                if name not in swept and self.registry.get(name) is not None]

    async def _listings(self, run: Run, token: str, nodes: list[str]) -> list[AgentExecution]:
        """What the nodes list tagged with the run, a few nodes at a time."""
        at_once = asyncio.Semaphore(self.limits.agents_at_once)

        async def one(name: str) -> list[AgentExecution]:
            async with at_once:
                return await self._listing(run, token, name)

        found = await asyncio.gather(*(one(name) for name in nodes))
        return [item for items in found for item in items]

    async def _listing(self, run: Run, token: str, name: str) -> list[AgentExecution]:
        node = self.registry.get(name)
        if node is None:
            return []
        client = self.connector.client(node, token, timeout=self.limits.agent_timeout)
        try:
            summaries = await client.executions(run=run.id)
        except MarcoError as error:  # an agent that cannot answer adds nothing
            log.debug("run %s: executions on %s not listed: %s", run.id, name, error.message)
            return []
        return [item for s in summaries if (item := of_run(run.id, name, s)) is not None]

    async def _register(self, run: Run, item: AgentExecution) -> ExecutionRecord | None:
        """Record an execution only its agent knows so far (no output: the collector stores
        that); a store that refuses (caps, busy) leaves it out of this answer."""
        try:
            record: ExecutionRecord = await self.store.call(
                "add_output", run.owner, run.id, host=item.host, node=item.node,
                execution_id=item.execution_id, task_id=item.task_id, events=[],
                started=item.started, ended=item.ended, rc=item.rc)
        except MarcoError as error:
            log.info("run %s: execution %s on %s not registered: %s", run.id,
                     item.execution_id, item.node, error.message)
            return None
        return record

    # -- output -----------------------------------------------------------------------------------

    async def output(self, run: Run, token: str, execution_id: str, since: int,
                     limit: int, unreachable: set[str] | None = None) -> dict[str, Any]:
        """Lines `since` on of one execution, at most `limit`: from the store below what it
        holds, then from the execution's agent (when not archived; not when its node is in
        `unreachable`, to which a node whose read fails is added). NotFound when the run has
        no such execution."""
        record: ExecutionRecord | None = await self.store.call("execution", run.owner, run.id,
                                                               execution_id)
        if record is None:
            raise NotFound(f"run {run.id} has no execution {execution_id}")
        events: list[dict[str, Any]] = []
        next_seq = since
        if since < record.next_seq:
            events, next_seq = await self.store.call("output_page", run.owner, run.id,
                                                     execution_id, since=since, limit=limit)
        end = record.archived and next_seq >= record.next_seq
        left = limit - line_count(events)
        if not record.archived and left > 0 and next_seq >= record.next_seq:
            more, next_seq, end = await self._from_agent(run, token, record, next_seq, left,
                                                         unreachable)
            events += more
        return {"execution_id": record.execution_id, "host": record.host, "node": record.node,
                "task_id": record.task_id, "events": events, "next": next_seq,
                "archived": record.archived, "end": end}

    async def _from_agent(self, run: Run, token: str, record: ExecutionRecord, since: int,
                          left: int, unreachable: set[str] | None = None,
                          ) -> tuple[list[dict[str, Any]], int, bool]:
        """Up to `left` lines from `since` on from the execution's agent, the seq after them,
        and whether nothing more will come. An agent that cannot answer gives nothing (more
        may come later); one that no longer has the execution never will."""
        node = self.registry.get(record.node)
        if node is None or (unreachable is not None and record.node in unreachable):
            return [], since, False
        client = self.connector.client(node, token, timeout=self.limits.agent_timeout)
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
                if unreachable is not None:
                    unreachable.add(record.node)
                return events, next_seq, False
            got = fit(page["events"], left)
            events += got
            left -= line_count(got)
            after = got[-1]["seq"] + len(got[-1]["lines"]) if got else next_seq
            end = has_ended(page["execution"], after, page.get("truncated_seq"))
            if after <= next_seq:
                break
            next_seq = after
        return events, next_seq, end

    async def pages(self, run: Run, token: str, execution_id: str,
                    limit: int) -> AsyncIterator[dict[str, Any]]:
        """Every output page of one execution from its first line, as `output` gives them (so
        a caller holds one page at a time), until its `end` or until a page brings nothing new
        (a running execution: what it printed so far). NotFound, before any page, when the
        run has no such execution."""
        since = 0
        while True:
            page = await self.output(run, token, execution_id, since, limit)
            yield page
            if page["end"] or page["next"] <= since:
                return
            since = page["next"]
