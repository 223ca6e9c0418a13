"""`marco shell NODE [-- COMMAND]`: a terminal on a node, like `ssh` (docs/terminals.md).

The node is found through the controller (as `marco run` finds it); the terminal goes straight
to the agent's /v1/terminal over mutual TLS with the `marco login` credentials. With a terminal
on stdin it is put in raw mode (restored on every way out), its size is the session's and
follows SIGWINCH; without one the session still runs (80x24 or $COLUMNS x $LINES, the node's
echo off: input not typed by a person is not shown, nor recorded) and the end of stdin is
typed as Ctrl-D (two after a partial last line). The session is recorded as a run of kind
`terminal` through the controller's API unless --no-record, its output slowed to the pace
of the upload past a bounded backlog; a controller that does not take it is said once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import re
import signal
import stat
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Mapping
from typing import Any

from .asciicast import CastRecorder, run_title
from .controller_client import ControllerClient
from .credentials import find_token, node_tls
from .errors import AgentUnreachable, MarcoError, UsageError
from .runs import with_command
from .terminal_client import TerminalClient

EXIT_SHELL_FAILED = 255  # as ssh: marco shell itself failed (not logged in, down, lost)
DEFAULT_SIZE = (80, 24)
DEFAULT_TERM = "xterm-256color"
TERM_NAME = re.compile(r"[A-Za-z0-9._+-]{1,64}")
READ_CHUNK = 16 * 1024  # bytes of stdin a frame at most
RECORD_INTERVAL = 0.5  # seconds between two posts of the recording (docs/terminals.md)
POST_EVENTS = 32  # term events (32 KiB each at most) one post carries: the API takes 1,000
BACKLOG_BYTES = 1 << 20  # frames waiting to be posted past which the session's output waits
FINISH_WAIT = 30.0  # seconds the end of a recording may take before we leave without it
CLOSE_WAIT = 2.0  # seconds to say goodbye to the agent when a signal ends us
EOF_KEY = b"\x04"  # Ctrl-D: what the end of a non-terminal stdin types (docs/terminals.md)
LINE_ENDS = (b"\n", b"\r", EOF_KEY)  # a last byte after which one Ctrl-D is the end of input
ENDED = {  # why the agent ended a session, as the user is told
    "idle": "no input or output for too long (the node's terminal_idle_timeout)",
    "expired": "your login expired (marco login)",
    "logged out": "your token was revoked (logged out; marco login)",
    "stopping": "the node's agent is shutting down",
    "detached": "it was left detached past the node's terminal_detach_grace",
}


def clamp(value: int) -> int:
    return max(1, min(1000, value))


def env_size(environ: Mapping[str, str]) -> tuple[int, int]:
    """$COLUMNS x $LINES when both are numbers, else 80x24."""
    try:
        return clamp(int(environ["COLUMNS"])), clamp(int(environ["LINES"]))
    except (KeyError, ValueError):
        return DEFAULT_SIZE


def term_name(environ: Mapping[str, str]) -> str:
    """The local $TERM when the agent would take it, else xterm-256color."""
    given = environ.get("TERM", "")
    return given if TERM_NAME.fullmatch(given) and given != "dumb" else DEFAULT_TERM


def status_of(message: dict[str, Any]) -> int:
    """The exit status an `exit` message gives, as a shell reports it: 128+N when signal N
    killed it (the signal wins: a status beside it may be Python's -N), else the status."""
    name = message.get("signal")
    if name:
        try:
            return 128 + signal.Signals["SIG" + str(name)].value
        except KeyError:
            return EXIT_SHELL_FAILED
    status = message.get("status")
    if isinstance(status, int) and 0 <= status <= 255:
        return status
    return EXIT_SHELL_FAILED


class LocalTerminal:
    """Our side of the terminal: stdin and stdout as file descriptors, raw mode and the
    descriptors' flags (restored on the way out), the window size."""

    def __init__(self, stdin: int = 0, stdout: int = 1,
                 environ: Mapping[str, str] | None = None) -> None:
        self.stdin, self.stdout = stdin, stdout
        self.environ = os.environ if environ is None else environ
        self.is_tty = os.isatty(stdin)
        self.raw = False
        self._pollable: dict[int, bool] = {}
        self._saved_mode: list[Any] | None = None  # what `session` changed, until `restore`
        self._saved_flags: dict[int, int] = {}

    def size(self) -> tuple[int, int]:
        """(cols, rows): the terminal's, else $COLUMNS x $LINES, else 80x24."""
        if self.is_tty:
            try:
                size = os.get_terminal_size(self.stdin)
                if size.columns and size.lines:
                    return clamp(size.columns), clamp(size.lines)
            except OSError:
                pass
        return env_size(self.environ)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Raw mode (on a terminal) and a non-blocking stdout for the session; the modes and
        flags as they were after it, whatever ends it (`restore` may come sooner)."""
        self._saved_mode = termios.tcgetattr(self.stdin) if self.is_tty else None
        self._saved_flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL)
                             for fd in (self.stdin, self.stdout)}
        try:
            if self._saved_mode is not None:
                tty.setraw(self.stdin, termios.TCSANOW)
                self.raw = True
            if self.pollable(self.stdout):
                fcntl.fcntl(self.stdout, fcntl.F_SETFL,
                            self._saved_flags[self.stdout] | os.O_NONBLOCK)
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        """The modes and flags as `session` found them (once: later calls do nothing)."""
        for fd, flags in self._saved_flags.items():
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        self._saved_flags = {}
        if self._saved_mode is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, self._saved_mode)
            self._saved_mode = None
        self.raw = False

    def pollable(self, fd: int) -> bool:
        """Whether the event loop can wait on `fd`: not for files and /dev/null, which never
        block (epoll refuses them)."""
        if fd not in self._pollable:
            mode = os.fstat(fd).st_mode
            self._pollable[fd] = not (stat.S_ISREG(mode) or (
                stat.S_ISCHR(mode) and os.path.samestat(os.fstat(fd), os.stat(os.devnull))))
        return self._pollable[fd]

    async def read(self) -> bytes:
        """The next bytes typed (b"" at the end of stdin)."""
        while True:
            if self.pollable(self.stdin):
                await self._ready(self.stdin, writer=False)
            try:
                return os.read(self.stdin, READ_CHUNK)
            except BlockingIOError:  # stdin shares stdout's non-blocking open file
                continue
            except OSError:  # a terminal hung up
                return b""

    async def write(self, data: bytes) -> None:
        """All of `data` to stdout; while the terminal is full, wait (and so read nothing more
        from the node: the agent pauses the program)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.stdout, view):]
            except BlockingIOError:
                await self._ready(self.stdout, writer=True)

    def say(self, text: str) -> None:
        """A line to stderr, with the \\r a raw terminal needs."""
        line = ("\r\n" if self.raw else "\n").join(text.split("\n")) + ("\r\n" if self.raw
                                                                        else "\n")
        with contextlib.suppress(OSError):
            os.write(2, line.encode())

    @staticmethod
    async def _ready(fd: int, writer: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if writer else loop.add_reader)(fd, wake)
        try:
            await ready
        finally:
            (loop.remove_writer if writer else loop.remove_reader)(fd)


