"""Daemon lifecycle shared by marco-agent and marco-controller: wait for SIGTERM/SIGINT, then
close the HTTP server's connections within a bound."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from tornado.httpserver import HTTPServer

CLOSE_TIMEOUT = 5.0


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (handlers installed on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def close_server(server: HTTPServer) -> None:
    """Stop accepting, then close open connections (kept-alive ones too), at most 5 s."""
    server.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), timeout=CLOSE_TIMEOUT)
