"""Health checks: `HealthMonitor` probes every known node's `/v1/health`. An agent that died
without a goodbye (SIGKILL, cable) is marked down and leaves the inventory; it comes back when a
probe or a new announcement succeeds. Static nodes from the config are probed the same way.

Each node's checks go over one kept HTTP/1.1 connection (`HealthConnection`), so a check costs
a request, not a mutual-TLS handshake (about 2 ms of the controller's CPU each, most of its
idle cost at 100 nodes). Every check still carries a fresh challenge. A kept connection is
replaced when it is older than `connection_max_age`, when the node's address changes, and when
the TLS files change (a new CRL: the agent's certificate is checked against it again).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError, UnsatisfiableReadError

from marco.agent_api import AgentRequests, Request, describe, parse_answer
from marco.errors import (
    AgentUnreachable,
    CertificateRefused,
    ConfigError,
    MarcoError,
    ProtocolError,
)
from marco.nodes import Node, NodeRegistry
from marco.tls import ClientTls, describe_tls_error
from marco.tokens import verify_health_proof

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
HEAD_LIMIT = 16 * 1024   # bytes of a health answer's status line and headers
BODY_LIMIT = 64 * 1024   # bytes of a health answer's body (the facts are under 1 KiB)


@dataclass(frozen=True)
class Probe:
    """One health check: `answered` is False when the node did not answer at all (refused,
    reset, timed out), as opposed to a wrong answer (certificate, secret proof, name)."""

    alive: bool
    error: str | None = None
    details: dict[str, Any] | None = None
    answered: bool = True


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as `parse_answer` reads it."""

    status: int
    body: bytes
    content_type: str | None


