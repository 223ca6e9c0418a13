"""Deploy: one upload from the browser, streamed to many agents at once, then a command.

The browser PUTs the raw file; every chunk goes into a small bounded queue per agent, and each
agent's upload reads from its queue (Tornado's body_producer). Memory stays at a few chunks per
agent whatever the file size; the slowest healthy agent sets the pace; an agent that fails
(permission, exists, unreachable) drops out without stopping the others.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import urllib.parse
from typing import Any, cast

import tornado.web
from tornado.http1connection import HTTP1Connection

from marco.chunks import Coalescer
from marco.client import AsyncAgentClient
from marco.errors import BadRequest, MarcoError, UploadAborted, to_body
from marco.modes import parse_mode
from marco.runs import with_command

from .api import chosen_nodes
from .archive import outcome_of
from .runs import run_url
from .runstore import MAX_TITLE, Run
from .session import ApiHandler

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2
MAX_DEPLOY_BYTES = 1 << 40


class AgentUpload:
    """One agent's side of a fan-out: a bounded queue feeding a streamed PUT.

    An agent that takes no data for `stall_timeout` seconds is dropped (reported as failed) so
    it cannot hold up the others; aborting pushes an exception through the queue, which makes
    the body producer fail and the HTTP client close its connection (the agent then removes
    its partial file).
    """

    def __init__(self, name: str, client: AsyncAgentClient, path: str, mode: int | None,
                 overwrite: bool, stall_timeout: float) -> None:
        self.name = name
        self.stall_timeout = stall_timeout
        self.queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(QUEUE_CHUNKS)
        self.task = asyncio.ensure_future(
            client.put_file(self._next_chunk, path, mode=mode, overwrite=overwrite))
        self.failure: MarcoError | None = None

    async def _next_chunk(self) -> bytes:
        chunk = await self.queue.get()
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk

    async def feed(self, chunk: bytes) -> None:
        """Queue a chunk unless this upload already ended (failed early, or dropped)."""
        if self.task.done() or self.failure is not None:
            return
        put = asyncio.ensure_future(self.queue.put(chunk))
        done, _ = await asyncio.wait({put, self.task}, timeout=self.stall_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
        if not done:
            self.abort(UploadAborted(f"the agent took no data for {self.stall_timeout:.0f} s; "
                                     "dropped so the other nodes could go on"))

    def abort(self, reason: MarcoError) -> None:
        """Give up this upload: its producer raises `reason`, its connection closes."""
        if self.failure is None:
            self.failure = reason
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(reason)

    async def result(self) -> dict[str, Any]:
        await self.feed(b"")  # end of body
        try:
            outcome = {"ok": True, **(await asyncio.wait_for(self.task, self.stall_timeout))}
        except TimeoutError:
            self.abort(UploadAborted(f"the agent did not finish within {self.stall_timeout:.0f} s"))
            outcome = {}
        except MarcoError as error:
            self.failure = self.failure or error
            outcome = {"ok": False, **to_body(error)}
        if self.failure is not None:  # dropped: its own error says why
            self.task.cancel()
            return {"ok": False, **to_body(self.failure)}
        return outcome


class FanOut:
    """Streams one body to several agents concurrently."""

    def __init__(self, uploads: list[AgentUpload]) -> None:
        self.uploads = uploads
        self.size = 0
        self._blocks = Coalescer()  # 1 MiB blocks, not 16 KiB TLS records, go to the agents

    async def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        block = self._blocks.add(chunk)
        if block:
            await asyncio.gather(*(upload.feed(block) for upload in self.uploads))

    async def finish(self) -> dict[str, dict[str, Any]]:
        rest = self._blocks.flush()
        if rest:
            await asyncio.gather(*(upload.feed(rest) for upload in self.uploads))
        results = await asyncio.gather(*(upload.result() for upload in self.uploads))
        return {upload.name: result for upload, result in zip(self.uploads, results, strict=True)}

    def abort(self) -> None:
        for upload in self.uploads:
            upload.abort(UploadAborted("the upload was abandoned by the browser"))


def deploy_title(path: str, command: str) -> str:
    """A deploy run's title: what was copied where, and the command run after."""
    title = f"deploy {path}" + (f" && {command}" if command else "")
    return title[:MAX_TITLE]


