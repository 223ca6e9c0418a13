"""The sync client's connection handling: stale kept-alive sockets, no duplicate POSTs,
early refusals of uploads."""

from __future__ import annotations

import io
import socket
import threading
import time
from typing import BinaryIO, cast

import pytest

from marco.client import AgentClient
from marco.errors import AgentUnreachable, Conflict
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.users import UnixUser


def test_reconnects_after_the_agent_restarted(start_agent, signer: TokenSigner,
                                              alice: UnixUser) -> None:
    agent = start_agent()
    client = agent.client(signer.issue(alice.name))
    assert client.run(["true"]).rc == 0
    agent.stop()
    again = agent.restarted()
    try:
        assert client.run(["echo", "after restart"]).stdout == b"after restart\n"
    finally:
        again.stop()
    with pytest.raises(AgentUnreachable, match="cannot reach"):
        client.run(["true"])


def test_a_post_is_never_sent_twice() -> None:
    """A server that reads the POST and drops the connection: the client reports it, once."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    posts = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)  # GET /v1/health
            body = b'{"node": "fake"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            posts.append(conn.recv(65536))  # the POST ... then drop the connection
        try:
            second, _ = server.accept()
            posts.append(second.recv(65536))
            second.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = AgentClient("127.0.0.1", port, "token", timeout=3)
    assert client.health() == {"node": "fake"}
    with pytest.raises(AgentUnreachable):
        client.run(["rm", "-rf", "something"])
    time.sleep(0.3)
    server.close()
    assert len([p for p in posts if p.startswith(b"POST")]) == 1


def test_refused_upload_answers_before_the_body_moves(shared_agent: AgentProcess,
                                                      signer: TokenSigner, alice: UnixUser) -> None:
    client = shared_agent.client(signer.issue(alice.name))
    client.put_file(io.BytesIO(b"keep"), "exists.bin", size=4)

    class CountingReader(io.RawIOBase):
        """50 MB of zeros that counts what is read of it."""

        def __init__(self) -> None:
            self.read_bytes = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(len(buffer), 50_000_000 - self.read_bytes)
            buffer[:n] = b"\0" * n
            self.read_bytes += n
            return n

    source = CountingReader()
    with pytest.raises(Conflict, match="exists"):
        client.put_file(cast(BinaryIO, source), "exists.bin", overwrite=False, size=50_000_000)
    assert source.read_bytes == 0
    assert client.run(["cat", "exists.bin"]).stdout == b"keep"  # and the client still works
