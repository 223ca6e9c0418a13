"""The controller's web port (HTTPS, no client certificate needed) closes connections that
never become requests after --handshake-timeout, and holds at most
--max-pending-connections-per-address of them per source address."""

from __future__ import annotations

from agent.tokens import TokenSigner
from tests.support.connections import check_pending_limits
from tests.support.users import UnixUser

LIMIT = 5


def test_controller_bounds_connections_without_a_request(start_controller, signer: TokenSigner,  # type: ignore[no-untyped-def]
                                                         alice: UnixUser) -> None:
    controller = start_controller(extra_args=[
        "--no-discovery", "--handshake-timeout", "3",
        "--max-pending-connections-per-address", str(LIMIT)])
    token = signer.issue(alice.name)
    check_pending_limits(controller, LIMIT, "/login",
                         lambda: controller.get_json("/api/inventory", token))
