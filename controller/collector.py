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
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from marco.client import AsyncAgentClient
from marco.discovery import NodeRegistry
from marco.errors import AuthenticationError, MarcoError, TryAgain

from .connector import AgentConnector
from .runstore import ExecutionRecord, Run, RunStoreThread

log = logging.getLogger(__name__)

OUTPUT_PAGE_LINES = 20_000  # lines asked per output request: one page is held at a time
MAX_RETRY_DELAY = 60.0      # a final collection's retries double up to this
MEMO_RECORDS = 100_000      # execution records remembered across runs (least recent go first)


@dataclass(frozen=True)
class CollectLimits:
    """The collector's settings (runs_collect_*)."""

    per_user: int = 4            # collections of one user running at once
    queue_per_user: int = 1000   # non-final requests of one user waiting; more are dropped
    retry: float = 5.0           # first delay before a final collection is tried again
    give_up: float = 3600.0      # seconds after the run's end when retries stop


DEFAULT_LIMITS = CollectLimits()


class Outcome(enum.Enum):
    """How one collection of (run, node) went."""

    DONE = "done"        # every execution the agent lists is archived
    PENDING = "pending"  # something is left: a running execution, an agent not reached
    STOPPED = "stopped"  # nothing more to do with this token: refused, store full, run gone


@dataclass
class Slot:
    """One (run, node) to collect: the newest token asked with, whether the run has ended."""

    run: Run
    node: str
    token: str
    final: bool = False
    state: str = "queued"  # queued, running, or waiting (for a final retry)
    again: bool = False    # asked again while running: run once more after
    delay: float = 0.0     # the last retry delay (0: none yet)
    retrying: bool = False  # counted in its user's `retrying` until it is done

    @property
    def key(self) -> tuple[str, str]:
        return self.run.id, self.node


@dataclass
class UserQueue:
    """One user's collections: those running, those waiting their turn (oldest first), and
    how many final ones are being retried."""

    running: int = 0
    waiting: deque[Slot] = field(default_factory=deque)
    retrying: int = 0


class RecordMemo:
    """The stored records of the runs collected lately, by run and execution id: a long run's
    collections (one per host result) would otherwise each read all of its records from the
    store. Only the collector stores output, and `archived` and `next_seq` only grow, so a
    remembered record is at worst behind the store (its lines are then asked again and the
    store drops them)."""

    def __init__(self, limit: int = MEMO_RECORDS) -> None:
        self.limit = limit
        self._runs: OrderedDict[str, dict[str, ExecutionRecord]] = OrderedDict()
        self._count = 0

    def get(self, run_id: str) -> dict[str, ExecutionRecord] | None:
        records = self._runs.get(run_id)
        if records is not None:
            self._runs.move_to_end(run_id)
        return records

    def put(self, run_id: str, records: dict[str, ExecutionRecord]) -> None:
        self.drop(run_id)
        self._runs[run_id] = records
        self._count += len(records)
        self._trim()

    def update(self, run_id: str, record: ExecutionRecord) -> None:
        records = self._runs.get(run_id)
        if records is None:
            return
        self._count += record.execution_id not in records
        records[record.execution_id] = record
        self._trim()

    def drop(self, run_id: str) -> None:
        self._count -= len(self._runs.pop(run_id, {}))

    def _trim(self) -> None:
        while self._count > self.limit and len(self._runs) > 1:
            self.drop(next(iter(self._runs)))


