"""The runs API (docs/runs.md): start a run, append its events, end it, list the caller's runs,
read one with its events, its executions and their output, each in pages. The owner is always
the token's user; another user's run answers 404, exactly like a missing one."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from marco.asciicast import EVENT_TYPE as TERM
from marco.asciicast import cast_header, cast_lines, is_frame
from marco.errors import BadRequest, Conflict, NotFound, PermissionDenied, TooManyDownloads
from marco.runs import COUNTS, END_STATUSES, RUN_ID, status_from_stats

from .archive import RunKeeper
from .context import read_limits
from .run_output import OUTPUT_DEFAULT_LINES, RunReader, strip_ansi
from .run_search import (
    SearchLimits,
    SearchQuery,
    Stop,
    check_stream,
    check_text,
    parse_cursor,
    search_run,
)
from .runstore import MAX_SEQ, Run, check_hosts
from .session import ApiHandler

log = logging.getLogger(__name__)

TERMINAL = "terminal"
# The events of a terminal run (its frames and its end) and of every other kind.
TERMINAL_EVENT_TYPES = (TERM, "recap")
OTHER_EVENT_TYPES = ("play_start", "task_start", "host_result", "execution", "recap")
EVENT_TYPES = (*OTHER_EVENT_TYPES, TERM)


def run_url(run_id: str) -> str:
    """The run's permalink on the page."""
    return f"/runs/{run_id}"


def check_new_run(body: Any) -> tuple[str, str, list[str], dict[str, Any]]:
    """kind, title, hosts and meta of a POST /api/runs body; the store checks their values."""
    if not isinstance(body, dict):
        raise BadRequest('expected {"kind": ..., "title": ...}')
    title, hosts, meta = body.get("title"), body.get("hosts", []), body.get("meta", {})
    hosts, meta = [] if hosts is None else hosts, {} if meta is None else meta
    if not isinstance(title, str) or not title.strip():
        raise BadRequest("give the run a 'title'")
    if not isinstance(hosts, list):
        raise BadRequest("'hosts' must be a list of node names")
    return str(body.get("kind")), title, list(dict.fromkeys(hosts)), meta


def check_stats(stats: Any) -> dict[str, dict[str, int]]:
    """A recap's per-host counts: host -> {ok, changed, failed, unreachable, skipped} (and `rc`
    for commands), all integers; missing counts are 0."""
    if not isinstance(stats, dict) or not all(
            isinstance(counts, dict) and all(
                name in (*COUNTS, "rc") and isinstance(n, int) and not isinstance(n, bool)
                for name, n in counts.items())
            for counts in stats.values()):
        raise BadRequest(f"a recap's 'stats' must map each host to integer counts named "
                         f"{', '.join(COUNTS)}")
    return {host: {**dict.fromkeys(COUNTS, 0), **counts} for host, counts in stats.items()}


def check_events(body: Any) -> list[dict[str, Any]]:
    """The events of a POST .../events body: known types, hosts named by strings, a recap's
    stats as counts (the store checks sizes and times, and numbers them)."""
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list) or not events:
        raise BadRequest('expected {"events": [...]} with at least one event')
    for event in events:
        if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
            raise BadRequest(f"each event needs a 'type', one of {', '.join(EVENT_TYPES)}")
        if "host" in event and not (isinstance(event["host"], str) and event["host"]):
            raise BadRequest("an event's 'host' must be a host name")
        if event["type"] == "recap":
            event["stats"] = check_stats(event.get("stats"))
        if event["type"] == TERM:
            check_frames(event.get("frames"))
    return events


def check_frames(frames: Any) -> None:
    """A `term` event's frames: a list of asciicast event lines [time, "o" or "r", text]."""
    if not isinstance(frames, list) or not all(is_frame(frame) for frame in frames):
        raise BadRequest("a term event's 'frames' must be a list of [seconds, \"o\" or "
                         "\"r\", text]")


def check_kind_events(kind: str, events: list[dict[str, Any]]) -> None:
    """Terminal runs take their frames and a recap only; `term` events go to terminal runs."""
    allowed = TERMINAL_EVENT_TYPES if kind == TERMINAL else OTHER_EVENT_TYPES
    for event in events:
        if event["type"] not in allowed:
            raise BadRequest(f"a {kind} run takes no {event['type']} events")


def event_hosts(events: list[dict[str, Any]]) -> list[str]:
    """The hosts events name, in order: results, executions, a recap's stats."""
    hosts: list[str] = []
    for event in events:
        if isinstance(event.get("host"), str):
            hosts.append(event["host"])
        if event["type"] == "recap":
            hosts.extend(event["stats"])
    return hosts


