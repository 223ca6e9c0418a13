"""Keeping a run's output as it happens (docs/runs.md, "Keeping output"): the controller copies
each execution of a run from its agent into the run store as soon as it is told the execution
is done (a host's result, a command's exit), and once more, finally, when the run ends.

Every call to an agent carries the token of the request that asked for the collection (the
run's owner), kept in memory only: a collection only ever reads what the agents would show
that user anyway. Collections are coalesced per (run, node) and bounded per user.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from marco.client import AsyncAgentClient
from marco.errors import AuthenticationError, MarcoError, TryAgain
from marco.nodes import NodeRegistry

from .agent_records import AgentExecution, has_ended, of_run, times
from .connector import AgentConnector
from .runstore import ExecutionRecord, Run, RunStoreThread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectLimits:
    """The collector's settings (runs_collect_*)."""

    per_user: int = 4             # collections of one user running at once
    queue_per_user: int = 1000    # non-final requests of one user waiting; more are dropped
    finals_per_user: int = 1000   # final collections of one user queued, running or retried
    retry: float = 5.0            # first delay before a final collection is tried again
    retry_max: float = 60.0       # the delay doubles up to this
    give_up: float = 3600.0       # seconds after the run's end when retries stop
    page_lines: int = 20_000      # lines asked of an agent per output request (one page held)


DEFAULT_LIMITS = CollectLimits()


class Outcome(enum.Enum):
    """How one collection of (run, node) went."""

    DONE = "done"        # every execution the agent lists is archived
    PENDING = "pending"  # something is left: a running execution, an agent not reached
    STOPPED = "stopped"  # nothing more to do with this token: refused, store full, run gone


@dataclass(frozen=True)
class RunRef:
    """What a collection keeps of its run: not the Run, whose hosts alone can be megabytes."""

    id: str
    owner: str
    ended: float | None

    @classmethod
    def of(cls, run: Run) -> RunRef:
        return cls(run.id, run.owner, run.ended)


@dataclass
class Slot:
    """One (run, node) to collect: the newest token asked with, whether the run has ended."""

    run: RunRef
    node: str
    token: str
    final: bool = False
    state: str = "queued"  # queued, running, or waiting (for a final retry)
    again: bool = False    # asked again while running: run once more after
    delay: float = 0.0     # the last retry delay (0: none yet)

    @property
    def key(self) -> tuple[str, str]:
        return self.run.id, self.node


@dataclass
class UserQueue:
    """One user's collections: those running, those waiting their turn (oldest first), and
    counters kept as slots come and go, so no request counts the queue."""

    running: int = 0
    waiting: deque[Slot] = field(default_factory=deque)
    plain_waiting: int = 0  # non-final slots in `waiting`
    finals: int = 0         # final slots, wherever they are (queued, running, retry timer)

    def push(self, slot: Slot) -> None:
        slot.state = "queued"
        self.waiting.append(slot)
        self.plain_waiting += not slot.final

    def pop(self) -> Slot:
        slot = self.waiting.popleft()
        self.plain_waiting -= not slot.final
        return slot

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self.finals


