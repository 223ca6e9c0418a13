"""Connections that never become requests (no TLS handshake, a TLS record header and then
nothing, a handshake and then nothing, half a request line in --dev) are closed after
--handshake-timeout, and one source address holds at most
--max-pending-connections-per-address of them."""

from __future__ import annotations

from marco.tokens import TokenSigner
from tests.support.connections import check_pending_limits
from tests.support.users import UnixUser

LIMIT = 5
LIMITS = ["--handshake-timeout", "3", "--max-pending-connections-per-address", str(LIMIT)]


def test_agent_bounds_connections_without_a_request(start_agent, signer: TokenSigner,
                                                    alice: UnixUser) -> None:
    agent = start_agent(extra_args=LIMITS)
    client = agent.client(signer.issue(alice.name))
    check_pending_limits(agent, LIMIT, "/v1/health", client.executions)


def test_dev_agent_bounds_connections_without_a_request(start_agent) -> None:
    agent = start_agent(pki=None, extra_args=LIMITS)
    check_pending_limits(agent, LIMIT, "/v1/health", agent.client(None).health)


def test_connections_count_against_an_ipv4_address_or_an_ipv6_64() -> None:
    """One IPv6 host holds a whole /64: counting single addresses would give it endless quotas."""
    from marco.serving import _peer_address
    assert _peer_address(("2001:db8::1", 7370, 0, 0)) == _peer_address(("2001:db8::ff:1", 1)) \
        == "2001:db8::/64"
    assert _peer_address(("2001:db8:0:1::1", 1)) != "2001:db8::/64"
    assert _peer_address(("::ffff:10.0.0.1", 1)) == _peer_address(("10.0.0.1", 1)) == "10.0.0.1"
    assert _peer_address(("127.0.0.2", 1)) != _peer_address(("127.0.0.1", 1))
