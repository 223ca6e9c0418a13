"""The agent's routes: one Tornado application over an `AgentContext`."""

from __future__ import annotations

import tornado.web

from marco.protocol import API_PREFIX
from marco.serving import log_request

from .context import AgentContext
from .handlers import (
    CrlHandler,
    ExecutionHandler,
    ExecutionsHandler,
    FilesHandler,
    HealthHandler,
    NotFoundHandler,
    OutputHandler,
    RevocationsHandler,
    StatusHandler,
)
from .stream import StreamSocket
from .terminal_socket import TerminalSocket

EXECUTION_ID = r"([0-9a-f]{32})"


def make_app(ctx: AgentContext) -> tornado.web.Application:
    """Build the /v1 API application (no debug mode, no cookies, JSON everywhere)."""
    routes = [
        (r"/v1/health", HealthHandler),
        (r"/v1/executions", ExecutionsHandler),
        (rf"/v1/executions/{EXECUTION_ID}", ExecutionHandler),
        (rf"/v1/executions/{EXECUTION_ID}/output", OutputHandler),
        (r"/v1/files", FilesHandler),
        (r"/v1/status", StatusHandler),
        (r"/v1/revocations", RevocationsHandler),
        (r"/v1/crl", CrlHandler),
        (r"/v1/stream", StreamSocket),
        (r"/v1/terminal", TerminalSocket),
    ]
    assert all(path.startswith(API_PREFIX) for path, _ in routes)
    return tornado.web.Application(
        [(path, handler, {"ctx": ctx}) for path, handler in routes],
        default_handler_class=NotFoundHandler, default_handler_args={"ctx": ctx},
        # Tornado cuts a timeout longer than the interval: the config refuses one instead.
        websocket_ping_interval=ctx.config.websocket_ping_interval,
        websocket_ping_timeout=ctx.config.websocket_ping_timeout,
        websocket_max_message_size=1024 * 1024, log_function=log_request,
    )
