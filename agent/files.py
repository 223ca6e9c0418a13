"""Streamed file upload and download, performed with the user's own identity.

The agent never opens a user's file itself: it starts `filehelper.py` as the user (uid, gid,
supplementary groups) and pipes the bytes through it, so the kernel decides what the user may
read or write. Uploads go to a temporary file in the target directory and are renamed into
place only once complete; an interrupted upload leaves nothing under the target name.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import struct
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any

from marco import modes
from marco.errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    MarcoError,
    NotFound,
    PermissionDenied,
)

from .runner_helper import HelperProcess, start_helper
from .runners import RunnerPool
from .users import UserIdentity, UserResolver

READ_CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
MAX_ERROR = 4096  # characters of a helper's error message passed on
MAX_STDERR = 64 * 1024  # bytes of a failed helper's stderr read (the rest is dropped)
STATUS_SECONDS = 60.0  # default of the agent's file_helper_seconds (status line, exit, stderr)
MODE_TEXT = re.compile(r"[0-7]{3,5}")
_STATUS_ERRORS: dict[int, type[MarcoError]] = {
    400: BadRequest, 403: PermissionDenied, 404: NotFound, 409: Conflict}


def validate_path(user: UserIdentity, raw: str | None) -> str:
    """An absolute path from the request's `path`: `~` and relative paths are home-based.

    `..` components and NUL bytes are refused outright (400); everything else is left to the
    kernel, which checks the user's own permissions (symlinks included) when the helper acts.
    """
    if not raw:
        raise BadRequest("'path' is required")
    if "\0" in raw:
        raise BadRequest("path contains a NUL byte")
    if ".." in raw.split("/"):
        raise BadRequest("path must not contain '..'")
    path = os.path.normpath(user.expand(raw))
    if path == "/":
        raise BadRequest("path must name a file")
    return path


def parse_mode(raw: str | None) -> str:
    """The octal mode text given to the helper, or "-" for the default."""
    mode = modes.parse_mode(raw)
    return "-" if mode is None else modes.format_mode(mode)


def _error(status: dict[str, Any]) -> MarcoError:
    code = status.get("status", 500)
    cls = _STATUS_ERRORS.get(code) if type(code) is int else None
    message = str(status.get("error", "file operation failed"))[:MAX_ERROR]
    if code == 507:
        return InsufficientStorage(message)
    return cls(message) if cls else MarcoError(message)


class FileService:
    """Starts the file helper as a given user: forked by the user's live module runner on
    the same interpreter when there is one (no interpreter start), else a new process."""

    def __init__(self, resolver: UserResolver, helper_python: str,
                 runners: RunnerPool | None = None,
                 status_seconds: float = STATUS_SECONDS) -> None:
        self.resolver = resolver
        self.helper_python = helper_python
        self.runners = runners
        self.status_seconds = status_seconds
        self._real_python: str | None = None
        self._source: str | None = None

    def _helper_source(self) -> str:
        if self._source is None:
            self._source = resources.files(__package__).joinpath("filehelper.py").read_text()
        return self._source

    def _helper_file(self) -> str:
        """The file `helper_python` names (a runner on it may fork the helper)."""
        if self._real_python is None:
            self._real_python = os.path.realpath(self.helper_python)
        return self._real_python

    async def _spawn(self, user: UserIdentity, *args: str,
                     stdin: int | None) -> tuple[HelperProcess, str]:
        """The helper and the path it took: "runner" or "process"."""
        if self.runners is not None:
            helper = await start_helper(self.runners, user, self._helper_file(), list(args),
                                        self._helper_source(),
                                        writes=stdin == asyncio.subprocess.PIPE,
                                        limit=READ_CHUNK)
            if helper is not None:
                return helper, "runner"
        process = await ColdHelper.start(
            self.helper_python, "-I", "-S", "-c", self._helper_source(), *args,
            stdin=stdin, env=user.clean_environment(), cwd="/", start_new_session=True,
            **self.resolver.popen_identity(user))
        return process, "process"

    async def open_writer(self, user: UserIdentity, path: str, mode: str,
                          overwrite: bool, mkdir: bool = False) -> FileWriter:
        """Start an upload; raises the helper's error (403, 404, 409) before any data moves.
        `mkdir`: make the file's directory first, as Ansible makes its remote tmp."""
        process, via = await self._spawn(user, "write", path, mode, "1" if overwrite else "0",
                                         "1" if mkdir else "0", stdin=asyncio.subprocess.PIPE)
        _enlarge_pipe(process.stdin)
        writer = FileWriter(process, via, path, self.status_seconds)
        await _started(process, writer.ready())
        return writer

    async def open_reader(self, user: UserIdentity, path: str) -> FileReader:
        process, via = await self._spawn(user, "read", path, stdin=asyncio.subprocess.DEVNULL)
        reader = FileReader(process, via, self.status_seconds)
        await _started(process, reader.ready())
        return reader


