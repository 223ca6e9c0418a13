"""Pipes between the agent and the processes it runs: their size, making and closing them."""

from __future__ import annotations

import fcntl
import os

PIPE_SIZE = 1024 * 1024  # bigger pipes let a chatty child run ahead of the reader
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Give the pipe `size` bytes of buffer where the kernel allows it."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except (OSError, ValueError):
        pass  # over pipe-max-size, or already closed: keep the default


def make_pipes() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((stdin_r, stdout_w, stderr_w) for the child, (stdin_w, stdout_r, stderr_r) for the
    agent), all close-on-exec; the output pipes enlarged."""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    for fd in (stdout_r, stderr_r):
        enlarge_pipe(fd)
    return (stdin_r, stdout_w, stderr_w), (stdin_w, stdout_r, stderr_r)


def close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
