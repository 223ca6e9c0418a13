"""WebSocket relay /terminal/NODE (docs/terminals.md, "The controller's relay"): the page's way
to a terminal on a node. The browser never holds an agent token: it logs in with its cookie
(same origin: Tornado's `check_origin` stays on), sends the agent's `open` message without
`token`, and the relay opens the agent's /v1/terminal with the user's own token.

Binary frames pass unchanged both ways; of the agent's text messages only `started` and
`exit` reach the browser (an agent never speaks for the relay). The relay adds its own
`recording` (the run that keeps the session, or that it stopped) and `error` (what went
wrong, just before it closes). It reads the next frame of the agent only once the browser's
socket took the previous one, so a slow browser slows the agent (and so the program), never
the controller's memory. When the browser leaves, the session is detached (the agent keeps
it for its grace time); when the agent's socket ends, the browser's is closed with the same
code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import tornado.websocket

from marco.asciicast import CastRecorder, run_title
from marco.errors import BadRequest, MarcoError
from marco.protocol import CLOSE_BAD_MESSAGE, CLOSE_TAKEN_OVER, CLOSE_UNAUTHORIZED, encode
from marco.runs import COUNTS, status_from_stats, with_command
from marco.terminal_client import TerminalClient

from .archive import RunKeeper
from .config import ControllerConfig
from .context import ControllerContext
from .runstore import Run
from .session import SessionMixin

log = logging.getLogger(__name__)

CLOSE_NO_NODE = 4404       # the controller knows no such node
CLOSE_LIMIT = 4429         # terminal_relays_per_user reached
CLOSE_UNREACHABLE = 4502   # the node's agent could not be reached, or its connection broke
CLOSE_RELAY_FAILED = 1011  # the relay itself failed (a bug): said, logged, the session detached
FORWARDED = ("started", "exit")  # the agent's text messages the browser gets
RECORD_HOLD_BYTES = 16 * 1024  # output given to the recorder in pieces of about this much...
RECORD_HOLD_SECONDS = 0.02     # ...or after this long (a frame's time is that late at most)
RECORD_BEHIND = 256 * 1024     # frames held for the store past which the pump waits for it
OPEN_SECONDS = 10.0        # the browser's `open` comes within this, as the agent asks of us
DETACH_SECONDS = 5.0       # a detach that takes longer is given up (the agent's grace runs)
TERM_NAME = re.compile(r"[A-Za-z0-9._+-]{1,64}")
MAX_COMMAND = 64 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """The relay's settings (terminal_*)."""

    per_user: int = 16                # terminals of one user relayed at once
    record: bool = True               # each session kept as a run
    record_max_bytes: int = 64 << 20  # output bytes one recording takes

    @classmethod
    def of(cls, config: ControllerConfig) -> RelayLimits:
        return cls(per_user=config.terminal_relays_per_user, record=config.terminal_record,
                   record_max_bytes=config.terminal_record_max_bytes)


class TerminalRelays:
    """The terminals relayed now, counted per user, and the work left after a browser went
    (detaching its session, ending its recording)."""

    def __init__(self, limits: RelayLimits) -> None:
        self.limits = limits
        self.open: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def admit(self, user: str) -> bool:
        """Whether `user` may open one more terminal (then counted until `release`)."""
        if self.open.get(user, 0) >= self.limits.per_user:
            return False
        self.open[user] = self.open.get(user, 0) + 1
        return True

    def release(self, user: str) -> None:
        self.open[user] -= 1
        if not self.open[user]:
            del self.open[user]

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background (kept until done); its failure is logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("terminal relay work failed", exc_info=task.exception())


