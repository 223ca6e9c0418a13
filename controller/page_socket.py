"""One WebSocket per page, /page-socket (issue 15): every node's status and the user's own
live output, multiplexed, each message tagged with its node (docs/protocol.md has the message
set).

The page authenticates with its login cookie (same origin: Tornado's `check_origin` stays on)
and then watches the nodes it shows. For each watched node the controller
- fans out the node's status from one upstream service subscription (`StatusHub`), whatever
  the number of pages showing it, batched per page: one `statuses` frame per flush interval
  carries the newest status of every node that sent one (a frame per node per page per second
  cost the controller as much as the relay did);
- shares one upstream /v1/stream per (user, node) among the user's pages, opened with a page's
  token (the agent sends a user's socket that user's events only), for the live events
  (started, output, exit);
- answers replays and stops of that page alone, over the agent's HTTP API with the page's own
  token, one replay per node at a time so answers come in the order asked.
Every bound is a `PageLimits` field.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marco.bounded_socket import BoundedWebSocket, message_size
from marco.client import AgentStream
from marco.errors import AuthenticationError, BadRequest, MarcoError, TooManySockets, to_body
from marco.protocol import (
    CLOSE_BAD_MESSAGE,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    decode,
    encode,
)

from .config import ControllerConfig
from .context import ControllerContext
from .session import SessionMixin
from .status_hub import StatusHub, event_object, tagged

log = logging.getLogger(__name__)

CLOSE_NO_NODE = 4404       # a `gone` code: the controller does not know the node
CLOSE_UNREACHABLE = 4502   # a `gone` code: the node's agent could not be reached or dropped
# Events of the shared upstream that are the user's live output; the rest (hello, replies to
# messages the controller never sends on it) are not fanned out.
LIVE_EVENTS = frozenset({"started", "output", "exit"})


@dataclass(frozen=True)
class PageLimits:
    """The page socket's bounds."""

    max_nodes: int = 64                 # nodes one page watches at once
    max_pages_per_user: int = 32        # page sockets one user holds open at once
    max_pending_bytes: int = 16 << 20   # queued for one page: beyond, it is closed (4408)
    replays_at_once: int = 4            # replays and stops of one page asking agents at once
    replay_lines: int = 1000            # lines one replay answers at most
    status_flush_seconds: float = 0.25  # statuses of all nodes go to a page at most this often,
                                        # in one `statuses` frame (the newest of each node)

    @classmethod
    def of(cls, config: ControllerConfig) -> PageLimits:
        """The bounds from the controller's settings (page_*)."""
        return cls(max_nodes=config.page_max_nodes, max_pages_per_user=config.page_max_per_user,
                   max_pending_bytes=config.page_max_pending_bytes,
                   replays_at_once=config.page_replays_at_once,
                   status_flush_seconds=config.page_status_flush)


class OutputFeed:
    """One user's live output from one node: one upstream, shared by that user's pages."""

    def __init__(self, hub: PageHub, user: str, node: str) -> None:
        self.hub, self.user, self.node = hub, user, node
        self.pages: set[PageSocket] = set()
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stream: AgentStream | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, token: str) -> None:
        self._task = asyncio.ensure_future(self._run(token))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.stream is not None:
            self.stream.close()
        if not self.ready.done():
            self.ready.set_exception(MarcoError("no page watches the node any more"))
            self.ready.exception()  # retrieved: nobody may be waiting

    async def _run(self, token: str) -> None:
        code, reason = CLOSE_UNREACHABLE, "the node's stream closed"
        try:
            await self._follow(token)
        except asyncio.CancelledError:
            raise
        except MarcoError as error:
            code = CLOSE_UNAUTHORIZED if isinstance(error, AuthenticationError) else code
            reason = f"agent unreachable: {error.message}"
            if not self.ready.done():
                self.ready.set_exception(error)
                self.ready.exception()
        self.hub.feed_ended(self, code, reason)

    async def _follow(self, token: str) -> None:
        node = self.hub.ctx.registry.get(self.node)
        if node is None:
            raise MarcoError("no such node")
        self.stream = self.hub.ctx.connector.client(node, token).stream()
        self.ready.set_result(await self.stream.connect())
        while (text := await self.stream.read_text()) is not None:
            data = event_object(text)
            if data is None or data["type"] not in LIVE_EVENTS:
                continue
            message = tagged(data, self.node)
            for page in list(self.pages):
                page.deliver(self.node, message)


