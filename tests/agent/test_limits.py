"""Limits with clear errors: running executions per user, upload size, spool per user."""

from __future__ import annotations

import io
import json
import os
import time

import pytest

from marco.client import AgentClient
from marco.errors import NotFound, PayloadTooLarge, TooManyExecutions
from marco.tokens import TokenSigner
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def test_running_executions_per_user(start_agent, signer: TokenSigner, alice: UnixUser,
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


def test_upload_size_limit(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
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


def test_spool_budget_per_user_drops_the_oldest_finished(start_agent, signer: TokenSigner,
                                                         alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--spool-max-bytes-per-user", "300000"])
    client = agent.client(signer.issue(alice.name))
    ids = [client.run(["seq", "1", "20000"]).id for _ in range(5)]  # ~130 KB of events each
    kept = [i for i in ids if _exists(client, i)]
    assert kept == ids[-len(kept):] and 1 <= len(kept) <= 2  # the newest survive
    assert client.output(ids[-1])["events"][0]["lines"][0] == "1"


def test_retention_keeps_each_users_newest(start_agent, signer: TokenSigner, alice: UnixUser,
                                           bob: UnixUser) -> None:
    """On each exit its user's oldest finished executions beyond the count go; bob's own
    count is his."""
    agent = start_agent(extra_args=["--retention-count", "2"])
    alices = agent.client(signer.issue(alice.name))
    bobs = agent.client(signer.issue(bob.name))
    bobs_first = bobs.run(["true"]).id
    ids = [alices.run(["echo", str(i)]).id for i in range(4)]
    assert [e["id"] for e in alices.executions()] == ids[-2:]
    assert [e["id"] for e in bobs.executions()] == [bobs_first]
    records = agent.state_dir / "executions"
    wait_for(lambda: sorted(os.listdir(records)) == sorted([bobs_first, *ids[-2:]]),
             what="only the kept executions' records on disk")
    assert bobs.run(["true"]).rc == 0 and bobs_first in {e["id"] for e in bobs.executions()}


def test_retention_time_forgets_old_records_at_the_next_exit(start_agent, signer: TokenSigner,
                                                             alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--retention", "1"])
    client = agent.client(signer.issue(alice.name))
    old = client.execution(client.run(["true"]).id)
    wait_for(lambda: time.time() > old["ended"] + 1.5, what="the record to be older than 1 s")
    new = client.run(["true"]).id
    assert [e["id"] for e in client.executions()] == [new]


def _exists(client: AgentClient, execution_id: str) -> bool:
    try:
        client.execution(execution_id)
        return True
    except NotFound:
        return False


def test_command_size_is_capped(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
    """argv, shell, env and cwd are held in memory, listings and meta.json: capped, with 413."""
    agent = start_agent(extra_args=["--max-command-bytes", "10000"])
    client = agent.client(signer.issue(alice.name))
    assert client.run(["echo", "x" * 9000]).rc == 0
    for too_big in (dict(command=["echo", "x" * 20_000]), dict(command="echo " + "y" * 20_000),
                    dict(command=["true"], env={"BIG": "z" * 20_000})):
        with pytest.raises(PayloadTooLarge, match="at most 10000"):
            client.run(**too_big)
    assert [e for e in client.executions() if "y" * 100 in str(e["command"])] == []


def test_listings_and_hello_shorten_long_commands(start_agent, signer: TokenSigner,
                                                  alice: UnixUser) -> None:
    """Every socket's `hello` carries every kept execution: long commands go out shortened
    there and in listings, whole on request."""
    import asyncio
    agent = start_agent()
    token = signer.issue(alice.name)
    client = agent.client(token)
    long = "echo " + "w" * 100_000
    execution = client.run(long).id
    listed = next(e for e in client.executions() if e["id"] == execution)
    assert listed["command_shortened"] is True and len(listed["command"]) <= 1001
    assert client.execution(execution)["command"] == long  # the whole command on request

    async def hello() -> dict:
        stream = agent.async_client(token).stream()
        try:
            return await stream.connect()
        finally:
            stream.close()
    greeting = asyncio.run(hello())
    shown = next(e for e in greeting["executions"] if e["id"] == execution)
    assert shown["command_shortened"] is True and len(shown["command"]) <= 1001
    assert len(json.dumps(greeting)) < 10_000


def test_sockets_per_user_are_capped(start_agent, signer: TokenSigner, alice: UnixUser,
                                     bob: UnixUser) -> None:
    import asyncio

    from marco.errors import TooManySockets
    agent = start_agent(extra_args=["--max-sockets-per-user", "3"])

    async def scenario() -> None:
        alices = [agent.async_client(signer.issue(alice.name)).stream() for _ in range(4)]
        for stream in alices[:3]:
            await stream.connect()
        with pytest.raises(TooManySockets, match="limit is 3"):
            await alices[3].connect()
        bobs = agent.async_client(signer.issue(bob.name)).stream()
        await bobs.connect()  # per user
        alices[0].close()
        async def reconnect() -> bool:
            try:
                await agent.async_client(signer.issue(alice.name)).stream().connect()
                return True
            except TooManySockets:
                await asyncio.sleep(0.1)
                return False
        deadline = asyncio.get_running_loop().time() + 10
        while not await reconnect():  # a closed socket frees its place
            assert asyncio.get_running_loop().time() < deadline
        for stream in [*alices, bobs]:
            stream.close()
    asyncio.run(scenario())


def test_slow_consumer_bound_counts_the_message_being_added(start_agent, signer: TokenSigner,
                                                            alice: UnixUser) -> None:
    """A message larger than the socket's bound is not queued on top of an empty queue: the
    socket is closed (4408) and the client replays instead."""
    import asyncio

    from marco.errors import MarcoError
    from marco.protocol import CLOSE_SLOW_CONSUMER
    agent = start_agent(extra_args=["--max-socket-pending-bytes", "8192"])
    token = signer.issue(alice.name)

    async def scenario() -> tuple[int | None, list[str]]:
        stream = agent.async_client(token).stream()
        await stream.connect()
        client = agent.async_client(token)
        small = await client.start("echo small")
        kinds = []
        while True:  # the positive event first: small messages pass
            event = await asyncio.wait_for(stream.read(), 20)
            assert event is not None
            kinds.append(event["type"])
            if event["type"] == "exit" and event["id"] == small:
                break
        big = await client.start("head -c 50000 /dev/zero | tr '\\0' a; echo")
        with pytest.raises(MarcoError, match="4408"):
            while (event := await asyncio.wait_for(stream.read(), 20)) is not None:
                kinds.append(event["type"] + (" big" if event["id"] == big else ""))
        return stream.close_code, kinds
    code, kinds = asyncio.run(scenario())
    assert code == CLOSE_SLOW_CONSUMER and "output" in kinds
    assert "output big" not in kinds  # never queued: the socket closed instead


def test_wait_captures_and_running_spools_count_in_the_user_budget(
        start_agent, signer: TokenSigner, alice: UnixUser, bob: UnixUser) -> None:
    """`?wait=1` captures (unlinked temp files `du` does not see) and the spools of running
    executions are the user's disk too: bounded by the budget, then 507 instead of a full
    disk; other users are not touched."""
    from marco.errors import InsufficientStorage
    agent = start_agent(extra_args=["--spool-max-bytes-per-user", "1000000"])
    alices = agent.client(signer.issue(alice.name))
    big = alices.run("head -c 3000000 /dev/zero | tr '\\0' a; echo")
    assert big.stdout_truncated and 0 < len(big.stdout) < 1_000_000, len(big.stdout)
    # A running execution that filled the budget: its spool stops storing (and says where) ...
    flood = alices.start("seq 1 400000; sleep 60")
    wait_for(lambda: alices.execution(flood)["truncated_seq"] is not None,
             what="the running execution's spool to reach the budget")
    # ... and the user's next execution is refused with a clear reason, nothing written.
    with pytest.raises(InsufficientStorage, match="disk budget"):
        alices.start(["true"])
    assert agent.client(signer.issue(bob.name)).run(["true"]).rc == 0  # per user
    alices.stop(flood)
    wait_for(lambda: alices.execution(flood)["state"] != "running", what="stop")
    assert alices.run(["true"]).rc == 0  # the finished flood makes room
    spools = sum(f.stat().st_size for f in (agent.state_dir / "executions").rglob("*")
                 if f.is_file())
    assert spools <= 1_000_000 + 64 * 1024, spools


def test_audit_log_rotates_and_reopens_on_sighup(start_agent, signer: TokenSigner,
                                                 alice: UnixUser) -> None:
    import signal
    agent = start_agent(extra_args=["--audit-max-bytes", "20000", "--audit-backups", "2"])
    client = agent.client(signer.issue(alice.name))
    for index in range(60):
        client.run(["echo", f"{index:03d}" + "x" * 600])
    audit = agent.state_dir / "audit.log"
    rotated = sorted(p.name for p in agent.state_dir.glob("audit.log.*"))
    assert rotated == ["audit.log.1", "audit.log.2"], rotated
    assert all(p.stat().st_size < 20000 + 2000 for p in agent.state_dir.glob("audit.log*"))
    assert "059" + "x" * 600 in audit.read_text()  # the newest events in the live file
    # logrotate's way: rename, then SIGHUP; the agent writes to a new file at the old path.
    moved = agent.state_dir / "audit.log.logrotate"
    audit.rename(moved)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(audit.exists, what="the agent to reopen its audit log")
    client.run(["echo", "after-hup"])
    assert "after-hup" in audit.read_text() and "after-hup" not in moved.read_text()
    assert agent.process.poll() is None and (audit.stat().st_mode & 0o777) == 0o600


def test_stdin_and_cwd_are_capped(start_agent, signer: TokenSigner, alice: UnixUser) -> None:
    """stdin waits in the agent's memory until the command reads it, a cwd is in every
    listing: both are bounded with a clear error."""
    from marco.errors import BadRequest
    agent = start_agent(extra_args=["--max-stdin-bytes", "100000"])
    client = agent.client(signer.issue(alice.name))
    assert client.run(["wc", "-c"], stdin=b"x" * 100_000).stdout.strip() == b"100000"
    with pytest.raises(PayloadTooLarge, match="at most 100000"):
        client.run(["sleep", "60"], stdin=b"x" * 200_000)
    with pytest.raises(BadRequest, match="PATH_MAX"):
        client.run(["true"], cwd="/" + "d" * 5000)


def test_slow_consumer_bound_counts_bytes_not_characters(start_agent, signer: TokenSigner,
                                                         alice: UnixUser) -> None:
    """Output of 4-byte characters: 3,000 characters are 12,000 bytes, past an 8 KiB bound."""
    import asyncio

    from marco.errors import MarcoError
    agent = start_agent(extra_args=["--max-socket-pending-bytes", "8192"])
    token = signer.issue(alice.name)

    async def scenario() -> list[str]:
        stream = agent.async_client(token).stream()
        await stream.connect()
        emoji = await agent.async_client(token).start(
            "python3 -c \"print(chr(0x1F600) * 3000)\"")
        seen = []
        with pytest.raises(MarcoError, match="4408"):
            while (event := await asyncio.wait_for(stream.read(), 20)) is not None:
                seen.append(event["type"] + (" emoji" if event.get("id") == emoji else ""))
        return seen
    assert "output emoji" not in asyncio.run(scenario())