class HealthConnection:
    """One HTTP/1.1 connection to an agent, for health checks only: GETs without a body, one
    at a time, answers with a Content-Length (as Tornado sends them). Opened on first use;
    after any failure it is closed, never used again.

    A Tornado IOStream rather than asyncio's streams: asyncio's TLS transport holds a 256 KiB
    buffer per connection, a quarter of a gigabyte for 1,000 kept connections."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        self.host, self.port, self.context = host, port, context
        self.opened = time.monotonic()
        self.used = False  # has it carried an answer (then a failure may be its idle close)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: IOStream | None = None

    def fits(self, host: str, port: int, context: ssl.SSLContext | None, max_age: float) -> bool:
        """Can it carry the next check: same address, same TLS context (same CRL), young
        enough, still open, and of the running loop."""
        return ((self.host, self.port, self.context) == (host, port, context)
                and time.monotonic() - self.opened < max_age and not self.closed
                and self._loop is asyncio.get_running_loop())

    @property
    def closed(self) -> bool:
        """Closed, or closed by the agent while idle (its idle timeout, a restart)."""
        return self._stream is None or self._stream.closed()

    async def _connect(self) -> IOStream:
        self._loop = asyncio.get_running_loop()
        family, address = await self._address()
        sock = socket.socket(family, socket.SOCK_STREAM)
        options = {"max_buffer_size": HEAD_LIMIT + BODY_LIMIT, "read_chunk_size": 4096}
        stream = (SSLIOStream(sock, ssl_options=self.context, **options)
                  if self.context is not None else IOStream(sock, **options))
        self._stream = stream
        # With a close callback Tornado watches an idle stream, so an agent closing it while
        # idle is seen before the next check rather than by it.
        stream.set_close_callback(lambda: None)
        await stream.connect(address)
        stream.set_nodelay(True)
        return stream

    async def _address(self) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
        """The address to dial: an IP address as it is (no resolver thread), a name resolved."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        return family, address

    async def get(self, request: Request[Any]) -> Answer:
        """Send `request` and read its answer (the caller bounds the time)."""
        try:
            return await self._exchange(request)
        except StreamClosedError as exc:
            raise exc.real_error or ConnectionResetError("the agent closed the connection") \
                from None
        except UnsatisfiableReadError:
            raise ProtocolError("the agent's health answer has an oversized head") from None

    async def _exchange(self, request: Request[Any]) -> Answer:
        stream = self._stream if self._stream is not None else await self._connect()
        host = f"[{self.host}]" if ":" in self.host else self.host
        head = [f"{request.method} {request.path} HTTP/1.1", f"Host: {host}:{self.port}",
                *(f"{name}: {value}" for name, value in request.headers.items()), "", ""]
        await stream.write("\r\n".join(head).encode("latin-1"))
        status_line, *lines = (await stream.read_until(b"\r\n\r\n", max_bytes=HEAD_LIMIT)
                               ).decode("latin-1").split("\r\n")
        status, headers = self._parse_head(status_line, lines)
        length = headers.get("content-length", "")
        if not length.isdigit() or int(length) > BODY_LIMIT:
            raise ProtocolError(f"the agent's health answer has a bad length {length[:20]!r}")
        body = await stream.read_bytes(int(length)) if int(length) else b""
        self.used = True
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, body, headers.get("content-type"))

    @staticmethod
    def _parse_head(status_line: str, lines: list[str]) -> tuple[int, dict[str, str]]:
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"the agent answered {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(code), headers

    def close(self) -> None:
        """Close at once (no TLS goodbye awaited); after its loop closed (a test's
        `asyncio.run` per check) only the socket is closed."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            stream.close()
        else:
            stream.socket.close()


class HealthMonitor:
    """Probes every node's /v1/health each `interval` seconds, all nodes concurrently.

    With the cluster's secret keys, every probe carries a fresh challenge that only an agent
    holding the secret can answer: a machine posing as a node on the LAN fails it and is
    never offered users' tokens. `connection_max_age`: seconds a node's checks share one
    connection (0: a new connection for each check).
    """

    def __init__(self, registry: NodeRegistry, interval: float,
                 keys: Sequence[bytes] | None = None, tls: ClientTls | None = None,
                 failures: int = 1, connection_max_age: float = 300.0,
                 at_once: int = 64) -> None:
        self.tls = tls
        self.registry = registry
        self.interval = interval
        self.keys = list(keys or [])
        # A node is down after `failures` probes in a row that got no answer, so one slow
        # answer (a busy node, a lost packet) does not drop it from the inventory; a wrong
        # answer (certificate, secret proof, name) drops it at once.
        self.failures = max(1, failures)
        if connection_max_age < 0:
            raise ConfigError("health_connection_max_age must be 0 (a connection per check) "
                              f"or more, not {connection_max_age}")
        self.connection_max_age = connection_max_age
        if at_once < 1:
            raise ConfigError(f"health_checks_at_once must be at least 1, not {at_once}")
        # Checks in flight at once: a thousand first checks (each a TLS handshake) started
        # together on a busy host time out at HEALTH_TIMEOUT and down nodes that are fine.
        self.at_once = at_once
        self._missed: dict[str, int] = {}
        # One kept connection per node name, bounded by the registry's nodes (check_all
        # closes those of forgotten nodes).
        self._kept: dict[str, HealthConnection] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        nodes = self.registry.all()
        self._missed = {name: count for name, count in self._missed.items()
                        if self.registry.get(name) is not None}  # forgotten nodes' counts go
        for name in [name for name in self._kept if self.registry.get(name) is None]:
            self._kept.pop(name).close()
        if nodes:
            slots = asyncio.Semaphore(self.at_once)

            async def check(node: Node) -> None:
                async with slots:
                    await self.check(node)

            await asyncio.gather(*(check(node) for node in nodes))

    @property
    def kept_connections(self) -> int:
        """Connections kept open for the next checks (one per node at most)."""
        return sum(not connection.closed for connection in self._kept.values())

    async def probe(self, node: Node, keep: bool = False) -> Probe:
        """One node's health, the secret proof checked when keys are set. `keep`: over the
        node's kept connection (opened if need be, kept if the node proves itself); else over
        a connection of its own, which shows the agent takes connections now."""
        nonce = secrets.token_hex(16) if self.keys else None
        try:
            details = await self._ask(node, AgentRequests(None, HEALTH_TIMEOUT).health(nonce),
                                      keep)
        except CertificateRefused as error:
            log.warning("refusing %s at %s:%d: %s", node.name, node.host, node.port,
                        error.message)
            return Probe(False, str(error))
        except MarcoError as error:
            return Probe(False, str(error), answered=False)
        reported = str(details.get("node", ""))
        if nonce is not None and not verify_health_proof(self.keys, nonce, reported,
                                                         details.get("proof")):
            log.warning("%s:%d answers as node %s without proof of the cluster secret: ignored",
                        node.host, node.port, node.name)
            self._forget(node.name)
            return Probe(False,
                         "failed the cluster-secret proof (not a Marco agent of this cluster?)")
        if node.source == "mdns" and reported != node.name:
            log.warning("%s announces node %s but its agent is %s: ignored", node.service,
                        node.name, reported)
            self._forget(node.name)
            return Probe(False, f"the agent there is {reported!r}")
        return Probe(True, details=details)

    async def _ask(self, node: Node, request: Request[dict[str, Any]],
                   keep: bool) -> dict[str, Any]:
        """`request` to the node within HEALTH_TIMEOUT, over its kept connection when `keep`
        (one more try on a new connection if a kept one turns out closed: the request is a
        GET, safe to send again)."""
        name = node.name if self.tls is not None else node.host
        what = describe(node.host, node.port, name)
        context = self.tls.context_for(name) if self.tls is not None else None
        connection = self._kept.pop(node.name, None) if keep else None
        if connection is not None and not connection.fits(node.host, node.port, context,
                                                          self.connection_max_age):
            connection.close()
            connection = None
        connection = connection or HealthConnection(node.host, node.port, context)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                try:
                    answer = await connection.get(request)
                except (OSError, EOFError):
                    if not connection.used:
                        raise
                    # Closed by the agent while idle (or restarted): a new connection, whose
                    # handshake shows any refusal of certificates afresh.
                    connection.close()
                    connection = HealthConnection(node.host, node.port, context)
                    answer = await connection.get(request)
        except BaseException as exc:
            connection.close()
            if isinstance(exc, MarcoError) or not isinstance(exc, Exception):
                raise  # a bad answer says why; a cancel goes on
            raise self._transport_error(exc, what) from None
        if keep and self.connection_max_age > 0 and not connection.closed:
            self._kept[node.name] = connection
        else:
            connection.close()
        return parse_answer(request, answer.status, answer.body, answer.content_type)

    def _transport_error(self, exc: BaseException, what: str) -> AgentUnreachable:
        """A failed connection as a typed error: TLS refusals say why (our own expired
        certificate first), the rest is unreachable."""
        refused = describe_tls_error(exc, what)
        if refused is not None:
            return (self.tls.expired() if self.tls is not None else None) or refused
        if isinstance(exc, TimeoutError):
            return AgentUnreachable(f"{what} timed out")
        detail = getattr(exc, "strerror", None) or exc or type(exc).__name__
        return AgentUnreachable(f"cannot reach {what}: {detail}")

    def _forget(self, name: str) -> None:
        connection = self._kept.pop(name, None)
        if connection is not None:
            connection.close()

    async def check(self, node: Node) -> None:
        probe = await self.probe(node, keep=True)
        if probe.answered:
            self._missed.pop(node.name, None)
        else:
            missed = self._missed[node.name] = self._missed.get(node.name, 0) + 1
            if node.alive and missed < self.failures:
                log.info("%s did not answer its health check (%d in a row, down at %d): %s",
                         node.name, missed, self.failures, probe.error)
                return
        self.registry.set_health(node.name, probe.alive, probe.error, details=probe.details)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for connection in self._kept.values():
            connection.close()
        self._kept.clear()