class RunsHandler(ApiHandler):
    """Shared by the runs handlers: the keeper, and the caller's own run by id."""

    @property
    def keeper(self) -> RunKeeper:
        return self.ctx.runs

    def caller(self) -> tuple[str, str]:
        """The caller's user and token (401 without a valid login)."""
        user = self.require_user()
        token = self.token()
        assert token is not None  # require_user verified it
        self.set_header("Cache-Control", "no-store")
        return user, token

    @property
    def reader(self) -> RunReader:
        return RunReader(self.keeper.store, self.keeper.connector, self.keeper.registry,
                         read_limits(self.ctx.config), self.ctx.listings)

    def int_argument(self, name: str, default: int, low: int, high: int = MAX_SEQ) -> int:
        """An integer query argument from `low` to `high` (by default the largest seq the
        store can hold), else 400."""
        text = self.get_query_argument(name, "")
        try:
            value = int(text) if text else default
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise BadRequest(f"'{name}' must be a whole number from {low} to {high}")
        return value

    async def own_run(self, user: str, run_id: str) -> Run:
        """The caller's run, or 404 (for another user's run as for a missing one)."""
        if not RUN_ID.fullmatch(run_id):
            raise NotFound(f"no run {run_id}")
        return await self.keeper.get(user, run_id)


class RunsApi(RunsHandler):
    """POST /api/runs: start a run. GET /api/runs: the caller's runs, newest first."""

    async def post(self) -> None:
        user, _ = self.caller()
        kind, title, hosts, meta = check_new_run(self.json_body())
        if kind == TERMINAL and not self.ctx.config.terminal_record:  # marco shell's recording
            raise PermissionDenied("terminal recording is off on this controller "
                                   "(terminal_record)")
        run = await self.keeper.create(user, kind, title, hosts, meta)
        self.write_json({"id": run.id, "url": run_url(run.id)}, 201)

    async def get(self) -> None:
        user, _ = self.caller()
        kind = self.get_query_argument("kind", "") or None
        status = self.get_query_argument("status", "") or None
        text = self.get_query_argument("q", "") or None
        before = self.get_query_argument("before", "") or None
        try:
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            raise BadRequest("'limit' must be a number") from None
        runs, more = await self.keeper.store.call("list", user, kind=kind, status=status,
                                                  text=text, before=before, limit=limit)
        self.write_json({"runs": [run_json(r) for r in runs], "more": more})


class RunApi(RunsHandler):
    """GET /api/runs/ID[?since=SEQ&limit=N&wait=S]: the run with its events after SEQ, at most
    N, and `more` when there are more after the last one given. With `wait`, a running run
    with no event after SEQ answers when its next batch arrives or it ends, or after S
    seconds (a long poll: an open page sees a result as it arrives)."""

    async def get(self, run_id: str) -> None:
        user, _ = self.caller()
        config = self.ctx.config
        since = self.int_argument("since", 0, 0)
        limit = self.int_argument("limit", config.runs_events_page, 1, config.runs_events_page)
        wait = self.int_argument("wait", 0, 0)
        if not wait:
            run, events, more = await self.read(user, run_id, since, limit)
            self.write_json({**run_json(run), "events": events, "more": more})
            return
        # Registered before the first read: a batch stored in between still wakes it.
        with self.keeper.signals.waiter(user, run_id) as waiter:
            run, events, more = await self.read(user, run_id, since, limit)
            if not events and run.ended is None and waiter.admitted:
                log.debug("run %s: a read of %s waits for events after %d", run_id, user, since)
                await waiter.wait(min(wait, config.runs_wait_max))
                run, events, more = await self.read(user, run_id, since, limit)
        self.write_json({**run_json(run), "events": events, "more": more})

    async def read(self, user: str, run_id: str, since: int,
                   limit: int) -> tuple[Run, list[dict[str, Any]], bool]:
        """The run, its events after `since` (at most `limit`, and runs_events_page_bytes),
        and whether more follow them."""
        run = await self.own_run(user, run_id)
        events, more = await self.keeper.store.call(
            "events_page", user, run_id, since=since, limit=limit,
            max_bytes=self.ctx.config.runs_events_page_bytes)
        return run, events, more