class PageHub:
    """The page sockets' shared state: status feeds, output feeds, pages per user."""

    def __init__(self, ctx: ControllerContext, limits: PageLimits | None = None) -> None:
        self.ctx = ctx
        self.limits = limits or PageLimits.of(ctx.config)
        self.status = StatusHub(ctx.registry, ctx.connector, ctx.pusher.service_signer)
        self.feeds: dict[tuple[str, str], OutputFeed] = {}
        self.pages: dict[str, set[PageSocket]] = {}
        # A page shares its user's feeds, opened with another page's token: a logout of this
        # page's own token must close it at once, not when that feed ends.
        ctx.pusher.on_revoked(self.revalidate)

    def revalidate(self) -> None:
        """Close every page whose own login was just voided (logout, log out everywhere)."""
        for pages in list(self.pages.values()):
            for page in list(pages):
                if not page.token_valid():
                    page.close(CLOSE_UNAUTHORIZED, "login expired or logged out")
                    page._forget()

    async def join(self, page: PageSocket, node: str) -> dict[str, Any]:
        """Add `page` to its user's feed of `node`; the `hello` for it: the upstream's own when
        the page joined before it came, else the user's executions as listed now."""
        assert page.user is not None and page.token_value is not None
        key = (page.user, node)
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = OutputFeed(self, page.user, node)
            feed.start(page.token_value)
        early = not feed.ready.done()
        feed.pages.add(page)
        hello = await asyncio.shield(feed.ready)
        if early:
            return dict(hello)
        executions = await page.agent(node).executions()
        return {"type": "hello", "user": page.user, "node": node, "executions": executions}

    def leave(self, page: PageSocket, node: str) -> None:
        """`page` no longer watches `node`: the feed closes with its last page."""
        assert page.user is not None
        feed = self.feeds.get((page.user, node))
        if feed is None:
            return
        feed.pages.discard(page)
        if not feed.pages:
            del self.feeds[(page.user, node)]
            feed.close()

    def feed_ended(self, feed: OutputFeed, code: int, reason: str) -> None:
        """A feed's upstream closed: its pages are told the node is gone (they watch again)."""
        if self.feeds.get((feed.user, feed.node)) is feed:
            del self.feeds[(feed.user, feed.node)]
        for page in list(feed.pages):
            page.gone(feed.node, code, reason)

    def upstreams(self) -> dict[str, int]:
        """Upstream sockets held for pages now: status and output."""
        output = sum(1 for feed in self.feeds.values() if feed.ready.done()
                     and feed.ready.exception() is None)
        return {"status": self.status.upstreams(), "output": output}


@dataclass
class Watch:
    """One node a page watches: live events held until its hello is sent, its replay order."""

    status: Callable[[str], None]
    held: list[str] | None = field(default_factory=list)
    held_bytes: int = 0
    order: asyncio.Lock = field(default_factory=asyncio.Lock)


