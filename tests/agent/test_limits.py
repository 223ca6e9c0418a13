"""Limits with clear errors: running executions per user, upload size, spool per user."""

from __future__ import annotations

import io
import os

import pytest

from agent.client import AgentClient
from agent.errors import NotFound, PayloadTooLarge, TooManyExecutions
from agent.tokens import TokenSigner
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def test_running_executions_per_user(start_agent, signer: TokenSigner, alice: UnixUser,  # type: ignore[no-untyped-def]
                                     bob: UnixUser) -> None:
    agent = start_agent(extra_args=["--max-running-per-user", "2"])
    alices = agent.client(signer.issue(alice.name))
    bobs = agent.client(signer.issue(bob.name))
    running = [alices.start(["sleep", "60"]) for _ in range(2)]
    with pytest.raises(TooManyExecutions, match="limit is 2"):
        alices.start(["true"])
    assert bobs.run(["true"]).rc == 0  # the limit is per user
    alices.stop(running[0])
    wait_for(lambda: alices.execution(running[0])["state"] != "running", what="stop")
    assert alices.run(["true"]).rc == 0
    alices.stop(running[1])


def test_upload_size_limit(start_agent, signer: TokenSigner, alice: UnixUser) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(extra_args=["--max-upload-bytes", "1000"])
    client = agent.client(signer.issue(alice.name))
    client.put_file(io.BytesIO(b"x" * 1000), "at-limit", size=1000)
    with pytest.raises(PayloadTooLarge, match="at most 1000"):
        client.put_file(io.BytesIO(b"x" * 2000), "too-big", size=2000)
    with pytest.raises(PayloadTooLarge, match="nothing was written"):
        client.put_file(io.BytesIO(b"x" * 3_000_000), "too-big-chunked")  # no length: chunked
    names = os.listdir(alice.home)
    assert "too-big" not in names and "too-big-chunked" not in names
    assert not any(".marco-" in name for name in names)


def test_spool_budget_per_user_drops_the_oldest_finished(start_agent, signer: TokenSigner,  # type: ignore[no-untyped-def]
                                                         alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--spool-max-bytes-per-user", "300000"])
    client = agent.client(signer.issue(alice.name))
    ids = [client.run(["seq", "1", "20000"]).id for _ in range(5)]  # ~130 KB of events each
    kept = [i for i in ids if _exists(client, i)]
    assert kept == ids[-len(kept):] and 1 <= len(kept) <= 2  # the newest survive
    assert client.output(ids[-1])["events"][0]["lines"][0] == "1"


def _exists(client: AgentClient, execution_id: str) -> bool:
    try:
        client.execution(execution_id)
        return True
    except NotFound:
        return False