class RunEventsApi(RunsHandler):
    """POST /api/runs/ID/events {"events": [...]}: append events; a recap ends the run."""

    async def post(self, run_id: str) -> None:
        user, token = self.caller()
        events = check_events(self.json_body())
        run = await self.own_run(user, run_id)
        check_kind_events(run.kind, events)
        if run.ended is not None:
            raise Conflict(f"run {run_id} has ended; it takes no more events")
        # Every host the batch names is checked before anything is stored: a refused batch
        # stores nothing (the store checks the events themselves in its own transaction).
        hosts = event_hosts(events)
        check_hosts([*run.hosts, *(h for h in dict.fromkeys(hosts) if h not in run.hosts)])
        next_seq = await self.keeper.append_events(user, run_id, events)
        run = await self.keeper.add_hosts(run, hosts)
        # Results name the nodes whose executions to collect now, before a long playbook's
        # first executions leave the agents' retention.
        await self.keeper.results_arrived(run, token, events)
        recaps = [e for e in events if e["type"] == "recap"]
        if recaps:
            stats = recaps[-1]["stats"]
            try:
                await self.keeper.finish(user, run_id, status_from_stats(stats), token, stats)
            except Conflict:  # ended meanwhile by someone else, who collects its output
                pass
        self.write_json({"accepted": len(events), "next_seq": next_seq})


class RunFinishApi(RunsHandler):
    """POST /api/runs/ID/finish {"status"?}: end a run without a recap. Without a status, the
    one its stats give (those it has), else `interrupted`."""

    async def post(self, run_id: str) -> None:
        user, token = self.caller()
        body = self.json_body() or {}
        if not isinstance(body, dict):
            raise BadRequest('expected {"status": ...} or nothing')
        status = body.get("status")
        if status is not None and status not in END_STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(END_STATUSES)}")
        run = await self.own_run(user, run_id)
        if status is None:
            status = status_from_stats(run.stats) if run.stats else "interrupted"
        run = await self.keeper.finish(user, run_id, status, token)
        self.write_json(run_json(run))


class RunExecutionsApi(RunsHandler):
    """GET /api/runs/ID/executions[?host=H&task=T&live=0&offset=N&limit=M]: a page of the
    run's executions, stored and, unless `live=0`, what their agents say now (`live` in the
    answer: whether they were asked; `more`: stored executions follow, ask from `offset`
    plus the number given)."""

    async def get(self, run_id: str) -> None:
        user, token = self.caller()
        host = self.get_query_argument("host", "") or None
        task = self.get_query_argument("task", "") or None
        live = self.int_argument("live", 1, 0, 1) == 1
        most = self.ctx.config.runs_executions_page
        offset = self.int_argument("offset", 0, 0)
        limit = self.int_argument("limit", most, 1, most)
        run = await self.own_run(user, run_id)
        executions, asked, more = await self.reader.executions(
            run, token, host=host, task=task, live=live, offset=offset, limit=limit)
        self.write_json({"executions": executions, "live": asked, "more": more})


class RunOutputApi(RunsHandler):
    """GET /api/runs/ID/output?execution=E[&since=SEQ&limit=N]: one page of one execution's
    output lines, from the store, then from its agent."""

    async def get(self, run_id: str) -> None:
        user, token = self.caller()
        execution_id = self.get_query_argument("execution", "")
        if not execution_id:
            raise BadRequest("give the 'execution' whose output to read (GET "
                             "/api/runs/ID/executions lists them)")
        most = self.ctx.config.runs_output_page_lines
        since = self.int_argument("since", 0, 0)
        limit = self.int_argument("limit", min(OUTPUT_DEFAULT_LINES, most), 1, most)
        run = await self.own_run(user, run_id)
        self.write_json(await self.reader.output(run, token, execution_id, since, limit))


class RunSearchApi(RunsHandler):
    """GET /api/runs/ID/search?q=TEXT[&case=1&host=H...&task=T&stream=S&failed=1&limit=N
    &after=CURSOR]: the lines of the run's output holding the text (literal, as the page shows
    the line), counted, and a page of them. A search stops when its client goes away."""

    stop: Stop | None = None

    async def get(self, run_id: str) -> None:
        user, token = self.caller()
        config = self.ctx.config
        self.stop = Stop(config.runs_search_seconds)  # the deadline counts from the request
        query = SearchQuery(
            # Not stripped: the page looks for (and marks) the text as typed, spaces too.
            text=check_text(self.get_query_argument("q", "", strip=False),
                            config.runs_search_query_chars),
            case_sensitive=self.int_argument("case", 0, 0, 1) == 1,
            hosts=frozenset(h for h in self.get_query_arguments("host") if h),
            task=self.get_query_argument("task", "") or None,
            stream=check_stream(self.get_query_argument("stream", "")),
            failed=self.int_argument("failed", 0, 0, 1) == 1,
            limit=self.int_argument("limit", config.runs_search_hits, 1,
                                    config.runs_search_hits),
            after=parse_cursor(self.get_query_argument("after", "")))
        run = await self.own_run(user, run_id)
        limits = SearchLimits(lines=config.runs_search_lines, chars=config.runs_search_chars,
                              seconds=config.runs_search_seconds,
                              executions_page=config.runs_executions_page,
                              output_page=config.runs_output_page_lines)
        with self.ctx.searches.admit(user):  # TooManySearches when no slot is free
            answer = await search_run(self.reader, run, token, query, limits, self.stop)
        self.write_json(answer)

    def on_connection_close(self) -> None:
        """The client went away: its search stops (at its next slice, or its agent wait)."""
        if self.stop is not None:
            self.stop.leave()