@dataclass(frozen=True)
class OpenRequest:
    """The browser's `open` message, checked."""

    cols: int
    rows: int
    term: str
    command: str | None
    session: str | None

    @classmethod
    def parse(cls, message: str | bytes) -> OpenRequest:
        """The `open` message, or ValueError saying what is wrong with it."""
        data = json.loads(message) if isinstance(message, str) else None
        if not isinstance(data, dict) or data.get("type") != "open":
            raise ValueError('the first message must be {"type": "open", "cols", "rows", ...}')
        cols, rows = window_size(data)
        term = data.get("term") or "xterm-256color"
        if not isinstance(term, str) or not TERM_NAME.fullmatch(term):
            raise ValueError("'term' must be 1 to 64 of A-Z a-z 0-9 . _ + -")
        command, session = data.get("command"), data.get("session")
        if command is not None and (not isinstance(command, str) or "\0" in command
                                    or len(command.encode("utf-8", "replace")) > MAX_COMMAND):
            raise ValueError("'command' must be text of at most 64 KiB, or null")
        if session is not None and (not isinstance(session, str) or not 0 < len(session) < 256):
            raise ValueError("'session' must be a session id, or null")
        return cls(cols, rows, term, command, session)


def window_size(data: dict[str, Any]) -> tuple[int, int]:
    """`cols` and `rows` of a message: whole numbers from 1 to 1000, else ValueError."""
    size = (data.get("cols"), data.get("rows"))
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000 for n in size):
        raise ValueError("'cols' and 'rows' must be whole numbers from 1 to 1000")
    return int(data["cols"]), int(data["rows"])


def recap_stats(node: str, exit_message: dict[str, Any]) -> dict[str, dict[str, int]]:
    """A terminal run's recap: ok with status 0, else failed; `rc` the exit status, or 128 +
    the signal's number for a session a signal ended (as a shell reports it)."""
    status, name = exit_message.get("status"), exit_message.get("signal")
    rc: int | None = status if isinstance(status, int) and not isinstance(status, bool) else None
    if rc is None and isinstance(name, str) and name.isalpha():
        number = getattr(signal.Signals, f"SIG{name.upper()}", None)
        rc = None if number is None else 128 + int(number)
    counts = {**dict.fromkeys(COUNTS, 0), "ok" if rc == 0 else "failed": 1}
    return {node: counts if rc is None else {**counts, "rc": rc}}