def target_path(folder: str, name: str) -> str:
    if not name or "/" in name or name in {".", ".."} or "\0" in name:
        raise BadRequest("the file name must be a plain name (no '/')")
    return posixpath.join(folder or "~", name)


@tornado.web.stream_request_body
class DeployApi(ApiHandler):
    """PUT /api/deploy?nodes=a,b&folder=~/x&name=f&overwrite=1&mode=0644 (+ X-Marco-Command)

    Streams the body to every chosen node, then starts `command` (if any) in `folder` on each
    node that received the file. Answers per node: done, or the agent's error.
    """

    fanout: FanOut | None = None
    run: Run | None = None
    run_settled = False  # its end is in hand (watched, or finished)

    async def prepare(self) -> None:
        super().prepare()
        if self.request.method != "PUT":
            return
        cast(HTTP1Connection, self.request.connection).set_max_body_size(MAX_DEPLOY_BYTES)
        self.check_xsrf_cookie()
        self.require_user()
        names = [n for n in self.get_query_argument("nodes", "").split(",") if n]
        nodes = chosen_nodes(self.ctx, names)
        self.folder = self.get_query_argument("folder", "~") or "~"
        path = target_path(self.folder, self.get_query_argument("name", ""))
        mode = parse_mode(self.get_query_argument("mode", ""))
        overwrite = self.get_query_argument("overwrite", "1") in {"1", "true", "yes"}
        token = self.token()
        assert token is not None  # require_user verified it
        self.nodes = nodes
        stall = self.ctx.config.deploy_stall_timeout
        # The run first: over the running cap (429) no byte moves.
        command = self.command_argument()
        meta: dict[str, Any] = {"folder": self.folder, "overwrite": overwrite}
        self.run = await self.ctx.runs.create(
            str(self.current_user), "deploy", deploy_title(path, command),
            [n.name for n in nodes], with_command(meta, command) if command else meta)
        self.fanout = FanOut([AgentUpload(n.name, self.ctx.connector.client(n, token), path,
                                          mode, overwrite, stall) for n in nodes])

    async def data_received(self, chunk: bytes) -> None:
        if self.fanout is not None:
            await self.fanout.feed(chunk)

    async def put(self) -> None:
        assert self.fanout is not None and self.run is not None
        run = self.run
        results = await self.fanout.finish()
        settled = {u.name: outcome_of(u.failure) for u in self.fanout.uploads
                   if u.failure is not None}
        command = self.command_argument()
        token = self.token()
        assert token is not None  # prepare verified it
        started: dict[str, str] = {}
        if command:
            label = f"deploy {self.get_query_argument('name', '')}"

            async def start(node: Any) -> None:
                result = results[node.name]
                if not result["ok"]:
                    return
                try:
                    result["execution"] = started[node.name] = await self.ctx.connector.client(
                        node, token).start(command, cwd=self.folder, label=label,
                                           tags={"run": run.id, "host": node.name})
                except MarcoError as error:
                    result["command_error"] = error.message
                    settled[node.name] = outcome_of(error)

            await asyncio.gather(*(start(node) for node in self.nodes))
        else:  # the copy was all: the nodes it reached are done
            settled.update({name: "ok" for name, r in results.items() if r["ok"]})
        await self.ctx.runs.started(run, token, started, settled)
        self.run_settled = True
        log.info("deploy of %d bytes by %s: %s", self.fanout.size, self.current_user,
                 {name: r["ok"] for name, r in results.items()})
        self.write_json({"size": self.fanout.size, "results": results,
                         "run": {"id": run.id, "url": run_url(run.id)}})

    def command_argument(self) -> str:
        """The command to run after the copy: the `X-Marco-Command` header (URL-encoded UTF-8,
        kept out of access logs), or the `command` query argument."""
        header = self.request.headers.get("X-Marco-Command")
        if header is not None:
            return urllib.parse.unquote(header).strip()
        return self.get_query_argument("command", "").strip()

    def on_connection_close(self) -> None:
        if self.fanout is not None:
            self.fanout.abort()
        if self.run is not None and not self.run_settled:  # the browser left mid-upload
            self.run_settled = True
            token = self.token() or ""
            self.ctx.runs.spawn(self.ctx.runs.finish(self.run.owner, self.run.id,
                                                     "interrupted", token))