def file_part(text: str) -> str:
    """A piece of a download's file name: letters, digits, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:100]


def text_lines(page: dict[str, Any], whole: bool, strip: bool) -> str:
    """An output page as plain text: each line and "\\n", after `HOST | ` (`HOST ! ` for
    stderr) for a whole run's, without escapes when `strip`."""
    parts: list[str] = []
    for event in page["events"]:
        head = f"{page['host']} {'!' if event.get('stream') == 'stderr' else '|'} " if whole else ""
        parts.extend(f"{head}{strip_ansi(line) if strip else line}\n" for line in event["lines"])
    return "".join(parts)


def json_lines(page: dict[str, Any], whole: bool, strip: bool) -> str:
    """An output page as JSON lines: one object per line, its `seq`, `time` (when the event
    has it), `stream` and `line`; a whole run's also name their host and execution."""
    where = {"host": page["host"], "execution_id": page["execution_id"]} if whole else {}
    parts: list[str] = []
    for event in page["events"]:
        time = {"time": event["time"]} if "time" in event else {}
        for index, line in enumerate(event["lines"]):
            item = {**where, "seq": event["seq"] + index, **time, "stream": event.get("stream"),
                    "line": strip_ansi(line) if strip else line}
            parts.append(json.dumps(item, ensure_ascii=False) + "\n")
    return "".join(parts)


class RunDownloadApi(RunsHandler):
    """GET /api/runs/ID/output.txt|.jsonl[?execution=E|host=H&task=T][&ansi=strip]: one
    execution's output, or the run's (its executions in the order listed, only host H's or
    task T's when given), as a file to keep; sent a page at a time as it is read, so a
    download of any size holds one page."""

    suffix = ".txt"
    content_type = "text/plain; charset=utf-8"

    def lines(self, page: dict[str, Any], whole: bool, strip: bool) -> str:
        return text_lines(page, whole, strip)

    def named(self, execution_id: str | None, host: str | None) -> bool:
        """Whether lines name their host: a whole run's (one host's are its bytes alone)."""
        return execution_id is None and host is None

    async def get(self, run_id: str) -> None:
        user, token = self.caller()
        execution_id = self.get_query_argument("execution", "") or None
        host = self.get_query_argument("host", "") or None
        task = self.get_query_argument("task", "") or None
        ansi = self.get_query_argument("ansi", "keep")
        if ansi not in ("keep", "strip"):
            raise BadRequest("'ansi' is 'keep' (the default) or 'strip'")
        strip = ansi == "strip"
        run = await self.own_run(user, run_id)
        with self.ctx.downloads.admit(user) as admitted:
            if not admitted:
                raise TooManyDownloads(
                    f"{user} has {self.ctx.downloads.per_user} downloads going on",
                    hint="wait for one to finish")
            await self.send_file(run, token, execution_id, host, task, strip)
        self.finish()

    async def send_file(self, run: Run, token: str, execution_id: str | None,
                        host: str | None, task: str | None, strip: bool) -> None:
        """The output asked for, a page at a time."""
        limit = self.ctx.config.runs_output_page_lines
        if execution_id is not None:
            pages = self.reader.pages(run, token, execution_id, limit)
            first = await anext(pages)  # an execution the run lacks is a 404, before any byte
            self.start_file([run.id, execution_id], strip)
            await self.send(first, False, strip)
            async for page in pages:
                await self.send(page, False, strip)
        else:
            self.start_file([run.id, *(p for p in (host, task) if p)], strip)
            named = self.named(None, host)
            async for execution in self.executions(run, token, host, task):
                async for page in self.reader.pages(run, token, execution, limit):
                    await self.send(page, named, strip)

    def start_file(self, parts: list[str], strip: bool) -> None:
        """The headers of an attachment named by ids only (no title: it is the user's text)."""
        name = "-".join(file_part(p) for p in parts) + ("-plain" if strip else "") + self.suffix
        self.set_header("Content-Type", self.content_type)
        self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        self.set_header("X-Content-Type-Options", "nosniff")

    async def send(self, page: dict[str, Any], whole: bool, strip: bool) -> None:
        """One page out to the client now (its memory freed before the next is read)."""
        text = self.lines(page, whole, strip)
        if text:
            self.write(text.encode("utf-8", "replace"))
            await self.flush()

    async def executions(self, run: Run, token: str, host: str | None,
                         task: str | None) -> AsyncIterator[str]:
        """The ids of the run's executions in the order listed, page by page."""
        offset, more = 0, True
        while more:
            found, _, more = await self.reader.executions(
                run, token, host=host, task=task, offset=offset,
                limit=self.ctx.config.runs_executions_page)
            for execution in found:
                yield str(execution["execution_id"])
            offset += len(found)


