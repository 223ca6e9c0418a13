"""Raw connections that never become requests: what a peer without a certificate can open."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Callable

from tests.support.daemon import DaemonProcess
from tests.support.waiting import wait_for

# Another loopback address as the source of the stalled connections, so a proper client from
# 127.0.0.1 is a different source address and is not counted against them.
STALLER = "127.0.0.2"
TLS_RECORD_HEADER = b"\x16\x03\x01\x02\x00"  # a handshake record of 512 bytes, none of which follow


def stalled_connection(daemon: DaemonProcess, send: bytes = b"",
                       source: str = STALLER) -> socket.socket:
    """A TCP connection to the daemon that sends `send` and then nothing."""
    sock = socket.create_connection((daemon.host, daemon.port), timeout=10,
                                    source_address=(source, 0))
    if send:
        sock.sendall(send)
    return sock


def handshake_then_nothing(daemon: DaemonProcess, source: str = STALLER) -> ssl.SSLSocket:
    """A completed TLS handshake (with the test client's certificate, if any) and no request."""
    assert daemon.ssl_context is not None
    sock = socket.create_connection((daemon.host, daemon.port), timeout=10,
                                    source_address=(source, 0))
    return daemon.ssl_context.wrap_socket(sock, server_hostname=daemon.host)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the daemon has closed (or reset) this connection; never blocks."""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):  # open, nothing to read (or a TLS ticket)
        return False
    except OSError:  # a reset, or a TLS alert or EOF
        return True
    return data == b""


def health_from(daemon: DaemonProcess, path: str, source: str = STALLER) -> int:
    """The status of GET `path` on a new connection from `source` (TLS as the test client)."""
    if daemon.ssl_context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            daemon.host, daemon.port, timeout=10, context=daemon.ssl_context,
            source_address=(source, 0))
    else:
        conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=10,
                                          source_address=(source, 0))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def check_pending_limits(daemon: DaemonProcess, limit: int, health_path: str,
                         proper_request: Callable[[], object]) -> None:
    """`limit` stalled connections from one address fill its quota: one more is closed at once
    while they stay open, a proper client from another address is served meanwhile, the
    stalled ones are closed by the handshake timeout, and then their address is served again."""
    last = (handshake_then_nothing(daemon) if daemon.ssl_context is not None
            else stalled_connection(daemon, b"GET " + health_path.encode() + b" HTTP/1.1\r\n"))
    stalled = [stalled_connection(daemon, TLS_RECORD_HEADER if index % 2 else b"")
               for index in range(limit - 1)] + [last]
    try:
        with stalled_connection(daemon) as extra:
            wait_for(lambda: closed_by_peer(extra), timeout=10,
                     what="the connection over the per-address limit to be closed")
        assert not any(closed_by_peer(sock) for sock in stalled), \
            "a stalled connection was closed before its handshake timeout"
        proper_request()  # another source address is not affected by the full quota
        assert "refusing connections from 127.0.0.2" in daemon.log()
        closed: set[int] = set()

        def all_closed() -> bool:
            closed.update(index for index, sock in enumerate(stalled) if closed_by_peer(sock))
            return len(closed) == len(stalled)

        wait_for(all_closed, timeout=15, what="the handshake timeout to close stalled connections")
        assert health_from(daemon, health_path) == 200  # the address's quota is free again
        proper_request()
    finally:
        for sock in stalled:
            sock.close()
