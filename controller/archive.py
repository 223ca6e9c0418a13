"""Runs on the controller's side of the agents: recording, ending, watching a command run's
executions, and keeping the output of a run's executions once it has ended (docs/runs.md).

Every call to an agent carries the caller's own token, so a run's owner only ever collects or
reads executions the agents would show them anyway; no token is ever stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from marco.client import AsyncAgentClient
from marco.discovery import NodeRegistry
from marco.errors import AgentUnreachable, AuthenticationError, Conflict, MarcoError, NotFound
from marco.runs import COUNTS, status_from_stats

from .connector import AgentConnector
from .runstore import Run, RunStoreThread, StoredOutput, new_run_id

log = logging.getLogger(__name__)

OUTPUT_PAGE_LINES = 20_000     # lines asked per output request while collecting
WATCH_FIRST_POLL = 0.2         # seconds between a command run's execution checks, growing
WATCH_MAX_POLL = 2.0           # to at most this
WATCH_UNREACHABLE_TRIES = 5    # failed checks in a row before a node counts as unreachable
def outcome_of(error: MarcoError) -> str:
    """How a host that did not start its part of a run counts: unreachable, or failed."""
    return "unreachable" if isinstance(error, AgentUnreachable) else "failed"


@dataclass(frozen=True)
class TaggedExecution:
    """An execution on one host that belongs to a run."""

    host: str
    execution_id: str
    task_id: str | None


class RunKeeper:
    """The runs the controller keeps: its store (in its own thread), and the background work
    that follows a run (watching a command run, collecting output once it has ended)."""

    def __init__(self, store: RunStoreThread, connector: AgentConnector,
                 registry: NodeRegistry, stale_after: float | None = None) -> None:
        self.store = store
        self.connector = connector
        self.registry = registry
        # A running run idle this long ends as interrupted: the controller's token max age,
        # after which no token of its owner can send to it any more (None: never).
        self.stale_after = stale_after
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """At start-up: runs left running by the previous process are interrupted, then the
        store is pruned to its bounds."""
        interrupted = await self.store.call("interrupt_running")
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
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()

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
        """End the run now and collect its output from the agents in the background; Conflict
        (409) if it has ended already: the store decides in one transaction, so of two racing
        ends (watcher, recap, POST .../finish) one wins and collects, once."""
        run: Run = await self.store.call("update", owner, run_id, status=status,
                                         ended=time.time(), stats=stats)
        self.spawn(self.collect(run, token))
        return run

    async def results_arrived(self, run: Run, token: str, events: list[dict[str, Any]]) -> None:
        """A batch of the run's events has been stored: collect the output of the executions
        its host results name now, while the agents still hold it (not yet wired)."""

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
            await self.store.call("append_events", run.owner, run.id, [
                {"type": "execution", "time": time.time(), "host": host, "execution_id": eid,
                 "task_id": None} for host, eid in started.items()])
        self.spawn(self.watch(run, token, started, settled))

    async def watch(self, run: Run, token: str, started: dict[str, str],
                    settled: dict[str, str]) -> None:
        """Wait until every execution of a command run has exited, then end the run: `failed`
        if any rc is not 0 or a host is settled as failed, else `unreachable` if a host could
        not be reached, else `ok`."""
        stats: dict[str, dict[str, int]] = {
            host: {**dict.fromkeys(COUNTS, 0), count: 1} for host, count in settled.items()}
        exits = await asyncio.gather(*(self._wait_exit(host, eid, token)
                                       for host, eid in started.items()))
        stats.update(zip(started, exits, strict=True))
        try:
            await self.finish(run.owner, run.id, status_from_stats(stats), token, stats)
        except Conflict as error:  # ended by someone else meanwhile (POST .../finish)
            log.info("run %s was ended before its watcher: %s", run.id, error.message)
        except MarcoError as error:
            log.info("run %s was not ended by its watcher: %s", run.id, error.message)

    async def _wait_exit(self, host: str, execution_id: str, token: str) -> dict[str, Any]:
        """One execution's counts once it has exited (`rc` given); unreachable after several
        failed checks in a row; a refused token (expired while waiting) ends the wait too."""
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

    # -- output -----------------------------------------------------------------------------------

    async def tagged(self, run: Run, client: AsyncAgentClient, host: str) -> list[TaggedExecution]:
        """The run's executions on one agent: those its events name (command runs) and those
        the agent lists tagged with it (a playbook's). The tag is checked here too: an agent
        older than tags ignores the filter and lists every execution of the caller."""
        found = {e.execution_id: e for e in await self._named(run, host)}
        for summary in await client.executions(run=run.id):
            tags = summary.get("tags") or {}
            if tags.get("run") == run.id and summary["id"] not in found:
                found[summary["id"]] = TaggedExecution(host, summary["id"], tags.get("task"))
        return list(found.values())

    async def _named(self, run: Run, host: str) -> list[TaggedExecution]:
        events: list[dict[str, Any]] = await self.store.call("events", run.owner, run.id)
        return [TaggedExecution(host, str(e["execution_id"]), e.get("task_id"))
                for e in events if e.get("type") == "execution" and e.get("host") == host]

    async def collect(self, run: Run, token: str) -> None:
        """Store the output of each of the run's executions, host by host, concurrently; a host
        that cannot be reached keeps its executions listed as not archived."""
        await asyncio.gather(*(self._collect_host(run, host, token) for host in run.hosts))
        log.info("run %s of %s: output collected", run.id, run.owner)

    async def _collect_host(self, run: Run, host: str, token: str) -> None:
        node = self.registry.get(host)
        if node is None:
            return  # not a Marco node (a playbook's local host, say)
        client = self.connector.client(node, token)
        try:
            executions = await self.tagged(run, client, host)
        except MarcoError as error:
            log.info("run %s: cannot list executions on %s: %s", run.id, host, error.message)
            for execution in await self._named(run, host):
                await self._put(run, execution, [], archived=False)
            return
        for execution in executions:
            try:
                events = await read_output(client, execution.execution_id)
            except MarcoError as error:
                log.info("run %s: output of %s on %s not collected: %s", run.id,
                         execution.execution_id, host, error.message)
                await self._put(run, execution, [], archived=False)
                continue
            await self._put(run, execution, events, archived=True)

    async def _put(self, run: Run, execution: TaggedExecution, events: list[dict[str, Any]],
                   archived: bool) -> None:
        """Store one execution's output; over the storage caps it is left out (logged): the
        run itself stays."""
        try:
            await self.store.call("put_output", run.owner, run.id,
                                  StoredOutput(host=execution.host,
                                               execution_id=execution.execution_id,
                                               task_id=execution.task_id, events=events,
                                               archived=archived))
        except MarcoError as error:
            log.warning("run %s: output of %s on %s not stored: %s", run.id,
                        execution.execution_id, execution.host, error.message)

    async def outputs(self, run: Run, token: str, host: str | None) -> list[dict[str, Any]]:
        """The run's output: what is stored, plus what the agents still hold of executions
        not stored yet (a running run, or one being collected)."""
        stored: list[StoredOutput] = await self.store.call("outputs", run.owner, run.id,
                                                           host=host)
        answer = [output_json(o) for o in stored]
        have = {(o.host, o.execution_id) for o in stored}
        hosts = [h for h in run.hosts if host is None or h == host]
        live = await asyncio.gather(*(self._live_host(run, h, token, have) for h in hosts))
        return answer + [item for items in live for item in items]

    async def _live_host(self, run: Run, host: str, token: str,
                         have: set[tuple[str, str]]) -> list[dict[str, Any]]:
        node = self.registry.get(host)
        if node is None:
            return []
        client = self.connector.client(node, token)
        answer = []
        try:
            for execution in await self.tagged(run, client, host):
                if (host, execution.execution_id) in have:
                    continue
                events = await read_output(client, execution.execution_id)
                answer.append({"host": host, "execution_id": execution.execution_id,
                               "task_id": execution.task_id, "events": events,
                               "archived": False})
        except MarcoError as error:
            log.debug("run %s: live output from %s unavailable: %s", run.id, host,
                      error.message)
        return answer


def output_json(output: StoredOutput) -> dict[str, Any]:
    return {"host": output.host, "execution_id": output.execution_id,
            "task_id": output.task_id, "events": output.events, "archived": output.archived}


async def read_output(client: AsyncAgentClient, execution_id: str) -> list[dict[str, Any]]:
    """Every output event the agent holds of one execution, page by page."""
    events: list[dict[str, Any]] = []
    since = 0
    while True:
        page = await client.output(execution_id, since=since, limit=OUTPUT_PAGE_LINES)
        events.extend(page["events"])
        if not page["events"] or page["next"] <= since:
            return events
        since = page["next"]