class OutputCollector:
    """Copies the output of runs' executions from the agents into the store, in the
    background: `request` returns at once."""

    def __init__(self, store: RunStoreThread, connector: AgentConnector, registry: NodeRegistry,
                 limits: CollectLimits = DEFAULT_LIMITS) -> None:
        self.store, self.connector, self.registry = store, connector, registry
        self.limits = limits
        self._slots: dict[tuple[str, str], Slot] = {}
        self._users: dict[str, UserQueue] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- scheduling -----------------------------------------------------------------------------

    def request(self, run: Run, node: str, token: str, final: bool = False) -> bool:
        """Collect the run's executions on `node` soon. One collection per (run, node) is in
        flight: asked again meanwhile, it runs once more after. A final request (the run has
        ended) is retried until every execution there is archived. False when a final one is
        refused by `finals_per_user` (the caller logs it)."""
        queue = self._users.setdefault(run.owner, UserQueue())
        slot = self._slots.get((run.id, node))
        if slot is not None:
            slot.token = token  # the newest: an older one may expire first
            taken = not final or slot.final or self._take_final(queue)
            if final and taken and not slot.final:
                queue.plain_waiting -= slot.state == "queued"
                slot.run, slot.final = RunRef.of(run), True
            if slot.state == "running":
                slot.again = True
            return taken
        if final and not self._take_final(queue):
            self._forget_idle(run.owner)
            return False
        if not final and queue.plain_waiting >= self.limits.queue_per_user:
            log.warning("run %s of %s: collection on %s dropped (%d of the user's collections "
                        "wait already); the run's final collection picks it up", run.id,
                        run.owner, node, self.limits.queue_per_user)
            self._forget_idle(run.owner)
            return True
        slot = Slot(RunRef.of(run), node, token, final)
        self._slots[slot.key] = slot
        queue.push(slot)
        self._pump(run.owner)
        return True

    def request_all(self, run: Run, nodes: Iterable[str], token: str,
                    final: bool = False) -> None:
        """Request each node; final requests refused by the bound are logged once for the
        run (a run can have 10,000 hosts)."""
        refused = [node for node in dict.fromkeys(nodes)
                   if not self.request(run, node, token, final)]
        if refused:
            log.warning("run %s of %s: final collection on %s not queued: %d of the user's "
                        "final collections are pending already; that output is read from the "
                        "agents while they hold it", run.id, run.owner,
                        ", ".join(refused[:10]) + (f" and {len(refused) - 10} more"
                                                   if len(refused) > 10 else ""),
                        self.limits.finals_per_user)
    def _take_final(self, queue: UserQueue) -> bool:
        """Count one more final collection of the user; False at `finals_per_user` (a user
        ending many runs on many nodes would pile them up): that node's output is then read
        live from its agent while the agent holds it."""
        if queue.finals >= self.limits.finals_per_user:
            return False
        queue.finals += 1
        return True

    def _forget_idle(self, owner: str) -> None:
        queue = self._users.get(owner)
        if queue is not None and queue.idle:
            del self._users[owner]

    def _pump(self, owner: str) -> None:
        """Start the user's waiting collections while fewer than `per_user` run."""
        queue = self._users[owner]
        while queue.waiting and queue.running < self.limits.per_user:
            slot = queue.pop()
            slot.state, slot.again = "running", False
            queue.running += 1
            log.debug("collecting run %s on %s (%d of at most %d at once for %s)", slot.run.id,
                      slot.node, queue.running, self.limits.per_user, owner)
            self._spawn(self._run(slot))
        self._forget_idle(owner)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, slot: Slot) -> None:
        """One collection, then what follows it: again, a retry later, or nothing."""
        try:
            outcome = await self._collect(slot)
        except Exception:  # a bug must not leave the slot taken forever
            log.exception("run %s: collection on %s failed", slot.run.id, slot.node)
            outcome = Outcome.STOPPED
        queue = self._users[slot.run.owner]
        queue.running -= 1
        log.debug("collected run %s on %s: %s", slot.run.id, slot.node, outcome.value)
        if slot.again:
            queue.push(slot)
        elif not (outcome is Outcome.PENDING and slot.final and self._retry_later(slot)):
            del self._slots[slot.key]
            queue.finals -= slot.final
        self._pump(slot.run.owner)

    def _retry_later(self, slot: Slot) -> bool:
        """Schedule a final collection's next try (doubling delays); False past give-up."""
        slot.delay = min(slot.delay * 2 or self.limits.retry, self.limits.retry_max)
        ended = slot.run.ended if slot.run.ended is not None else time.time()
        if time.time() + slot.delay > ended + self.limits.give_up:
            log.info("run %s of %s: collection on %s given up %d s after the run ended; what "
                     "is not stored stays unarchived", slot.run.id, slot.run.owner, slot.node,
                     self.limits.give_up)
            return False
        slot.state = "waiting"
        log.debug("run %s: collection on %s again in %.1f s", slot.run.id, slot.node,
                  slot.delay)
        self._spawn(self._wait_and_queue(slot))
        return True

    async def _wait_and_queue(self, slot: Slot) -> None:
        await asyncio.sleep(slot.delay)
        self._users[slot.run.owner].push(slot)  # kept while its final slot is counted
        self._pump(slot.run.owner)

    async def close(self) -> None:
        """Cancel every collection (what was stored stays) and forget what waits."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._slots.clear()
        self._users.clear()

    # -- collecting -----------------------------------------------------------------------------

    async def _collect(self, slot: Slot) -> Outcome:
        """Store what the node holds of the run's executions that are not archived yet. Agent
        errors are caught where the agent is called; a MarcoError reaching here past the
        token's is the store's."""
        run = slot.run
        node = self.registry.get(slot.node)
        if node is None:  # gone (said goodbye) or never a node: what is stored stays listed
            log.info("run %s: %s is not a known node now; not collected", run.id, slot.node)
            return Outcome.STOPPED
        client = self.connector.client(node, slot.token)
        try:
            return await self._collect_node(slot, client)
        except AuthenticationError as error:
            log.info("run %s of %s: collection on %s stopped, the token was refused: %s",
                     run.id, run.owner, slot.node, error.message)
            return Outcome.STOPPED
        except TryAgain as error:  # the store is busy: a later try may pass
            log.info("run %s of %s: output from %s not stored now: %s", run.id, run.owner,
                     slot.node, error.message)
            return Outcome.PENDING
        except MarcoError as error:  # the store's caps, or the run pruned meanwhile
            log.warning("run %s of %s: output from %s not stored: %s", run.id, run.owner,
                        slot.node, error.message)
            return Outcome.STOPPED

    async def _collect_node(self, slot: Slot, client: AsyncAgentClient) -> Outcome:
        """Each listed execution not archived yet is looked up by its id (the store reads no
        other record); a final collection then archives what the node no longer holds and
        marks the node swept."""
        run = slot.run
        listed = await self._listing(slot, client)
        if listed is None:
            return Outcome.PENDING
        pending = False
        for live in listed:
            record: ExecutionRecord | None = await self.store.call(
                "execution", run.owner, run.id, live.execution_id)
            if record is None or not record.archived:
                pending |= not await self._collect_execution(slot, client, live, record)
        if pending:
            return Outcome.PENDING
        if slot.final:
            await self._archive_lost(slot, {live.execution_id for live in listed})
            await self.store.call("mark_swept", run.owner, run.id, slot.node)
        return Outcome.DONE

    async def _listing(self, slot: Slot, client: AsyncAgentClient) -> list[AgentExecution] | None:
        """The node's executions tagged with the run; None when the agent is not reached now."""
        try:
            summaries = await client.executions(run=slot.run.id)
        except AuthenticationError:
            raise
        except MarcoError as error:
            log.info("run %s: cannot list the executions on %s now: %s", slot.run.id,
                     slot.node, error.message)
            return None
        return [live for summary in summaries
                if (live := of_run(slot.run.id, slot.node, summary)) is not None]

    async def _archive_lost(self, slot: Slot, listed: set[str]) -> None:
        """The node's stored executions of the run that it no longer lists are archived with
        what was stored: asking that agent again brings nothing (its retention forgot them,
        or it restarted), and the node can be swept."""
        run = slot.run
        records: list[ExecutionRecord] = await self.store.call(
            "executions", run.owner, run.id, node=slot.node)
        for record in records:
            if record.archived or record.execution_id in listed:
                continue
            log.debug("run %s: %s no longer holds execution %s; archived with its %d stored "
                      "line(s)", run.id, slot.node, record.execution_id, record.next_seq)
            await self.store.call("add_output", run.owner, run.id, host=record.host,
                                  node=record.node, execution_id=record.execution_id,
                                  task_id=record.task_id, events=[], archived=True)

    async def _collect_execution(self, slot: Slot, client: AsyncAgentClient,
                                 live: AgentExecution, record: ExecutionRecord | None) -> bool:
        """Store one execution's output from the stored next_seq on, page by page; True once
        it is archived (it has ended and every line it kept is stored)."""
        where = dict(host=live.host, node=slot.node, execution_id=live.execution_id,
                     task_id=live.task_id)
        when: dict[str, Any] = dict(started=live.started, ended=live.ended, rc=live.rc)
        if live.no_log:  # no output anywhere: only its record
            ended = live.state != "running"
            await self._add(slot, where, [], archived=ended, **when)
            return ended
        since = record.next_seq if record is not None else 0
        while True:
            try:
                page = await client.output(live.execution_id, since=since,
                                           limit=self.limits.page_lines)
            except AuthenticationError:
                raise
            except MarcoError as error:  # this one only (forgotten meanwhile, say)
                log.info("run %s: output of %s on %s not collected now: %s", slot.run.id,
                         live.execution_id, slot.node, error.message)
                return False
            events, after = page["events"], page["next"]
            # The page and the execution's state are one snapshot of the agent.
            done = has_ended(page["execution"], after, page.get("truncated_seq"))
            when = {k: v if v is not None else when[k]
                    for k, v in times(page["execution"]).items()}
            if events or done or record is None:
                record = await self._add(slot, where, events, archived=done,
                                         truncated_seq=page.get("truncated_seq"), **when)
            if done:
                return True
            if not events or after <= since:
                return False  # running, and every line so far is stored
            since = after

    async def _add(self, slot: Slot, where: dict[str, Any], events: list[dict[str, Any]],
                   archived: bool, truncated_seq: int | None = None,
                   **when: Any) -> ExecutionRecord:
        record: ExecutionRecord = await self.store.call(
            "add_output", slot.run.owner, slot.run.id, **where, events=events,
            archived=archived, truncated_seq=truncated_seq, **when)
        return record


def known(registry: NodeRegistry, names: Iterable[str]) -> list[str]:
    """The names that are nodes the controller knows (a playbook's `localhost` is not)."""
    return [name for name in dict.fromkeys(names) if registry.get(name) is not None]
