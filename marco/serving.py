"""Daemon lifecycle shared by marco-agent and marco-controller: an HTTP server that bounds
connections which have not sent a request yet, the `listening.json` file saying where it
listens (the real port when asked for port 0), waiting for SIGTERM/SIGINT, then closing the
server's connections within a bound. Behind a load balancer, the proxies listed in
`ConnectionLimits.trusted_proxies` say who their clients are (X-Forwarded-For, X-Real-Ip,
X-Forwarded-Proto); nobody else is believed."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.log import access_log
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from .atomic import write_atomic
from .errors import ConfigError
from .settings import Option

log = logging.getLogger("marco.serving")
CLOSE_TIMEOUT = 5.0
LISTENING_FILE = "listening.json"  # in the daemon's state dir while it serves


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


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on connections that have not sent a request yet (no certificate needed to open
    one): each gets `handshake_timeout` seconds from accept for the TLS handshake and its
    first request's headers, and one source address may hold `max_pending_per_address`."""

    handshake_timeout: float = 10.0
    max_pending_per_address: int = 512
    idle_timeout: float = 120.0             # a kept-alive connection between requests
    max_connections_per_address: int = 2048  # open at once, pending or not
    # Open at once from all addresses: what bounds trusted proxies, which carry many clients
    # each and so are not held to the per-address bounds.
    max_connections: int = 16384
    trusted_proxies: tuple[str, ...] = ()  # addresses and networks (CIDR), see `proxy_network`

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, not {self.max_connections}")
        try:
            proxy_networks(self.trusted_proxies)
        except ValueError as error:
            raise ConfigError(f"trusted_proxies: {error}") from None
        if not self.handshake_timeout > 0:
            raise ConfigError(f"handshake_timeout must be positive, not {self.handshake_timeout}")
        if not self.idle_timeout > 0:
            raise ConfigError(f"idle_timeout must be positive, not {self.idle_timeout}")
        if self.max_pending_per_address < 1:
            raise ConfigError("max_pending_connections_per_address must be at least 1, not "
                              f"{self.max_pending_per_address}")
        if self.max_connections_per_address < self.max_pending_per_address:
            raise ConfigError("max_connections_per_address must be at least "
                              "max_pending_connections_per_address")


LOGGED_URI_CHARS = 200  # of a request's URI in the access log: anyone can send a long one


def log_request(handler: RequestHandler) -> None:
    """Tornado's access log line with the URI cut: unauthenticated callers choose it."""
    status = handler.get_status()
    method = access_log.info if status < 400 else access_log.warning if status < 500 \
        else access_log.error
    uri = handler.request.uri or ""
    if len(uri) > LOGGED_URI_CHARS:
        uri = uri[:LOGGED_URI_CHARS] + f"…(+{len(uri) - LOGGED_URI_CHARS})"
    method("%d %s %s (%s) %.2fms", status, handler.request.method, uri,
           handler.request.remote_ip, 1000.0 * handler.request.request_time())


def listen_port(value: Any) -> int:
    """A TCP port to listen on: 1-65535, or 0 for any free one (see `Listening`)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (1-65535, or 0 for any free port)")
    return port


def port_option(default: int) -> Option:
    """The --port setting, the same for the agent and the controller."""
    return Option("port", default, "TCP port to listen on; 0: any free port (the daemon "
                  f"writes the one it got to STATE_DIR/{LISTENING_FILE})", kind=listen_port)


@dataclass(frozen=True)
class Listening:
    """Where a running daemon listens. It writes this to `STATE_DIR/listening.json` once its
    sockets are bound, with the port it really got (the way to learn it after --port 0), and
    removes it on a clean exit; `pid` tells a running daemon's file from one a killed
    predecessor left behind."""

    pid: int
    port: int
    address: str  # the bind address as configured ("" or "0.0.0.0": every interface)
    scheme: str   # "https", or "http" in --dev mode

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def read(cls, state_dir: Path) -> Listening | None:
        """The file in `state_dir`, or None when there is none (or something else wrote it)."""
        try:
            data = json.loads((state_dir / LISTENING_FILE).read_text())
            return cls(int(data["pid"]), int(data["port"]), str(data["address"]),
                       str(data["scheme"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or not ours
            return None

    def write(self, state_dir: Path) -> None:
        """Replace the file atomically: a reader never sees half of it."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(state_dir / LISTENING_FILE, json.dumps(asdict(self)).encode() + b"\n",
                     0o644)

    def remove(self, state_dir: Path) -> None:
        """Remove the file while it is still this one (another daemon may own it by now)."""
        if Listening.read(state_dir) == self:
            (state_dir / LISTENING_FILE).unlink(missing_ok=True)