class PageSocket(SessionMixin, BoundedWebSocket):
    """One page's socket: the nodes it watches, their status and its user's output."""

    def initialize(self, ctx: ControllerContext, hub: PageHub) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.hub = hub
        self.user: str | None = None
        self.token_value: str | None = None
        self.watching: dict[str, Watch] = {}
        self.pending_bytes = 0
        self.closed = False
        self.asking = asyncio.Semaphore(hub.limits.replays_at_once)
        self.statuses: dict[str, str] = {}  # node -> its newest status, not sent yet
        self._flush: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def open(self) -> None:
        user, token = self.current_user, self.token()
        if not user or not token:
            self.close(CLOSE_UNAUTHORIZED, "log in first")
            return
        pages = self.hub.pages.setdefault(user, set())
        if len(pages) >= self.hub.limits.max_pages_per_user:
            self.close(4429, f"{len(pages)} pages of yours are open (the limit is "
                       f"{self.hub.limits.max_pages_per_user})")
            return
        self.set_nodelay(True)
        self.user, self.token_value = user, token
        pages.add(self)
        # The socket lives no longer than its login: it closes (4401) when the token expires.
        self._expiry = asyncio.get_running_loop().call_later(
            max(self.ctx.signer.expires_at(token) - time.time(), 0), self.close,
            CLOSE_UNAUTHORIZED, "login expired")
        self.send(encode({"type": "ready", "user": user,
                          "max_nodes": self.hub.limits.max_nodes}))

    def agent(self, node: str) -> Any:
        """The agent's HTTP client for `node` with this page's token (MarcoError: unknown)."""
        known = self.ctx.registry.get(node)
        if known is None:
            raise MarcoError(f"no node named {node!r}")
        return self.ctx.connector.client(known, self.token_value)

    def token_valid(self) -> bool:
        try:
            self.ctx.signer.verify(self.token_value, self.ctx.revocations.not_before,
                                   self.ctx.denied.denied)
        except AuthenticationError:
            return False
        return True

    async def on_message(self, message: str | bytes) -> None:
        try:
            data = decode(message)
            if not isinstance(data, dict) or not isinstance(data.get("type"), str) \
                    or not isinstance(data.get("node", ""), str):
                raise ValueError("not a message object")
        except ValueError:
            self.close(CLOSE_BAD_MESSAGE, "messages must be JSON objects with a type")
            return
        if self.user is None:
            return
        if not self.token_valid():  # every message re-checks expiry and logouts
            self.close(CLOSE_UNAUTHORIZED, "login expired or logged out")
            return
        try:
            await self._dispatch(data)
        except MarcoError as error:
            self.reply(data, error)

    async def _dispatch(self, data: dict[str, Any]) -> None:
        kind, node = data["type"], data.get("node", "")
        if kind == "watch":
            await self.watch(node)
        elif kind == "unwatch":
            self.unwatch(node)
        elif kind == "replay":
            await self.replay(node, str(data.get("id", "")), data.get("since", 0),
                              data.get("limit"))
        elif kind == "stop":
            await self.stop(node, str(data.get("id", "")))
        elif kind == "ping":
            self.send(encode({"type": "pong", "data": data.get("data")}))
        else:
            raise BadRequest(f"unknown message type {kind!r}")

    def reply(self, data: dict[str, Any], error: MarcoError) -> None:
        """An error answering one message, tagged with its node and what was asked."""
        body = {"type": "error", **to_body(error), "request": data.get("type")}
        for key in ("node", "id"):
            if isinstance(data.get(key), str):
                body[key] = data[key]
        self.send(encode(body))

    # -- watching ---------------------------------------------------------------------------

    async def watch(self, node: str) -> None:
        """Status and the user's output of `node` from now on, after a `hello` for it."""
        if node in self.watching:
            return
        if len(self.watching) >= self.hub.limits.max_nodes:
            raise TooManySockets(f"this page watches {len(self.watching)} nodes (the limit is "
                                 f"{self.hub.limits.max_nodes})")
        if self.ctx.registry.get(node) is None:
            self.gone(node, CLOSE_NO_NODE, "no such node", watched=False)
            return
        watch = self.watching[node] = Watch(functools.partial(self.send_status, node))
        self.hub.status.watch(node, watch.status)
        try:
            hello = await self.hub.join(self, node)
        except MarcoError as error:
            if self.watching.get(node) is watch:
                self.gone(node, CLOSE_UNREACHABLE, f"agent unreachable: {error.message}")
            return
        if self.watching.get(node) is not watch:
            return  # unwatched (or the page closed) meanwhile
        self.send(tagged(hello, node))
        for message in watch.held or ():
            self.send(message)
        watch.held = None

    def unwatch(self, node: str) -> None:
        watch = self.watching.pop(node, None)
        if watch is None:
            return
        self.statuses.pop(node, None)  # nothing of it after its `gone` or unwatch
        self.hub.status.unwatch(node, watch.status)
        self.hub.leave(self, node)

    def send_status(self, node: str, message: str) -> None:
        """Keep `node`'s newest status for the next `statuses` frame."""
        self.statuses[node] = message
        if self._flush is None and not self.closed:
            self._flush = asyncio.get_running_loop().call_later(
                self.hub.limits.status_flush_seconds, self._send_statuses)

    def _send_statuses(self) -> None:
        self._flush = None
        batch, self.statuses = self.statuses, {}
        if batch:  # the statuses' own text, joined: nothing is encoded again per page
            self.send('{"type":"statuses","statuses":[' + ",".join(batch.values()) + "]}")

    def gone(self, node: str, code: int, reason: str, watched: bool = True) -> None:
        """Tell the page `node` is no longer watched (it may watch it again later)."""
        if watched:
            self.unwatch(node)
        if code == CLOSE_UNAUTHORIZED and not self.token_valid():
            self.close(CLOSE_UNAUTHORIZED, "login expired or logged out")
            return
        if code == CLOSE_UNAUTHORIZED:
            code = CLOSE_UNREACHABLE  # another page's login ended: this one watches again
        self.send(encode({"type": "gone", "node": node, "code": code, "reason": reason[:200]}))

    def deliver(self, node: str, message: str) -> None:
        """A live event of `node` from the user's feed: held until the page has its hello."""
        watch = self.watching.get(node)
        if watch is None:
            return
        if watch.held is not None:
            # Bounded like what waits to be written: a page that cannot take it is closed.
            watch.held_bytes += message_size(message)
            if self.pending_bytes + watch.held_bytes > self.hub.limits.max_pending_bytes:
                log.warning("closing a page socket of %s: too much held for %s", self.user,
                            node)
                self.close(CLOSE_SLOW_CONSUMER, "too slow: reconnect")
                self._forget()
                return
            watch.held.append(message)
        else:
            self.send(message)

    # -- replay and stop, this page's alone -------------------------------------------------

    async def replay(self, node: str, execution_id: str, since: Any, limit: Any) -> None:
        """Stored output of one execution from `since`, then `replayed` with the next seq."""
        watch = self.watching.get(node)
        if watch is None:
            raise BadRequest(f"watch {node!r} before replaying its output")
        since = since if isinstance(since, int) and not isinstance(since, bool) else 0
        most = self.hub.limits.replay_lines
        limit = min(limit, most) if isinstance(limit, int) and limit > 0 else most
        async with watch.order, self.asking:
            answer = await self.agent(node).output(execution_id, max(since, 0), limit)
        if self.watching.get(node) is not watch:
            return  # unwatched meanwhile: a later watch's replays must not get this answer
        for event in answer["events"]:
            self.send(tagged(event, node))
        execution = answer["execution"]
        self.send(tagged({"type": "replayed", "id": execution_id, "next": answer["next"],
                          "complete": answer["next"] >= execution.get("next_seq", 0),
                          "execution": execution}, node))

    async def stop(self, node: str, execution_id: str) -> None:
        if node not in self.watching:
            raise BadRequest(f"watch {node!r} before stopping its executions")
        async with self.asking:
            await self.agent(node).stop(execution_id)

    # -- sending ----------------------------------------------------------------------------

    def pending_limit(self) -> int:
        return self.hub.limits.max_pending_bytes

    def too_slow(self, size: int) -> None:
        log.warning("closing a slow page socket of %s", self.user)
        self.close(CLOSE_SLOW_CONSUMER, "too slow: reconnect")

    def _forget(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        if self._flush is not None:
            self._flush.cancel()
        for node in list(self.watching):
            self.unwatch(node)
        if self.user is not None:
            pages = self.hub.pages.get(self.user, set())
            pages.discard(self)
            if not pages:
                self.hub.pages.pop(self.user, None)