class ColdHelper(asyncio.subprocess.Process):
    """A helper started as a new process; `close` ends what the agent holds of it."""

    def __init__(self, transport: asyncio.SubprocessTransport,
                 protocol: asyncio.subprocess.SubprocessStreamProtocol,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, protocol, loop)
        self.transport = transport

    @classmethod
    async def start(cls, *argv: str, stdin: int | None, **popen: Any) -> ColdHelper:
        """`argv` started as asyncio.create_subprocess_exec would, stdout and stderr piped."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=READ_CHUNK, loop=loop),
            *argv, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            **popen)
        return cls(transport, protocol, loop)

    def kill(self) -> None:
        try:
            super().kill()
        except ProcessLookupError:  # already reaped, or closed
            pass

    def close(self) -> None:
        """Close the agent's pipe ends now (the process, if still running, is killed): a
        child of the helper that kept a pipe end makes the agent hold nothing."""
        self.transport.close()


async def _started(process: HelperProcess, ready: Awaitable[None]) -> None:
    """Await the helper's first status line; on any failure (a client that left cancels it)
    the helper is killed and the agent's ends are closed."""
    try:
        await ready
    except BaseException:
        _end(process)
        raise


def _end(process: HelperProcess) -> None:
    if process.returncode is None:
        process.kill()
    process.close()


def _enlarge_pipe(stream: asyncio.StreamWriter | None) -> None:
    """A 1 MiB pipe takes a whole body chunk in one write instead of sixteen."""
    pipe = stream.transport.get_extra_info("pipe") if stream is not None else None
    if pipe is not None:
        try:
            fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, ValueError):
            pass  # over pipe-max-size: keep the default


def _is_mode(value: object) -> bool:
    return isinstance(value, str) and MODE_TEXT.fullmatch(value) is not None


async def _status_line(process: HelperProcess, seconds: float) -> dict[str, Any]:
    """The helper's JSON status line within `seconds`; else (or if it is too long, or there
    is none) the helper is killed, the agent's ends are closed and MarcoError raised."""
    assert process.stdout is not None
    try:
        async with asyncio.timeout(seconds):
            line = await process.stdout.readline()
    except TimeoutError:
        _end(process)
        raise MarcoError(f"file helper failed: no status line within {seconds:g} s") from None
    except ValueError:  # over the reader's limit with no newline
        _end(process)
        raise MarcoError("file helper failed: status line too long") from None
    if not line:  # its stderr says why; it ends with it (or is killed once its head is read)
        detail = (await _stderr_head(process, seconds)).decode("utf-8", "replace").strip()
        _end(process)
        last = detail.splitlines()[-1] if detail else "no output"
        raise MarcoError(f"file helper failed: {last}")
    try:
        status = json.loads(line)
    except (ValueError, RecursionError):
        status = None
    if not isinstance(status, dict):  # the helper is the user's process: checked, not trusted
        _end(process)
        raise MarcoError("file helper failed: its status line is not a JSON object")
    return status