def connection_limit_options() -> list[Option]:
    """The settings behind `ConnectionLimits`, the same for the agent and the controller."""
    return [
        Option("handshake_timeout", ConnectionLimits.handshake_timeout, "seconds a new "
               "connection has for its TLS handshake and first request's headers before it is "
               "closed", kind=float),
        Option("max_pending_connections_per_address", ConnectionLimits.max_pending_per_address,
               "connections one source address may hold open before their first request "
               "(more are closed at once)", kind=int),
        Option("idle_timeout", ConnectionLimits.idle_timeout, "seconds a kept-alive connection "
               "may wait for its next request's headers before it is closed", kind=float),
        Option("max_connections_per_address", ConnectionLimits.max_connections_per_address,
               "connections one source address may hold open at once, with or without a "
               "request (more are closed at once)", kind=int),
        Option("max_connections", ConnectionLimits.max_connections, "connections open at once "
               "from all addresses together (more are closed at once); on the controller, the "
               "bound on trusted proxies' connections", kind=int),
    ]


class _Pending:
    """One accepted connection that has not sent its first request's headers yet."""

    __slots__ = ("address", "timer")

    def __init__(self, address: str, timer: asyncio.TimerHandle) -> None:
        self.address, self.timer = address, timer


class _FirstRequest(httputil.HTTPMessageDelegate):
    """Passes a connection's first request through, telling the server when its headers are
    in: from then on the connection is no longer pending."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate,
                 admitted: Callable[[], None]) -> None:
        self.delegate, self.admitted = delegate, admitted

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.admitted()
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SCHEMES = ("http", "https")


def proxy_network(value: Any) -> str:
    """A trusted proxy setting: an IP address or a network (CIDR, no host bits set), in its
    canonical spelling; ValueError otherwise."""
    return str(ipaddress.ip_network(str(value).strip(), strict=True))


def proxy_networks(values: Sequence[str]) -> tuple[ProxyNetwork, ...]:
    """The networks of `trusted_proxies`; ValueError on a value that is not one."""
    return tuple(ipaddress.ip_network(str(value).strip(), strict=True) for value in values)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address (an IPv4-mapped IPv6 one as IPv4, a zone dropped), else None."""
    try:
        ip = ipaddress.ip_address(text.strip().split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyTrust:
    """Which peers are trusted proxies, and what a request through one says of its client."""

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = proxy_networks(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Any) -> bool:
        """Whether `address` (a peer's address tuple, or an IP as text) is a trusted proxy."""
        text = address[0] if isinstance(address, tuple) and address else address
        ip = _ip(text) if isinstance(text, str) else None
        return ip is not None and any(ip in network for network in self.networks)

    def client(self, headers: httputil.HTTPHeaders) -> str | None:
        """The client address a trusted proxy forwarded: in X-Forwarded-For, the right-most
        entry that is not itself a trusted proxy (the entries left of it come from the client,
        who can write anything there); without that header, X-Real-Ip. None when neither is
        there or the entry is not an IP address: the request keeps its peer's address."""
        entries = [entry for value in headers.get_list("X-Forwarded-For")
                   for entry in value.split(",") if entry.strip()]
        if not entries:
            real = _ip(headers.get("X-Real-Ip", ""))
            return str(real) if real is not None else None
        for entry in reversed(entries):
            ip = _ip(entry)
            if ip is None:
                return None
            if not any(ip in network for network in self.networks):
                return str(ip)
        return str(ip)  # proxies all the way: the left-most is the closest to a client

    @staticmethod
    def scheme(headers: httputil.HTTPHeaders) -> str | None:
        """The scheme the client used with the proxy (X-Forwarded-Proto, its right-most)."""
        values = [entry.strip().lower() for value in headers.get_list("X-Forwarded-Proto")
                  for entry in value.split(",") if entry.strip()]
        return values[-1] if values and values[-1] in SCHEMES else None


class _Forwarded(httputil.HTTPMessageDelegate):
    """One request from a trusted proxy: the request sees the client address and scheme the
    proxy forwarded (`request.remote_ip`, `request.protocol`); the connection's own are put
    back after it, so the next request on the connection is read afresh."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, context: Any,
                 trust: ProxyTrust) -> None:
        self.delegate, self.context, self.trust = delegate, context, trust
        self.peer = (context.remote_ip, context.protocol)

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        client, scheme = self.trust.client(headers), self.trust.scheme(headers)
        if client is not None:
            self.context.remote_ip = client
        if scheme is not None:
            self.context.protocol = scheme
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()
        self._restore()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()
        self._restore()

    def _restore(self) -> None:
        self.context.remote_ip, self.context.protocol = self.peer


class GuardedHTTPServer(HTTPServer):
    """An HTTPServer that bounds unauthenticated connections (see `ConnectionLimits`).

    A connection is pending from accept until its first request's headers have arrived
    (plain HTTP in --dev mode too); one timer per connection covers the TLS handshake and
    those headers, so a peer that sends nothing, a TLS record header, or a handshake and then
    nothing is closed after `handshake_timeout`. Later requests on a kept-alive connection
    wait at most `idle_timeout` (Tornado's `idle_connection_timeout`), and one address holds
    at most `max_connections_per_address` connections of any kind, so admitted connections
    left idle or feeding a body slowly cannot pile up either.

    Connections from a trusted proxy carry many clients each: they are not held to the
    per-address bounds (the proxy bounds its clients), only to `max_connections`, which holds
    for all connections together, and to the same timeouts. Their requests see the client
    address and scheme the proxy forwarded (`ProxyTrust`); anyone else's headers are ignored."""

    def initialize(self, *args: Any, limits: ConnectionLimits = ConnectionLimits(),
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.limits = limits
        self.port = 0  # the bound port, set by `listen`
        self._pending: dict[IOStream, _Pending] = {}
        self._pending_per_address: Counter[str] = Counter()
        self._open: dict[IOStream, str] = {}  # every accepted connection -> its source address
        self._open_per_address: Counter[str] = Counter()
        self._warned: set[str] = set()  # addresses already warned about in this burst
        self.proxies = ProxyTrust(limits.trusted_proxies)

    def _full(self, peer: str, proxy: bool) -> str | None:
        """The limit a new connection from `peer` would exceed, or None."""
        if len(self._open) >= self.limits.max_connections:
            return "max_connections"
        if proxy:
            return None
        if self._pending_per_address[peer] >= self.limits.max_pending_per_address:
            return "max_pending_connections_per_address"
        if self._open_per_address[peer] >= self.limits.max_connections_per_address:
            return "max_connections_per_address"
        return None

    async def handle_stream(self, stream: IOStream, address: Any) -> None:  # type: ignore[override]
        peer = _peer_address(address)
        limit = self._full(peer, bool(self.proxies) and self.proxies.trusts(address))
        if limit is not None:
            # Logged once per burst: a flood would otherwise turn into a flood of log lines.
            if peer not in self._warned:
                self._warned.add(peer)
                log.warning("refusing connections from %s: %d open, %d of them pending "
                            "(limit %s)", peer, self._open_per_address[peer],
                            self._pending_per_address[peer], limit)
            else:
                log.debug("refused a connection from %s (%s)", peer, limit)
            stream.close()
            return
        self._open[stream] = peer
        self._open_per_address[peer] += 1
        # Until Tornado's connection takes the stream over (and calls on_close), a close
        # before the first request is seen here.
        stream.set_close_callback(lambda: self._closed(stream))
        timer = asyncio.get_running_loop().call_later(
            self.limits.handshake_timeout, self._expire, stream)
        self._pending[stream] = _Pending(peer, timer)
        self._pending_per_address[peer] += 1
        if isinstance(stream, SSLIOStream):
            try:
                await stream.wait_for_handshake()
            except (StreamClosedError, ssl.SSLError, OSError):
                pass  # a failed handshake closed the stream (Tornado logs the TLS error)
            if stream.closed():
                self._closed(stream)
                return
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        context = getattr(request_conn, "context", None)
        if self.proxies and context is not None and self.proxies.trusts(context.address):
            delegate = _Forwarded(delegate, context, self.proxies)
        stream = getattr(server_conn, "stream", None)
        if stream is not None and stream in self._pending:
            return _FirstRequest(delegate, lambda: self._release(stream))
        return delegate

    def on_close(self, server_conn: object) -> None:
        stream = getattr(server_conn, "stream", None)
        if stream is not None:
            self._closed(stream)
        super().on_close(server_conn)

    async def close_all_connections(self) -> None:
        """Close pending connections too (those still in their handshake are not Tornado's
        connections yet), then the others."""
        for stream in list(self._pending):
            stream.close()
            self._closed(stream)
        await super().close_all_connections()

    def _expire(self, stream: IOStream) -> None:
        entry = self._pending.get(stream)
        if entry is not None:
            log.debug("closing a connection from %s: no request within %g s", entry.address,
                      self.limits.handshake_timeout)
        self._release(stream)
        stream.close()

    def _closed(self, stream: IOStream) -> None:
        """Stop counting a closed connection against its address (idempotent)."""
        self._release(stream)
        peer = self._open.pop(stream, None)
        if peer is not None:
            _count_down(self._open_per_address, peer)

    def _release(self, stream: IOStream) -> None:
        """Stop counting `stream` as pending (idempotent)."""
        entry = self._pending.pop(stream, None)
        if entry is None:
            return
        entry.timer.cancel()
        if _count_down(self._pending_per_address, entry.address):
            self._warned.discard(entry.address)


def _count_down(counts: Counter[str], key: str) -> bool:
    """One less for `key`; True when none is left (the key is dropped: tables stay small)."""
    counts[key] -= 1
    if counts[key] > 0:
        return False
    del counts[key]
    return True


def _peer_address(address: Any) -> str:
    """The source an accepted connection counts against: its IPv4 address, or its IPv6 /64
    (one host usually holds a whole /64, so single addresses would give it endless quotas);
    Unix sockets all count as one source."""
    if not (isinstance(address, tuple) and address):
        return "local"
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except ValueError:
        return str(address[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def listen(app: Application, port: int, address: str, limits: ConnectionLimits,
           **kwargs: Any) -> GuardedHTTPServer:
    """Serve `app` on address:port with `limits` on unauthenticated connections; `kwargs` go
    to Tornado's HTTPServer (ssl_options, chunk_size, xheaders, ...). Port 0 binds any free
    port (every address family gets the same one); `server.port` is the port bound."""
    kwargs.setdefault("idle_connection_timeout", limits.idle_timeout)
    sockets = bind_sockets(port, address)
    server = GuardedHTTPServer(app, limits=limits, **kwargs)
    server.add_sockets(sockets)
    server.port = sockets[0].getsockname()[1]
    return server
