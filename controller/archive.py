"""Runs on the controller's side of the agents: recording, ending, watching a command run's
executions, and telling the output collector (controller/collector.py) when to keep the output
of a run's executions: as each is done, and finally when the run ends (docs/runs.md).

Every call to an agent carries the caller's own token, so a run's owner only ever collects or
reads executions the agents would show them anyway; no token is ever stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from marco.errors import (
    AgentUnreachable,
    AuthenticationError,
    Conflict,
    MarcoError,
    NotFound,
    TryAgain,
)
from marco.nodes import NodeRegistry
from marco.runs import COUNTS, WITHOUT_EXECUTIONS, status_from_stats

from .collector import DEFAULT_LIMITS, CollectLimits, OutputCollector, known
from .connector import AgentConnector
from .run_signals import RunSignals
from .runstore import Run, RunStoreThread, new_run_id

log = logging.getLogger(__name__)

DEFAULT_WAITING_PER_USER = 16  # the runs_max_waiting_per_user setting's default

WATCH_FIRST_POLL = 0.2         # seconds between a command run's execution checks, growing
WATCH_MAX_POLL = 2.0           # to at most this
WATCH_UNREACHABLE_TRIES = 5    # failed checks in a row before a node counts as unreachable


def outcome_of(error: MarcoError) -> str:
    """How a host that did not start its part of a run counts: unreachable, or failed."""
    return "unreachable" if isinstance(error, AgentUnreachable) else "failed"


class RunKeeper:
    """The runs the controller keeps: its store (in its own thread), and the background work
    that follows a run (watching a command run, collecting its output)."""

    def __init__(self, store: RunStoreThread, connector: AgentConnector,
                 registry: NodeRegistry, stale_after: float | None = None,
                 collect: CollectLimits = DEFAULT_LIMITS,
                 signals: RunSignals | None = None, shared: bool = False) -> None:
        self.store = store
        self.connector = connector
        self.registry = registry
        self.collector = OutputCollector(store, connector, registry, collect)
        # Requests waiting for a run's next events (GET /api/runs/ID?wait=), woken by changes.
        self.signals = signals if signals is not None else RunSignals(DEFAULT_WAITING_PER_USER)
        # A running run idle this long ends as interrupted: the controller's token max age,
        # after which no token of its owner can send to it any more (None: never).
        self.stale_after = stale_after
        # A store other controllers use too (PostgreSQL): a run left running may be theirs.
        self.shared = shared
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """At start-up: runs left running by the previous process are interrupted (unless
        other controllers share the store: those end when stale), then the store is pruned
        to its bounds."""
        interrupted = 0 if self.shared else await self.store.call("interrupt_running")
        if interrupted:
            log.info("%d run(s) left running by the previous controller marked interrupted",
                     interrupted)
        await self.prune()

    async def prune(self) -> None:
        """End stale runs, then apply the retention and size bounds (hourly, and at start)."""
        await self.interrupt_stale()
        pruned = await self.store.call("prune")
        if pruned:
            log.info("pruned %d run(s) past the retention and size bounds", pruned)

    async def interrupt_stale(self) -> int:
        """Running runs with no start or events for `stale_after` seconds end as interrupted:
        their client died without ending them, and they would hold a running slot forever."""
        if self.stale_after is None:
            return 0
        ended: int = await self.store.call("interrupt_stale", time.time() - self.stale_after)
        if ended:
            log.info("%d run(s) idle for %d s marked interrupted", ended, self.stale_after)
        return ended

    async def close(self) -> None:
        """Stop the background work (a run being collected keeps what was stored), then the
        store."""
        self.signals.close()
        await self.collector.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Off the loop: closing waits for the calls still queued, each up to the statement
        # timeout on a stalled database, and the loop keeps serving meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` after the answer; its failure is logged, never lost."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background run work failed", exc_info=task.exception())

    # -- runs -------------------------------------------------------------------------------------

    async def create(self, owner: str, kind: str, title: str, hosts: list[str],
                     meta: dict[str, Any]) -> Run:
        """A new running run of `owner` (the store refuses one over the running cap)."""
        run = Run(id=new_run_id(), owner=owner, kind=kind, title=title, hosts=hosts,
                  started=time.time(), meta=meta)
        await self.store.call("create", run)
        return run

    async def get(self, owner: str, run_id: str) -> Run:
        """The owner's run, or NotFound (another user's run is missing too)."""
        run: Run | None = await self.store.call("get", owner, run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        return run

    async def finish(self, owner: str, run_id: str, status: str, token: str,
                     stats: dict[str, dict[str, int]] | None = None) -> Run:
        """End the run now and collect the rest of its output from the agents in the
        background; Conflict (409) if it has ended already: the store decides in one
        transaction, so of two racing ends (watcher, recap, POST .../finish) one wins and asks
        for the final collection, once."""
        run: Run = await self.store.call("update", owner, run_id, status=status,
                                         ended=time.time(), stats=stats)
        self.signals.changed(run_id)
        if run.kind not in WITHOUT_EXECUTIONS:  # a terminal run has nothing on the agents
            self.spawn(self.collect_finally(run, token))
        return run

    async def append_events(self, owner: str, run_id: str,
                            events: list[dict[str, Any]]) -> int:
        """Store a batch of the run's events (the store numbers them; the next seq comes back)
        and wake the requests waiting for them."""
        next_seq: int = await self.store.call("append_events", owner, run_id, events)
        self.signals.changed(run_id)
        return next_seq

    async def collect_finally(self, run: Run, token: str) -> None:
        """The ended run's final collection, on every node it touched that is known now: its
        hosts and the nodes recorded for it (delegates, executions' nodes: `add_nodes`)."""
        try:
            nodes: list[str] = await self.store.call("nodes", run.owner, run.id)
        except MarcoError as error:  # busy, or pruned meanwhile: the hosts are still asked
            log.info("run %s: its recorded nodes not read for the final collection: %s",
                     run.id, error.message)
            nodes = []
        self.collector.request_all(run, known(self.registry, [*run.hosts, *nodes]), token,
                                   final=True)

    async def results_arrived(self, run: Run, token: str, events: list[dict[str, Any]]) -> None:
        """A batch of the run's events has been stored: collect now, while the agents still
        hold it, the output of the node each host result names (its `delegate`, else its
        `host`), and register the executions `execution` events name, so they stay listed
        even if their node goes. Nodes beyond the run's hosts are recorded first, so the final
        collection asks them even when this collection is dropped or fails."""
        nodes = known(self.registry, [
            node for e in events if e.get("type") == "host_result"
            and isinstance(node := e.get("delegate") or e.get("host"), str)])
        named = [e for e in events if e.get("type") == "execution"
                 and isinstance(e.get("host"), str) and isinstance(e.get("execution_id"), str)]
        await self.add_nodes(run, [*nodes, *known(self.registry, (e["host"] for e in named))])
        self.collector.request_all(run, nodes, token)
        await self.register(run, [(e["host"], e["execution_id"], e.get("task_id"))
                                  for e in named])

    async def add_nodes(self, run: Run, nodes: Iterable[str]) -> None:
        """Record the known nodes beyond the run's hosts its output is on; a store that
        refuses (busy, caps, too many) is logged: those nodes are then read live only."""
        new = [node for node in dict.fromkeys(nodes) if node not in run.hosts]
        if not new:
            return
        try:
            await self.store.call("add_nodes", run.owner, run.id, new)
        except MarcoError as error:
            log.warning("run %s: node(s) %s not recorded for its final collection: %s", run.id,
                        ", ".join(new[:10]), error.message)

    async def register(self, run: Run,
                       executions: Iterable[tuple[str, str, str | None]]) -> None:
        """Record executions (host, id, task) of the run with no output yet: listed as not
        archived until their output is collected. Over the storage caps they are left out
        (logged): the run stays."""
        for host, execution_id, task_id in executions:
            try:
                await self.store.call("add_output", run.owner, run.id, host=host, node=host,
                                      execution_id=execution_id, task_id=task_id, events=[])
            except MarcoError as error:
                log.warning("run %s: execution %s on %s not registered: %s", run.id,
                            execution_id, host, error.message)

    async def add_hosts(self, run: Run, hosts: Iterable[str]) -> Run:
        """Add hosts the run's events name, in the order they first appear."""
        new = [h for h in dict.fromkeys(hosts) if h not in run.hosts]
        if not new:
            return run
        updated: Run = await self.store.call("update", run.owner, run.id,
                                             hosts=[*run.hosts, *new])
        return updated

    # -- a command run's executions ---------------------------------------------------------------

    async def started(self, run: Run, token: str, started: dict[str, str],
                      settled: dict[str, str]) -> None:
        """A command (or deploy) run's executions have been started (`started`: host ->
        execution id; `settled`: host -> `failed` or `unreachable` for those that were not):
        record them as `execution` events, and end the run in the background once all have
        exited."""
        if started:  # the run's own record of its executions (collected by these ids)
            await self.append_events(run.owner, run.id, [
                {"type": "execution", "time": time.time(), "host": host, "execution_id": eid,
                 "task_id": None} for host, eid in started.items()])
            await self.register(run, ((host, eid, None) for host, eid in started.items()))
        self.spawn(self.watch(run, token, started, settled))

    async def watch(self, run: Run, token: str, started: dict[str, str],
                    settled: dict[str, str]) -> None:
        """Wait until every execution of a command run has exited, then end the run: `failed`
        if any rc is not 0 or a host is settled as failed, else `unreachable` if a host could
        not be reached, else `ok`."""
        stats: dict[str, dict[str, int]] = {
            host: {**dict.fromkeys(COUNTS, 0), count: 1} for host, count in settled.items()}
        exits = await asyncio.gather(*(self._wait_exit(run, host, eid, token)
                                       for host, eid in started.items()))
        stats.update(zip(started, exits, strict=True))
        await self._end_watched(run, token, stats)

    async def _end_watched(self, run: Run, token: str, stats: dict[str, dict[str, int]]) -> None:
        """End the watched run; a busy store (TryAgain) is asked again, waiting longer each
        time (up to runs_collect_retry_max), until runs_collect_give_up seconds have passed:
        a run left running would hold a running slot and miss its final collection."""
        limits = self.collector.limits
        delay, deadline = WATCH_FIRST_POLL, time.monotonic() + limits.give_up
        while True:
            try:
                await self.finish(run.owner, run.id, status_from_stats(stats), token, stats)
                return
            except TryAgain as error:  # the store is busy: a moment later it is not
                if time.monotonic() + delay > deadline:
                    log.warning("run %s was not ended by its watcher: the store stayed busy "
                                "for %d s", run.id, limits.give_up)
                    return
                log.info("run %s: ending it waits for the store (again in %.1f s): %s",
                         run.id, delay, error.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, limits.retry_max)
            except Conflict as error:  # ended by someone else meanwhile (POST .../finish)
                log.info("run %s was ended before its watcher: %s", run.id, error.message)
                return
            except MarcoError as error:
                log.info("run %s was not ended by its watcher: %s", run.id, error.message)
                return

    async def _wait_exit(self, run: Run, host: str, execution_id: str,
                         token: str) -> dict[str, Any]:
        """One execution's counts once it has exited (`rc` given; its output is collected at
        once); unreachable after several failed checks in a row; a refused token (expired
        while waiting) ends the wait too."""
        counts: dict[str, Any] = dict.fromkeys(COUNTS, 0)
        delay, misses = WATCH_FIRST_POLL, 0
        while True:
            node = self.registry.get(host)
            try:
                if node is None:
                    raise NotFound(f"node {host} is no longer known")
                summary = await self.connector.client(node, token).execution(execution_id)
                misses = 0
                if summary.get("state") != "running":
                    self.collector.request(run, host, token)
                    rc = summary.get("rc")
                    if isinstance(rc, int):  # none when a signal ended it
                        counts["rc"] = rc
                    counts["ok" if rc == 0 else "failed"] = 1
                    return counts
            except AuthenticationError:
                counts["unreachable"] = 1
                return counts
            except MarcoError:
                misses += 1
                if misses >= WATCH_UNREACHABLE_TRIES:
                    counts["unreachable"] = 1
                    return counts
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, WATCH_MAX_POLL)
