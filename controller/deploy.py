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
from typing import Any

import tornado.web

from agent.client import AsyncAgentClient
from agent.errors import BadRequest, MarcoError

from .api import chosen_nodes
from .session import ApiHandler

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 2
MAX_DEPLOY_BYTES = 1 << 40


class AgentUpload:
    """One agent's side of a fan-out: a bounded queue feeding a streamed PUT."""

    def __init__(self, name: str, client: AsyncAgentClient, path: str, mode: int | None,
                 overwrite: bool) -> None:
        self.name = name
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_CHUNKS)
        self.task = asyncio.ensure_future(
            client.put_file(self.queue.get, path, mode=mode, overwrite=overwrite))

    async def feed(self, chunk: bytes) -> None:
        """Queue a chunk unless this upload already ended (failed early)."""
        if self.task.done():
            return
        put = asyncio.ensure_future(self.queue.put(chunk))
        await asyncio.wait({put, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()

    async def result(self) -> dict[str, Any]:
        await self.feed(b"")  # end of body
        try:
            return {"ok": True, **(await self.task)}
        except MarcoError as error:
            return {"ok": False, "error": error.code, "message": error.message}


class FanOut:
    """Streams one body to several agents concurrently."""

    def __init__(self, uploads: list[AgentUpload]) -> None:
        self.uploads = uploads
        self.size = 0

    async def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        await asyncio.gather(*(upload.feed(chunk) for upload in self.uploads))

    async def finish(self) -> dict[str, dict[str, Any]]:
        results = await asyncio.gather(*(upload.result() for upload in self.uploads))
        return {upload.name: result for upload, result in zip(self.uploads, results)}

    def abort(self) -> None:
        for upload in self.uploads:
            upload.task.cancel()


def target_path(folder: str, name: str) -> str:
    if not name or "/" in name or name in {".", ".."} or "\0" in name:
        raise BadRequest("the file name must be a plain name (no '/')")
    return posixpath.join(folder or "~", name)


@tornado.web.stream_request_body
class DeployApi(ApiHandler):
    """PUT /api/deploy?nodes=a,b&folder=~/x&name=f&overwrite=1&mode=0644&command=...

    Streams the body to every chosen node, then starts `command` (if any) in `folder` on each
    node that received the file. Answers per node: done, or the agent's error.
    """

    fanout: FanOut | None = None

    async def prepare(self) -> None:
        super().prepare()
        if self.request.method != "PUT":
            return
        self.request.connection.set_max_body_size(MAX_DEPLOY_BYTES)  # type: ignore[union-attr]
        self.check_xsrf_cookie()
        self.require_user()
        names = [n for n in self.get_query_argument("nodes", "").split(",") if n]
        nodes = chosen_nodes(self.ctx, names)
        self.folder = self.get_query_argument("folder", "~") or "~"
        path = target_path(self.folder, self.get_query_argument("name", ""))
        mode_text = self.get_query_argument("mode", "")
        try:
            mode = int(mode_text, 8) if mode_text else None
        except ValueError:
            raise BadRequest("mode must be octal, e.g. 0644") from None
        overwrite = self.get_query_argument("overwrite", "1") in {"1", "true", "yes"}
        token = self.token()
        self.nodes = nodes
        self.fanout = FanOut([AgentUpload(n.name, AsyncAgentClient(n.host, n.port, token), path,
                                          mode, overwrite) for n in nodes])

    async def data_received(self, chunk: bytes) -> None:
        if self.fanout is not None:
            await self.fanout.feed(chunk)

    async def put(self) -> None:
        assert self.fanout is not None
        results = await self.fanout.finish()
        command = self.get_query_argument("command", "").strip()
        if command:
            token = self.token()
            label = f"deploy {self.get_query_argument('name', '')}"

            async def start(node: Any) -> None:
                result = results[node.name]
                if not result["ok"]:
                    return
                try:
                    result["execution"] = await AsyncAgentClient(node.host, node.port, token).start(
                        command, cwd=self.folder, label=label)
                except MarcoError as error:
                    result["command_error"] = error.message

            await asyncio.gather(*(start(node) for node in self.nodes))
        log.info("deploy of %d bytes by %s: %s", self.fanout.size, self.current_user,
                 {name: r["ok"] for name, r in results.items()})
        self.write_json({"size": self.fanout.size, "results": results})

    def on_connection_close(self) -> None:
        if self.fanout is not None:
            self.fanout.abort()
