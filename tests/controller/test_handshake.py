"""The controller's web port (HTTPS, no client certificate needed) closes connections that
never become requests after --handshake-timeout, and holds at most
--max-pending-connections-per-address of them per source address."""

from __future__ import annotations

import ssl

from marco.tokens import TokenSigner
from tests.support.connections import check_pending_limits
from tests.support.users import UnixUser

LIMIT = 5


def test_controller_bounds_connections_without_a_request(start_controller, signer: TokenSigner,
                                                         alice: UnixUser) -> None:
    controller = start_controller(extra_args=[
        "--no-discovery", "--handshake-timeout", "3",
        "--max-pending-connections-per-address", str(LIMIT)])
    token = signer.issue(alice.name)
    check_pending_limits(controller, LIMIT, "/login",
                         lambda: controller.get_json("/api/inventory", token))


def test_admitted_connections_are_bounded_too(start_controller) -> None:
    """After its first request's headers a connection is no longer pending: a kept-alive one
    left idle is closed after --idle-timeout, and one address holds at most
    --max-connections-per-address of them, however slowly their bodies come."""
    from tests.support.connections import closed_by_peer, handshake_then_nothing, stalled_connection
    from tests.support.waiting import wait_for
    controller = start_controller(extra_args=[
        "--no-discovery", "--handshake-timeout", "30", "--idle-timeout", "2",
        "--max-pending-connections-per-address", "5", "--max-connections-per-address", "6"])
    idle = handshake_then_nothing(controller)
    idle.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(12) == b"HTTP/1.1 200"

    def idle_closed() -> bool:  # read what is left of the answer, then see the close
        idle.setblocking(False)
        try:
            while data := idle.recv(65536):
                del data
            return True
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True
    wait_for(idle_closed, timeout=15, what="the idle keep-alive connection closed")
    slow = []
    try:
        for _ in range(6):  # headers, then a body that never completes: admitted, not pending
            sock = handshake_then_nothing(controller)
            sock.sendall(b"POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            slow.append(sock)
        with stalled_connection(controller) as extra:
            wait_for(lambda: closed_by_peer(extra), timeout=10,
                     what="the connection over the per-address total to be closed")
        assert not any(closed_by_peer(sock) for sock in slow)
        assert controller.connection(timeout=10) is not None  # 127.0.0.1 is another address
        conn = controller.connection(timeout=10)
        conn.request("GET", "/login")
        assert conn.getresponse().status == 200
    finally:
        for sock in slow:
            sock.close()
    idle.close()


def test_long_uris_are_cut_in_the_access_log(start_controller) -> None:
    """Anyone can send a long URI: the access log keeps the first 200 characters."""
    controller = start_controller(extra_args=["--no-discovery"])
    conn = controller.connection(timeout=10)
    conn.request("GET", "/login?" + "q" * 60_000)
    conn.getresponse().read()
    from tests.support.waiting import wait_for
    line = wait_for(lambda: next((x for x in controller.log().splitlines()
                                  if "GET /login?qqq" in x), None), what="the access log line")
    assert len(line) < 400 and "(+59" in line, line[:300]