async def _wait(process: HelperProcess, seconds: float) -> None:
    """The helper's exit within `seconds`, else it is killed (its exit is not awaited)."""
    try:
        async with asyncio.timeout(seconds):
            await process.wait()
    except TimeoutError:
        process.kill()


async def _stderr_head(process: HelperProcess, seconds: float) -> bytes:
    """At most MAX_STDERR bytes of the helper's stderr, within `seconds`."""
    assert process.stderr is not None
    data = b""
    try:
        async with asyncio.timeout(seconds):
            while len(data) < MAX_STDERR:
                chunk = await process.stderr.read(MAX_STDERR - len(data))
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        pass
    return data


class FileWriter:
    """One upload in progress: `write` chunks, then `commit` (or `abort`). `via`: which
    path started the helper ("runner" or "process")."""

    def __init__(self, process: HelperProcess, via: str = "process", path: str = "",
                 seconds: float = STATUS_SECONDS) -> None:
        self.process = process
        self.via = via
        self.path = path
        self.seconds = seconds
        self.size = 0
        self._ending: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        status = await _status_line(self.process, self.seconds)
        if not status.get("ok"):
            await _wait(self.process, self.seconds)
            _end(self.process)
            raise _error(status)

    async def write(self, chunk: bytes) -> None:
        assert self.process.stdin is not None
        if not chunk:
            return
        self.process.stdin.write(struct.pack(">I", len(chunk)))
        self.process.stdin.write(chunk)
        self.size += len(chunk)
        try:
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            await self.commit()  # the helper failed: raise its reason

    async def commit(self) -> dict[str, Any]:
        """Finish the upload: the helper renames the file into place and reports. The
        agent's ends are closed when this returns or raises."""
        assert self.process.stdin is not None
        try:
            try:
                self.process.stdin.write(struct.pack(">I", 0))
                await self.process.stdin.drain()
                self.process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            status = await _status_line(self.process, self.seconds)
            await _wait(self.process, self.seconds)
        finally:
            _end(self.process)
        if not status.get("ok"):
            raise _error(status)
        return self._checked(status)

    def _checked(self, status: dict[str, Any]) -> dict[str, Any]:
        """The helper's answer, only if it names what the agent asked for and sent (the
        answer is audited): the path, the byte count, a mode."""
        if (status.get("path") != self.path or type(status.get("size")) is not int
                or status["size"] != self.size or not _is_mode(status.get("mode"))):
            raise MarcoError("file helper failed: its answer does not match the upload")
        return {"ok": True, "path": self.path, "size": self.size, "mode": status["mode"]}

    def abort(self) -> None:
        """Drop the upload: the helper sees EOF without a commit and removes its temp file;
        the agent's ends are closed once it exits, or it is killed after `seconds`."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._end_aborted())

    async def _end_aborted(self) -> None:
        await _wait(self.process, self.seconds)
        _end(self.process)


class FileReader:
    """One download: `size` from the helper's status line, then the bytes via `chunks`."""

    def __init__(self, process: HelperProcess, via: str = "process",
                 seconds: float = STATUS_SECONDS) -> None:
        self.process = process
        self.via = via
        self.seconds = seconds
        self.size = 0
        self.mode = ""

    async def ready(self) -> None:
        status = await _status_line(self.process, self.seconds)
        if not status.get("ok"):
            await _wait(self.process, self.seconds)
            _end(self.process)
            raise _error(status)
        size, mode = status.get("size"), status.get("mode")
        if type(size) is not int or size < 0 or not _is_mode(mode):
            _end(self.process)
            raise MarcoError("file helper failed: its status line has no size and mode")
        self.size, self.mode = size, str(mode)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes; the agent's ends are closed once they end (or the caller
        stops, with `abort`)."""
        assert self.process.stdout is not None
        try:
            while True:
                chunk = await self.process.stdout.read(READ_CHUNK)
                if not chunk:
                    break
                yield chunk
            await _wait(self.process, self.seconds)
        finally:
            _end(self.process)

    def abort(self) -> None:
        """Stop the download: the helper is killed and the agent's ends are closed."""
        _end(self.process)