class StoreFailed(Exception):
    """The run store refused a collection's write (its caps, busy, the run gone): kept apart
    from the agents' errors, which share the MarcoError ladder."""

    def __init__(self, error: MarcoError) -> None:
        super().__init__(error.message)
        self.error = error


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
        self._memo = RecordMemo()

    # -- scheduling -----------------------------------------------------------------------------

    def request(self, run: Run, node: str, token: str, final: bool = False) -> None:
        """Collect the run's executions on `node` soon. One collection per (run, node) is in
        flight: asked again meanwhile, it runs once more after. A final request (the run has
        ended) is retried until every execution there is archived."""
        slot = self._slots.get((run.id, node))
        if slot is not None:
            slot.token = token  # the newest: an older one may expire first
            if final:
                slot.run, slot.final = run, True
            if slot.state == "running":
                slot.again = True
            return
        queue = self._users.setdefault(run.owner, UserQueue())
        if not final and sum(not s.final for s in queue.waiting) >= self.limits.queue_per_user:
            log.warning("run %s of %s: collection on %s dropped (%d of the user's collections "
                        "wait already); the run's final collection picks it up", run.id,
                        run.owner, node, self.limits.queue_per_user)
            return
        slot = Slot(run, node, token, final)
        self._slots[slot.key] = slot
        queue.waiting.append(slot)
        self._pump(run.owner)

    def request_all(self, run: Run, nodes: Iterable[str], token: str,
                    final: bool = False) -> None:
        for node in dict.fromkeys(nodes):
            self.request(run, node, token, final)

    def _pump(self, owner: str) -> None:
        """Start the user's waiting collections while fewer than `per_user` run."""
        queue = self._users[owner]
        while queue.waiting and queue.running < self.limits.per_user:
            slot = queue.waiting.popleft()
            slot.state, slot.again = "running", False
            queue.running += 1
            log.debug("collecting run %s on %s (%d of at most %d at once for %s)", slot.run.id,
                      slot.node, queue.running, self.limits.per_user, owner)
            self._spawn(self._run(slot))
        if not queue.running and not queue.waiting and not queue.retrying:
            del self._users[owner]

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
            slot.state = "queued"
            queue.waiting.append(slot)
        elif outcome is Outcome.PENDING and slot.final and self._retry_later(slot, queue):
            pass
        else:
            del self._slots[slot.key]
            queue.retrying -= slot.retrying
        self._pump(slot.run.owner)

    def _retry_later(self, slot: Slot, queue: UserQueue) -> bool:
        """Schedule a final collection's next try (doubling delays); False past give-up, or
        when `queue_per_user` of the user's final collections are being retried already
        (each holds a run and a timer: a user ending many runs on a dead node would pile them
        up)."""
        if not slot.retrying:
            if queue.retrying >= self.limits.queue_per_user:
                log.warning("run %s of %s: collection on %s not retried: %d of the user's "
                            "collections are being retried already; what is not stored stays "
                            "unarchived", slot.run.id, slot.run.owner, slot.node,
                            queue.retrying)
                return False
            slot.retrying, queue.retrying = True, queue.retrying + 1
        slot.delay = min(slot.delay * 2 or self.limits.retry, MAX_RETRY_DELAY)
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
        slot.state = "queued"
        self._users[slot.run.owner].waiting.append(slot)  # kept while it is retrying
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
        """Store what the node holds of the run's executions that are not archived yet."""
        run = slot.run
        node = self.registry.get(slot.node)
        if node is None:  # gone (said goodbye) or not a node: what is stored stays listed
            log.debug("run %s: %s is not a known node now", run.id, slot.node)
            return Outcome.PENDING
        client = self.connector.client(node, slot.token)
        try:
            return await self._collect_node(slot, client)
        except AuthenticationError as error:
            log.info("run %s of %s: collection on %s stopped, the token was refused: %s",
                     run.id, run.owner, slot.node, error.message)
            return Outcome.STOPPED
        except StoreFailed as failed:
            level = logging.INFO if isinstance(failed.error, TryAgain) else logging.WARNING
            log.log(level, "run %s of %s: output from %s not stored: %s", run.id, run.owner,
                    slot.node, failed.error.message)
            return Outcome.PENDING if isinstance(failed.error, TryAgain) else Outcome.STOPPED
        except MarcoError as error:
            log.info("run %s: cannot collect from %s now: %s", run.id, slot.node, error.message)
            return Outcome.PENDING

    async def _collect_node(self, slot: Slot, client: AsyncAgentClient) -> Outcome:
        run = slot.run
        # A final collection reads the store afresh: it decides what is lost and swept.
        records = None if slot.final else self._memo.get(run.id)
        if records is None:
            records = {r.execution_id: r
                       for r in await self._store("executions", run.owner, run.id)}
            self._memo.put(run.id, records)
        listed: set[str] = set()
        pending = False
        for summary in await client.executions(run=run.id):
            tags = summary.get("tags") or {}
            if tags.get("run") != run.id:  # an agent without tags lists every execution
                continue
            listed.add(summary["id"])
            record = records.get(summary["id"])
            if record is not None and record.archived:
                continue
            try:
                pending |= not await self._collect_execution(slot, client, summary, record)
            except AuthenticationError:
                raise
            except MarcoError as error:  # this one only (forgotten meanwhile, say)
                log.info("run %s: output of %s on %s not collected now: %s", run.id,
                         summary["id"], slot.node, error.message)
                pending = True
        if pending:
            return Outcome.PENDING
        lost = [r.execution_id for r in records.values()
                if r.node == slot.node and not r.archived and r.execution_id not in listed]
        if lost:  # the agent no longer has them: asking again brings nothing
            log.info("run %s: %s no longer holds execution(s) %s; they stay unarchived", run.id,
                     slot.node, ", ".join(lost[:10]))
        elif slot.final:
            await self._store("mark_swept", run.owner, run.id, slot.node)
        return Outcome.DONE

    async def _collect_execution(self, slot: Slot, client: AsyncAgentClient,
                                 summary: dict[str, Any], record: ExecutionRecord | None) -> bool:
        """Store one execution's output from the stored next_seq on, page by page; True once
        it is archived (it has ended and every line it kept is stored)."""
        tags = summary.get("tags") or {}
        where = dict(host=str(tags.get("host") or slot.node), node=slot.node,
                     execution_id=summary["id"], task_id=tags.get("task"))
        if summary.get("no_log"):  # no output anywhere: only its record
            ended = summary.get("state") != "running"
            await self._add(slot, where, [], archived=ended)
            return ended
        since = record.next_seq if record is not None else 0
        while True:
            page = await client.output(summary["id"], since=since, limit=OUTPUT_PAGE_LINES)
            execution, events, after = page["execution"], page["events"], page["next"]
            # The page and the execution's state are one snapshot: ended and nothing after
            # `after` means every line it kept is here.
            done = execution.get("state") != "running" and (
                not events or after >= execution.get("next_seq", 0))
            if events or done or record is None:
                record = await self._add(slot, where, events, archived=done,
                                         truncated_seq=page.get("truncated_seq"))
            if done:
                return True
            if not events or after <= since:
                return False  # running, and every line so far is stored
            since = after

    async def _add(self, slot: Slot, where: dict[str, Any], events: list[dict[str, Any]],
                   archived: bool, truncated_seq: int | None = None) -> ExecutionRecord:
        record: ExecutionRecord = await self._store(
            "add_output", slot.run.owner, slot.run.id, **where, events=events,
            archived=archived, truncated_seq=truncated_seq)
        self._memo.update(slot.run.id, record)
        return record

    async def _store(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.store.call(method, *args, **kwargs)
        except MarcoError as error:
            raise StoreFailed(error) from error


def known(registry: NodeRegistry, names: Iterable[str]) -> list[str]:
    """The names that are nodes the controller knows (a playbook's `localhost` is not)."""
    return [name for name in dict.fromkeys(names) if registry.get(name) is not None]