class Recording:
    """The session kept as a run of kind `terminal` through the controller's API: created once
    the session started, its `term` events posted by one background task, several a request,
    every RECORD_INTERVAL s or as soon as a batch is full; a recap at the end. Output waits
    while more than BACKLOG_BYTES of frames wait to be posted, so a fast program is slowed to
    the controller's pace (as the relay does) instead of growing this process. The first
    refusal is said once and ends the recording, never the session."""

    def __init__(self, controller: ControllerClient, node: str, say: Any) -> None:
        self.controller, self.node, self.say = controller, node, say
        # The controller does not publish its terminal_record_max_bytes: the recorder's
        # default cap is the setting's default (64 MiB).
        self.recorder = CastRecorder()
        self.run_id: str | None = None
        self.url: str | None = None
        self.failed = False
        self.stats: dict[str, int] | None = None
        self._poster: asyncio.Task[None] | None = None
        self._ending = asyncio.Event()
        self._full = asyncio.Event()     # a batch is full: post it now
        self._posted = asyncio.Event()   # a post completed (or the poster ended)

    async def output(self, data: bytes) -> None:
        """Bytes the session wrote; waits while the backlog is over BACKLOG_BYTES."""
        if self.failed:
            return
        self.recorder.output(data)
        if self.recorder.pending_bytes >= self.recorder.event_bytes:
            self._full.set()
        while self.recorder.pending_bytes > BACKLOG_BYTES and self._posting():
            self._posted.clear()
            await self._posted.wait()

    def resize(self, cols: int, rows: int) -> None:
        if not self.failed:
            self.recorder.resize(cols, rows)

    def start(self, started: dict[str, Any], cols: int, rows: int, term: str,
              command: str | None) -> None:
        """Create the run and post its events in the background."""
        self._poster = asyncio.ensure_future(self._post_all(started, cols, rows, term, command))

    async def finish(self, stats: dict[str, int] | None) -> None:
        """The last events, then a recap with `stats` (or the run finished as interrupted).
        The poster is waited for (a run created meanwhile is ended too), at most FINISH_WAIT
        s; the backlog it has left is at most BACKLOG_BYTES."""
        if self._poster is None:
            return
        self.stats = stats
        self._ending.set()
        try:
            await asyncio.wait_for(self._poster, FINISH_WAIT)
        except TimeoutError:
            self.say("marco: the controller did not take the end of the recording in time")
            return
        if self.run_id is not None and not self.failed:
            self.say(f"recorded as run {self.run_id}  {self.url}")

    def _posting(self) -> bool:
        return self._poster is not None and not self._poster.done() and not self.failed

    async def _post_all(self, started: dict[str, Any], cols: int, rows: int, term: str,
                        command: str | None) -> None:
        try:
            await self._create(started, cols, rows, term, command)
            while not self._ending.is_set():
                await self._post_pending()
                await self._next_batch()
            self.recorder.finish()
            await self._post_pending()
            await self._end()
        except MarcoError as error:
            self.failed = True
            self.recorder.discard()
            self.say(f"marco: this session is not recorded ({error})")
        except Exception as error:  # noqa: BLE001 (the recording is optional, the shell is not)
            # A broken answer (http.client.IncompleteRead, a malformed body): the recording
            # stops as for a refusal, so output does not wait for a poster that is gone.
            self.failed = True
            self.recorder.discard()
            self.say(f"marco: this session is not recorded ({type(error).__name__})")
        finally:
            self._posted.set()  # an output waiting for room goes on

    async def _create(self, started: dict[str, Any], cols: int, rows: int, term: str,
                      command: str | None) -> None:
        meta: dict[str, Any] = {"node": self.node, "cols": cols, "rows": rows, "term": term,
                                "shell": started.get("shell"), "command": None,
                                "session": started.get("session")}
        if command is not None:  # kept whole when it fits the run's meta, as the relay does
            meta = with_command(meta, command)
        run = await self._call("/api/runs", {
            "kind": "terminal", "title": run_title(self.node, command), "hosts": [self.node],
            "meta": meta})
        self.run_id, self.url = run["id"], self.controller.permalink(run["url"])

    async def _next_batch(self) -> None:
        """Until a batch is full, the session ends, or RECORD_INTERVAL s passed."""
        wakers = [asyncio.ensure_future(self._full.wait()),
                  asyncio.ensure_future(self._ending.wait())]
        try:
            await asyncio.wait(wakers, timeout=RECORD_INTERVAL,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waker in wakers:
                waker.cancel()
        self._full.clear()

    async def _end(self) -> None:
        """The recap (or the run finished as interrupted, without one)."""
        if self.stats is None:
            await self._call(f"/api/runs/{self.run_id}/finish", {"status": "interrupted"})
        else:
            await self._post([{"type": "recap", "stats": {self.node: self.stats}}])

    async def _post_pending(self) -> None:
        """Every frame held, POST_EVENTS events a request."""
        while True:
            events: list[dict[str, Any]] = []
            while len(events) < POST_EVENTS and (event := self.recorder.flush()) is not None:
                events.append(event)
            if not events:
                return
            await self._post(events)
            self._posted.set()

    async def _post(self, events: list[dict[str, Any]]) -> None:
        assert self.run_id is not None
        await self._call(f"/api/runs/{self.run_id}/events", {"events": events})

    async def _call(self, path: str, body: Any) -> Any:
        """One controller call in a daemon thread: the session never waits for the HTTP
        client, and a call cut short by a signal does not hold up the exit (asyncio's own
        executor would be joined at the end, for up to the call's timeout)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if answer.done():
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def call() -> None:
            try:
                result, error = self.controller.call(path, body), None
            except BaseException as failure:  # handed to the awaiting task, whatever it is
                result, error = None, failure
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=call, name="marco-shell-record", daemon=True).start()
        return await answer


class ShellSession:
    """One terminal session between the local terminal and a node's agent."""

    def __init__(self, node: str, client: TerminalClient, terminal: LocalTerminal,
                 recording: Recording | None, command: str | None) -> None:
        self.node, self.client, self.terminal = node, client, terminal
        self.recording, self.command = recording, command
        self.exit: dict[str, Any] | None = None
        self.killed_by: int | None = None
        self.lost: MarcoError | None = None
        self.ending = False  # the session is over: the recording ends

    async def run(self) -> int:
        """The session from `open` to its end; the exit status to leave with. The signals
        are ours from the start (one during the connection still restores the terminal) to
        the very end (one during the recording's end leaves at once, with 128+N)."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        handled = self._signals(loop, main)
        try:
            await self._session(main)
            return await self._ending()
        except asyncio.CancelledError:
            if self.killed_by is None or not self.ending:
                raise
            self.terminal.say(f"marco: the end of the recording was cut short "
                              f"({signal.Signals(self.killed_by).name})")
            return 128 + self.killed_by
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    async def _session(self, main: asyncio.Task[Any]) -> None:
        """Open the terminal, then stdin to it and its output to stdout until it ends."""
        typing: asyncio.Future[None] | None = None
        try:
            cols, rows = self.terminal.size()
            term = term_name(self.terminal.environ)
            # Input not typed by a person is not echoed: a piped password never shows.
            started = await self.client.open(cols, rows, term=term, command=self.command,
                                             echo=self.terminal.is_tty)
            if self.recording is not None:
                self.recording.start(started, cols, rows, term, self.command)
            typing = asyncio.ensure_future(self._type())
            await self._show()
        except asyncio.CancelledError:
            if self.killed_by is None:
                raise
            main.uncancel()  # the signal's cancel is handled here
            if self.client.started is not None:
                await self._hang_up()
        except MarcoError as error:  # an error close, or the connection broke
            if self.client.started is None:
                raise  # not connected: cmd_shell says why
            self.lost = error
        finally:
            if typing is not None:
                typing.cancel()
            self.client.close()

    def _signals(self, loop: asyncio.AbstractEventLoop, main: asyncio.Task[Any]) -> list[int]:
        """SIGWINCH resizes; SIGTERM, SIGHUP, SIGINT, SIGQUIT end the session (128+N), and
        while the recording ends, end that too."""

        def ended_by(signum: int) -> None:
            if self.killed_by is None or self.ending:
                self.killed_by = self.killed_by or signum
                main.cancel()

        loop.add_signal_handler(signal.SIGWINCH, self._resized)
        stops = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT]
        for signum in stops:
            loop.add_signal_handler(signum, ended_by, signum)
        return [signal.SIGWINCH, *stops]

    def _resized(self) -> None:
        cols, rows = self.terminal.size()
        if self.recording is not None:
            self.recording.resize(cols, rows)
        asyncio.ensure_future(self._quietly(self.client.resize(cols, rows)))

    async def _type(self) -> None:
        """stdin to the node, one read in flight. Without a terminal, its end is typed as
        Ctrl-D: one ends input at the start of a line; after a partial line the first only
        hands the line over, so a second one is typed."""
        with contextlib.suppress(MarcoError):
            last = b"\n"
            while data := await self.terminal.read():
                await self.client.send(data)
                last = data[-1:]
            if not self.terminal.is_tty:
                await self.client.send(EOF_KEY if last in LINE_ENDS else EOF_KEY * 2)

    async def _show(self) -> None:
        """The node's output to stdout until the session's `exit` or the socket's end."""
        while (frame := await self.client.read()) is not None:
            if isinstance(frame, bytes):
                if self.recording is not None:
                    await self.recording.output(frame)
                await self.terminal.write(frame)
            elif frame.get("type") == "exit":
                self.exit = frame

    async def _hang_up(self) -> None:
        """A signal ends us: hang up the node's foreground programs, as a closed ssh would."""
        with contextlib.suppress(MarcoError, asyncio.TimeoutError, OSError):
            await asyncio.wait_for(self.client.signal("HUP"), CLOSE_WAIT)

    async def _ending(self) -> int:
        """Tell why the session ended (as ssh does), finish the recording, pick the status.
        The terminal is restored first: the recording's end needs no raw mode, and a signal
        meanwhile leaves it as it was found."""
        self.ending = True
        self.terminal.restore()
        stats: dict[str, int] | None = None
        if self.killed_by is not None:
            status = 128 + self.killed_by
            self.terminal.say(f"Connection to {self.node} closed "
                              f"({signal.Signals(self.killed_by).name}).")
        elif self.exit is None:
            status = EXIT_SHELL_FAILED
            why = f": {self.lost}" if self.lost is not None else " by remote host"
            self.terminal.say(f"Connection to {self.node} closed{why}.")
        elif self.exit.get("reason", "exited") == "exited":
            status = status_of(self.exit)
            stats = {"ok" if status == 0 else "failed": 1, "rc": status}
            if self.terminal.is_tty:
                self.terminal.say(f"Connection to {self.node} closed.")
        else:
            status = EXIT_SHELL_FAILED
            stats = {"failed": 1, "rc": status}
            why = ENDED.get(str(self.exit.get("reason")), str(self.exit.get("reason")))
            self.terminal.say(f"Connection to {self.node} closed: {why}.")
        if self.recording is not None:
            await self.recording.finish(stats)
        return status

    @staticmethod
    async def _quietly(call: Any) -> None:
        with contextlib.suppress(MarcoError, OSError):
            await call


def find_node(client: ControllerClient, name: str) -> dict[str, Any]:
    """The node as the controller lists it: unknown is a usage error, down is unreachable."""
    nodes = {node["name"]: node for node in client.nodes()}
    if name not in nodes:
        raise UsageError(f"unknown node: {name} (see: marco nodes)")
    node = nodes[name]
    if not node["alive"]:
        why = f" ({node['error']})" if node.get("error") else ""
        raise AgentUnreachable(f"the controller sees {name} down{why}")
    return node


def own_options(args: argparse.Namespace) -> None:
    """The options given after NODE (argparse's REMAINDER kept them in `command`), and the
    command itself after them and an optional `--`."""
    words = list(args.command)
    while words and words[0] != "--" and words[0].startswith("-"):
        if words[0] != "--no-record":
            raise UsageError(f"unknown option {words[0]} (a command goes after --)")
        args.no_record = True
        words.pop(0)
    args.command = words[1:] if words[:1] == ["--"] else words


def run_shell(url: str, args: argparse.Namespace) -> int:
    """Find the node, connect, and hold the session; the status to exit with."""
    own_options(args)
    controller = ControllerClient(url, find_token())
    node = find_node(controller, args.node)
    tls = node_tls(node.get("tls", True), node["host"])
    command = " ".join(args.command) if args.command else None
    terminal = LocalTerminal()
    recording = None if args.no_record else Recording(controller, node["name"], terminal.say)

    async def session() -> int:
        client = TerminalClient.for_node(node["host"], node["port"], controller.token or "",
                                         tls, node=node["name"])
        return await ShellSession(node["name"], client, terminal, recording, command).run()

    with terminal.session():
        return asyncio.run(session())


def cmd_shell(args: argparse.Namespace, url: str) -> int:
    """`marco shell` with the controller at `url`: the remote status; 255 when marco
    itself failed (as ssh)."""
    try:
        return run_shell(url, args)
    except UsageError:
        raise
    except MarcoError as error:
        print(f"marco: {error}", file=sys.stderr)  # its hint is part of it
        return EXIT_SHELL_FAILED


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    """The `shell` subcommand's arguments."""
    shell = commands.add_parser(
        "shell", help="a terminal on a node, as you (like ssh)",
        description="Open a terminal on NODE as your Unix user there: your login shell, or "
                    "COMMAND in a terminal. Your terminal is put in raw mode (Ctrl-C goes to "
                    "the node), its size follows yours. Without a terminal on stdin the "
                    "session still runs (size $COLUMNS x $LINES or 80x24, the node's echo "
                    "off) and the end of stdin is typed as Ctrl-D (two after a last line "
                    "without a newline).",
        epilog="exit status: the remote shell's or COMMAND's (128+N when killed by signal "
               "N); 2 for a usage error or an unknown node; 255 when marco shell itself "
               "failed (not logged in, node down, refused, connection lost, the session "
               "ended by the node: idle, login expired, logged out).")
    shell.add_argument("node", metavar="NODE", help="the node's name (see: marco nodes)")
    shell.add_argument("--no-record", action="store_true",
                       help="do not keep this session as a run (recorded by default, "
                            "unless the controller's terminal_record is off)")
    # REMAINDER takes the options after NODE too: own_options reads them.
    shell.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                       help="run this instead of your login shell, as `$SHELL -c` (its words "
                            "joined by spaces, as ssh does)")
    return shell