class Recording:
    """One session kept as a run of kind `terminal`: frames batched by a `CastRecorder`,
    written every 0.5 s (sooner when a batch is full), the run ended with a recap. A store
    that refuses or fails a batch stops the recording (logged, and `stopped` is told why);
    the session goes on."""

    def __init__(self, keeper: RunKeeper, run: Run, recorder: CastRecorder,
                 stopped: Callable[[str], None]) -> None:
        self.keeper, self.run, self.recorder = keeper, run, recorder
        self.stopped = stopped
        self.writing = asyncio.Lock()
        self.ended = False
        self.failed = False  # the store refused or failed a batch: nothing more is written
        # Output held for the recorder, so that it frames (and the store checks) one piece
        # per RECORD_HOLD_BYTES, not one per agent frame; given to it within RECORD_HOLD_SECONDS.
        self._held = bytearray()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Future[None] | None = None  # full batches being stored
        self._ticker = asyncio.ensure_future(self._tick())

    @classmethod
    async def start(cls, keeper: RunKeeper, user: str, node: str, request: OpenRequest,
                    started: dict[str, Any], max_bytes: int,
                    stopped: Callable[[str], None]) -> Recording:
        """A new running run for the session `started` describes."""
        meta: dict[str, Any] = {
            "node": node, "cols": request.cols, "rows": request.rows, "term": request.term,
            "shell": started.get("shell"), "command": None, "session": started.get("session")}
        if request.command is not None:  # kept whole when it fits the meta's bound
            meta = with_command(meta, request.command)
        run = await keeper.create(user, "terminal", run_title(node, request.command), [node],
                                  meta)
        return cls(keeper, run, CastRecorder(max_bytes=max_bytes), stopped)

    async def output(self, data: bytes) -> None:
        if self.failed or self.recorder.stopped:
            return
        self._held += data
        if len(self._held) < RECORD_HOLD_BYTES:
            if self._hold_timer is None:
                self._hold_timer = asyncio.get_running_loop().call_later(
                    RECORD_HOLD_SECONDS, self._release)
            return
        self._release()
        if self.recorder.pending_bytes < self.recorder.event_bytes:
            return
        # Full batches are stored while the terminal goes on; only a store RECORD_BEHIND
        # bytes behind makes the pump wait (a slow store slows the terminal, not memory).
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self.write(final=False))
        if self.recorder.pending_bytes >= RECORD_BEHIND:
            await self._writer

    def _release(self) -> None:
        """The held output to the recorder (stamped now: at most RECORD_HOLD_SECONDS late)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._held:
            self.recorder.output(bytes(self._held))
            self._held.clear()

    async def resize(self, cols: int, rows: int) -> None:
        self._release()  # the output before it stays before it
        self.recorder.resize(cols, rows)

    async def end(self, exit_message: dict[str, Any] | None, token: str) -> None:
        """The last frames, then a recap from the exit message (ok for status 0), or, when
        the session was left without one (the browser went, the agent's socket broke), the
        run ends as interrupted. Once; a store that fails here leaves the run as it is
        (logged): the session is over either way."""
        if self.ended:
            return
        self.ended = True
        self._ticker.cancel()
        if self._writer is not None:
            await self._writer
        self._release()
        self.recorder.finish()
        await self.write(final=True)
        node = self.run.hosts[0]
        stats = recap_stats(node, exit_message) if exit_message is not None else None
        if stats is not None:
            await self._store("recap not kept", self.keeper.append_events(
                self.run.owner, self.run.id, [{"type": "recap", "stats": stats}]))
        await self._store("not ended", self.keeper.finish(
            self.run.owner, self.run.id, status_from_stats(stats) if stats else "interrupted",
            token, stats))

    async def write(self, final: bool) -> None:
        """Store the batches due now (all of them when `final`)."""
        async with self.writing:
            events: list[dict[str, Any]] = []
            while not self.failed and (self.recorder.due()
                                       or (final and self.recorder.pending_bytes)):
                event = self.recorder.flush()
                if event is None:
                    break
                events.append(event)
            if not events:
                return
            refused = await self._store("recording stopped", self.keeper.append_events(
                self.run.owner, self.run.id, events))
            if refused is not None:
                self.failed = True
                self.recorder.discard()
                self.stopped(refused)

    async def _store(self, what: str, call: Coroutine[Any, Any, Any]) -> str | None:
        """Await one call of the store: None when it was done, else why not, for the user.
        A refusal (a MarcoError) says its message; a failure (anything else: a bug, a broken
        database) is logged by type and place only, as its text may quote the output."""
        try:
            await call
        except MarcoError as error:
            log.warning("terminal run %s: %s: %s", self.run.id, what, error.message)
            return error.message
        except Exception as error:  # noqa: BLE001 (the recording is optional, the terminal is not)
            place = traceback.extract_tb(error.__traceback__)[-1]
            log.error("terminal run %s: %s: the run store failed (%s at %s:%s)", self.run.id,
                      what, type(error).__name__, place.filename, place.lineno)
            return "the run store failed"
        return None

    async def _tick(self) -> None:
        """Batches held for their time are written though no more output comes."""
        while not self.failed:
            await asyncio.sleep(self.recorder.flush_seconds)
            await self.write(final=False)


class TerminalRelaySocket(SessionMixin, tornado.websocket.WebSocketHandler):
    """One browser socket relayed to one terminal session on one node."""

    def initialize(self, ctx: ControllerContext,  # type: ignore[override]
                   relays: TerminalRelays) -> None:
        super().initialize(ctx)
        self.relays = relays
        self.user: str | None = None
        self.token_value: str | None = None
        self.node = ""
        self.upstream: TerminalClient | None = None
        self.recording: Recording | None = None
        self.gone = False  # the browser's socket closed
        self.upstream_ended = False  # the agent's socket closed (or broke)
        self._opening = False
        self._left = False
        self._pump: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- the browser's side -----------------------------------------------------------------

    def open(self, node: str) -> None:
        user, token = self.current_user, self.token()
        self.node = node
        if not user or not token:
            self.fail(CLOSE_UNAUTHORIZED, "log in first")
            return
        if not self.relays.admit(user):
            self.fail(CLOSE_LIMIT, f"{self.relays.limits.per_user} terminals of yours are open "
                      "(the limit): close one first")
            return
        self.user, self.token_value = user, token
        if self.ctx.registry.get(node) is None:
            self.fail(CLOSE_NO_NODE, f"no node named {node!r} is known to the controller")
            return
        self.set_nodelay(True)  # keystrokes and their echo go at once
        self._deadline = asyncio.get_running_loop().call_later(
            OPEN_SECONDS, self.fail, CLOSE_BAD_MESSAGE,
            f"no open message within {OPEN_SECONDS:.0f} s")

    async def on_message(self, message: str | bytes) -> None:
        # Tornado delivers the next message only after this returns: a slow agent slows the
        # browser's input too, nothing queues here.
        if self.user is None or self.gone:
            return
        if self.upstream is None:
            if not self._opening:
                self._opening = True
                await self.start(message)
            return
        try:
            await self.forward(message)
        except ValueError as error:
            self.fail(CLOSE_BAD_MESSAGE, str(error))
        except MarcoError as error:  # the agent's socket broke: the pump says so
            log.info("terminal on %s: input not forwarded: %s", self.node, error.message)

    async def forward(self, message: str | bytes) -> None:
        """One browser frame to the agent: bytes, or a control message."""
        assert self.upstream is not None
        if isinstance(message, bytes):
            await self.upstream.send(message)
            return
        data = json.loads(message)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "resize":
            cols, rows = window_size(data)
            await self.upstream.resize(cols, rows)
            if self.recording is not None:
                await self.recording.resize(cols, rows)
        elif kind == "signal" and isinstance(data.get("signal"), str):
            try:
                await self.upstream.signal(data["signal"])
            except BadRequest as error:  # not a signal the agent sends
                raise ValueError(error.message) from None
        elif kind == "detach":
            await self.upstream.detach()
        else:
            raise ValueError("after open: binary input, or resize, signal or detach messages")

    def fail(self, code: int, message: str) -> None:
        """Say what happened, then close with `code`."""
        if self.gone:
            return
        try:
            self.write_message(encode({"type": "error", "code": code, "message": message}))
        except tornado.websocket.WebSocketClosedError:
            return
        self.close(code, message.encode("utf-8")[:120].decode("utf-8", "ignore"))

    def on_close(self) -> None:
        self.gone = True
        if self._deadline is not None:
            self._deadline.cancel()
        if self.user is not None:
            self.relays.release(self.user)
            self.user = None
        if self.upstream is not None:
            self.relays.spawn(self.leave())

    # -- the agent's side -------------------------------------------------------------------

    async def start(self, message: str | bytes) -> None:
        """Open the session the browser asks for, tell it (and the recording), relay."""
        if self._deadline is not None:
            self._deadline.cancel()
        try:
            request = OpenRequest.parse(message)
        except ValueError as error:
            self.fail(CLOSE_BAD_MESSAGE, str(error))
            return
        node = self.ctx.registry.get(self.node)
        if node is None:
            self.fail(CLOSE_NO_NODE, f"no node named {self.node!r} is known to the controller")
            return
        assert self.token_value is not None
        tls = self.ctx.connector.tls
        client = TerminalClient.for_node(node.host, node.port, self.token_value, tls,
                                         node.name if tls is not None else None)
        try:
            started = await client.open(request.cols, request.rows, request.term,
                                        request.command, request.session)
        except MarcoError as error:
            code = upstream_code(client)
            self.fail(code, f"the agent on {self.node} refused the terminal: {error.message}"
                      if code != CLOSE_UNREACHABLE else error.message)
            return
        self.upstream = client
        if self.gone:  # the browser left while the session started
            self.relays.spawn(self.leave())
            return
        await self.send(encode(started))
        await self.start_recording(request, started)
        self._pump = self.relays.spawn(self.relay_down())

    async def start_recording(self, request: OpenRequest, started: dict[str, Any]) -> None:
        """The session's run, when recording is on; a store that refuses it (caps, busy)
        leaves the session unrecorded (logged), never closed."""
        if not self.relays.limits.record or self.user is None:
            return
        try:
            self.recording = await Recording.start(self.ctx.runs, self.user, self.node,
                                                   request, started,
                                                   self.relays.limits.record_max_bytes,
                                                   self.recording_stopped)
        except MarcoError as error:
            log.warning("terminal of %s on %s not recorded: %s", self.user, self.node,
                        error.message)
            await self.send(encode({"type": "recording", "run": None, "url": None,
                                    "message": f"not recorded: {error.message}"}))
            return
        run_id = self.recording.run.id
        await self.send(encode({"type": "recording", "run": run_id, "url": f"/runs/{run_id}"}))

    def recording_stopped(self, why: str) -> None:
        """Tell the page that the session's recording stopped (what is kept stays readable);
        the terminal goes on."""
        if self.gone or self.recording is None:
            return
        run_id = self.recording.run.id
        try:
            self.write_message(encode({"type": "recording", "run": run_id,
                                       "url": f"/runs/{run_id}", "stopped": True,
                                       "message": f"recording stopped: {why}"}))
        except tornado.websocket.WebSocketClosedError:
            pass

    async def send(self, message: str | bytes) -> None:
        """One frame to the browser, awaited until written (a closed browser: nothing)."""
        try:
            await self.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            pass

    async def relay_down(self) -> None:
        """The agent's frames to the browser; then the recording's end and the browser's
        close with the agent's code. Ends when the agent's socket does (the session ended,
        was detached or taken over) or the browser's does. Whatever stops it, the recording
        ends and the browser's socket closes (whose close detaches the session)."""
        assert self.upstream is not None
        code, message = CLOSE_RELAY_FAILED, f"the relay of the terminal on {self.node} failed"
        try:
            code, message = await self.pump()
        finally:  # also after a bug in the pump (then logged by TerminalRelays._done)
            if self.recording is not None and self.token_value is not None:
                await self.recording.end(self.upstream.exit, self.token_value)
            if not self.gone:
                if code in (1000, 1001) and not message:
                    self.close(code)
                else:
                    self.fail(code, message or f"the terminal on {self.node} closed ({code})")

    async def pump(self) -> tuple[int, str]:
        """Relay until a socket ends: the close code for the browser, and what to say."""
        assert self.upstream is not None
        try:
            while (item := await self.upstream.read()) is not None:
                if isinstance(item, bytes):
                    if self.recording is not None:
                        await self.recording.output(item)
                    await self.send_down(item)
                elif item.get("type") in FORWARDED:
                    await self.send_down(encode(item))
                else:  # an agent never speaks for the relay (recording, error): dropped
                    log.info("terminal on %s: the agent's %.40r message not passed on",
                             self.node, item.get("type"))
            self.upstream_ended = True
            return self.upstream.close_code or 1000, ""
        except MarcoError as error:
            self.upstream_ended = True
            code = upstream_code(self.upstream)
            if code == CLOSE_TAKEN_OVER:
                return code, (f"the session on {self.node} was taken over by another "
                              "connection of yours")
            return code, f"the terminal on {self.node} ended: {error.message}"
        except tornado.websocket.WebSocketClosedError:
            self.relays.spawn(self.leave())  # the browser left: the session is detached
            return 1001, ""

    async def send_down(self, frame: str | bytes) -> None:
        """One frame to the browser, awaited until its socket took it (the kernel's buffer),
        so the pump reads no more of the agent until then: backpressure. (Not awaiting up to
        256 KiB ahead measured no faster: the kernel's buffer already does that.)"""
        await self.write_message(frame, binary=isinstance(frame, bytes))

    async def leave(self) -> None:
        """The browser left: detach the session (the agent keeps it for its grace time), end
        the recording (the pump does, as interrupted, when the agent closes after the detach;
        an agent that does not close within DETACH_SECONDS is closed on)."""
        assert self.upstream is not None
        if self._left:
            return
        self._left = True
        try:
            if not self.upstream_ended:
                await asyncio.wait_for(self.upstream.detach(), DETACH_SECONDS)
            if self._pump is not None and not self._pump.done():
                await asyncio.wait([self._pump], timeout=DETACH_SECONDS)
        except (MarcoError, TimeoutError) as error:
            log.info("terminal on %s not detached: %s", self.node, error)
        self.upstream.close()
        if self.recording is not None and self.token_value is not None:
            await self.recording.end(None, self.token_value)  # nothing if the pump ended it


def upstream_code(client: TerminalClient) -> int:
    """The code the browser's socket closes with: the agent's own (its 4xxx codes, normal
    ends), else 4502 (the agent could not be reached, or its connection broke)."""
    code = client.close_code
    if code is not None and (4000 <= code < 5000 or code in (1000, 1001)):
        return code
    return CLOSE_UNREACHABLE
