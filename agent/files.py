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
import struct
from collections.abc import AsyncIterator
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

from .users import UserIdentity, UserResolver

READ_CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
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
    cls = _STATUS_ERRORS.get(status.get("status", 500))
    message = str(status.get("error", "file operation failed"))
    if status.get("status") == 507:
        return InsufficientStorage(message)
    return cls(message) if cls else MarcoError(message)


class FileService:
    """Starts the file helper as a given user."""

    def __init__(self, resolver: UserResolver, helper_python: str) -> None:
        self.resolver = resolver
        self.helper_python = helper_python
        self._source: str | None = None

    def _helper_source(self) -> str:
        if self._source is None:
            self._source = resources.files(__package__).joinpath("filehelper.py").read_text()
        return self._source

    async def _spawn(self, user: UserIdentity, *args: str,
                     stdin: int | None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self.helper_python, "-I", "-S", "-c", self._helper_source(), *args,
            stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=user.clean_environment(), cwd="/", start_new_session=True,
            limit=READ_CHUNK, **self.resolver.popen_identity(user))

    async def open_writer(self, user: UserIdentity, path: str, mode: str,
                          overwrite: bool, mkdir: bool = False) -> FileWriter:
        """Start an upload; raises the helper's error (403, 404, 409) before any data moves.
        `mkdir`: make the file's directory first, as Ansible makes its remote tmp."""
        process = await self._spawn(user, "write", path, mode, "1" if overwrite else "0",
                                    "1" if mkdir else "0", stdin=asyncio.subprocess.PIPE)
        _enlarge_pipe(process.stdin)
        writer = FileWriter(process)
        await writer.ready()
        return writer

    async def open_reader(self, user: UserIdentity, path: str) -> FileReader:
        process = await self._spawn(user, "read", path, stdin=asyncio.subprocess.DEVNULL)
        reader = FileReader(process)
        await reader.ready()
        return reader


def _enlarge_pipe(stream: asyncio.StreamWriter | None) -> None:
    """A 1 MiB pipe takes a whole body chunk in one write instead of sixteen."""
    pipe = stream.transport.get_extra_info("pipe") if stream is not None else None
    if pipe is not None:
        try:
            fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, ValueError):
            pass  # over pipe-max-size: keep the default


async def _status_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if not line:
        await process.wait()
        assert process.stderr is not None
        detail = (await process.stderr.read()).decode("utf-8", "replace").strip()
        last = detail.splitlines()[-1] if detail else "no output"
        raise MarcoError(f"file helper failed: {last}")
    return json.loads(line)


class FileWriter:
    """One upload in progress: `write` chunks, then `commit` (or `abort`)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.size = 0

    async def ready(self) -> None:
        status = await _status_line(self.process)
        if not status.get("ok"):
            await self.process.wait()
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
        """Finish the upload: the helper renames the file into place and reports."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(struct.pack(">I", 0))
            await self.process.stdin.drain()
            self.process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = await _status_line(self.process)
        await self.process.wait()
        if not status.get("ok"):
            raise _error(status)
        return status

    def abort(self) -> None:
        """Drop the upload: the helper sees EOF without a commit and removes its temp file."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()


class FileReader:
    """One download: `size` from the helper's status line, then the bytes via `chunks`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.size = 0
        self.mode = ""

    async def ready(self) -> None:
        status = await _status_line(self.process)
        if not status.get("ok"):
            await self.process.wait()
            raise _error(status)
        self.size, self.mode = int(status["size"]), str(status.get("mode", ""))

    async def chunks(self) -> AsyncIterator[bytes]:
        assert self.process.stdout is not None
        while True:
            chunk = await self.process.stdout.read(READ_CHUNK)
            if not chunk:
                break
            yield chunk
        await self.process.wait()

    def abort(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
