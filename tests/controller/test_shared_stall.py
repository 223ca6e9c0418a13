"""The shared state on a database that accepts connections and answers nothing (issue 15,
review 9 #2): every caller queued on the one connection fails within one timeout, and a logout
reaches the agents while the database stalls."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.connector import AgentConnector
from controller.revoke import RevocationPusher
from controller.shared_state import Database, PostgresState, SharedLimits
from marco.errors import TryAgain
from marco.nodes import Node, NodeRegistry
from marco.revocations import DeniedTokens, Revocations, token_digest
from marco.tls import ClientTls
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.pki import TestPki
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 1.0  # shared_timeout here
CALLERS = 6


@pytest.fixture
def stalled_url() -> Iterator[str]:
    """A PostgreSQL URL of a port whose connections the kernel completes and no one reads:
    a server that stopped answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"postgresql://marco@127.0.0.1:{listener.getsockname()[1]}/marco?sslmode=disable"
    finally:
        listener.close()


def controller_tls(pki: TestPki) -> ClientTls:
    """The controller's own identity toward agents (only it may push revocations)."""
    return ClientTls(str(pki.ca_file), str(pki.controller_cert), str(pki.controller_key),
                     str(pki.crl_file))


def test_callers_queued_on_a_stalled_database_all_fail_within_one_timeout(
        stalled_url: str) -> None:
    """Six calls at once: the first waits out the timeout, the rest fail with it (before:
    each waited for the lock, then a timeout of its own: six timeouts for the last)."""
    db = Database(stalled_url, TIMEOUT)

    async def one() -> None:
        async with db.transaction() as connection:
            await connection.execute("SELECT 1")

    async def main() -> list[BaseException | None]:
        calls = asyncio.gather(*(one() for _ in range(CALLERS)), return_exceptions=True)
        try:  # a deadline of 2.5 timeouts: six one after the other would take six
            return await asyncio.wait_for(calls, TIMEOUT * 2.5)
        finally:
            await db.drop()

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, TryAgain) for outcome in outcomes), outcomes


def test_a_logout_reaches_the_agent_while_the_database_stalls(
        stalled_url: str, start_agent: Callable[..., AgentProcess], pki: TestPki,
        secret_file: Path, tmp_path: Path) -> None:
    """The push goes out at once beside the database write (before: after it, so a stalled
    database held every logout's push for shared_timeout)."""
    agent = start_agent("stall-node")
    secret = load_secret(secret_file)
    signer = TokenSigner(secret)
    token = signer.issue("alice")
    registry = NodeRegistry()
    registry.upsert(Node(name="stall-node", host=agent.host, port=agent.port, source="static"))
    # A long timeout: the push must arrive while the write still waits on the database.
    shared = PostgresState(stalled_url, SharedLimits(poll=60, listen=False, timeout=60,
                                                     max_failures=3, window=60))
    pusher = RevocationPusher(Revocations(None), registry,
                              TokenSigner(secret, SERVICE_MAX_AGE, salt=SERVICE_SALT),
                              AgentConnector(controller_tls(pki)), denied=DeniedTokens(None),
                              signer=signer, shared=shared)
    denied_file = agent.state_dir / "denied-tokens.json"

    def pushed() -> bool:
        return denied_file.exists() and token_digest(token) in json.loads(
            denied_file.read_text())

    async def main() -> None:
        logout = asyncio.ensure_future(pusher.deny(token))
        try:
            while not pushed():  # the loop must run for the push: wait without blocking it
                assert not logout.done(), "the logout ended without the agent's push"
                await asyncio.sleep(0.05)
        finally:
            logout.cancel()
            await asyncio.gather(logout, return_exceptions=True)
            await shared.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    wait_for(pushed, what="the agent to hold the logged-out token")