class RunJsonLinesApi(RunDownloadApi):
    """GET /api/runs/ID/output.jsonl: the same as JSON lines, each with its seq and time."""

    suffix = ".jsonl"
    content_type = "application/x-ndjson; charset=utf-8"

    def lines(self, page: dict[str, Any], whole: bool, strip: bool) -> str:
        return json_lines(page, whole, strip)

    def named(self, execution_id: str | None, host: str | None) -> bool:
        """Lines of more than one execution name theirs."""
        return execution_id is None


def window(value: Any, default: int) -> int:
    """A recorded window size (the run's meta, as its client gave it): 1 to 1000."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000
    return value if ok else default


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def run_cast_header(run: Run) -> dict[str, Any]:
    """The asciicast v2 header of a terminal run: its first window size, start, title, the
    session's TERM and shell (from its meta)."""
    meta = run.meta if isinstance(run.meta, dict) else {}
    return cast_header(window(meta.get("cols"), 80), window(meta.get("rows"), 24),
                       run.started, run.title, text_or_none(meta.get("term")),
                       text_or_none(meta.get("shell")))


class RunCastApi(RunsHandler):
    """GET /api/runs/ID/cast: a terminal run's recording as an asciicast v2 file, sent a page
    of events at a time as it is read (a recording of any size holds one page); 404 for a run
    of another kind, as for another user's run."""

    async def get(self, run_id: str) -> None:
        user, _ = self.caller()
        run = await self.own_run(user, run_id)
        if run.kind != TERMINAL:
            raise NotFound(f"run {run_id} is no terminal session: it has no recording")
        with self.ctx.downloads.admit(user) as admitted:
            if not admitted:
                raise TooManyDownloads(
                    f"{user} has {self.ctx.downloads.per_user} downloads going on",
                    hint="wait for one to finish")
            self.set_header("Content-Type", "application/x-asciicast")
            self.set_header("Content-Disposition",
                            f'attachment; filename="{file_part(run.id)}.cast"')
            self.write(json.dumps(run_cast_header(run), ensure_ascii=False) + "\n")
            await self.send_frames(user, run)
        self.finish()

    async def send_frames(self, user: str, run: Run) -> None:
        """Every frame of the run's events, a page of events at a time."""
        config = self.ctx.config
        since, more = 0, True
        while more:
            events, more = await self.keeper.store.call(
                "events_page", user, run.id, since=since, limit=config.runs_events_page,
                max_bytes=config.runs_events_page_bytes)
            if not events:
                return
            self.write("".join(cast_lines(events)).encode("utf-8", "replace"))
            await self.flush()
            since = events[-1]["seq"]


def run_json(run: Run) -> dict[str, Any]:
    """A run as the API answers it: its summary and its permalink."""
    return {**run.summary(), "url": run_url(run.id)}


ROUTES = [
    (r"/api/runs", RunsApi),
    (r"/api/runs/([^/]+)", RunApi),
    (r"/api/runs/([^/]+)/events", RunEventsApi),
    (r"/api/runs/([^/]+)/finish", RunFinishApi),
    (r"/api/runs/([^/]+)/executions", RunExecutionsApi),
    (r"/api/runs/([^/]+)/output", RunOutputApi),
    (r"/api/runs/([^/]+)/search", RunSearchApi),
    (r"/api/runs/([^/]+)/output\.txt", RunDownloadApi),
    (r"/api/runs/([^/]+)/output\.jsonl", RunJsonLinesApi),
    (r"/api/runs/([^/]+)/cast", RunCastApi),
]
