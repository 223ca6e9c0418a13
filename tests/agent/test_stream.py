"""The per-user WebSocket /v1/stream against a real agent, as real users."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from marco.client import AgentStream, AsyncAgentClient
from marco.errors import AuthenticationError, PermissionDenied
from marco.tokens import TokenSigner, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.tokens import expired_token, tampered_token, wrong_salt_token
from tests.support.users import UnixUser

READ_TIMEOUT = 30.0


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


def agent_client(agent: AgentProcess, token: str) -> AsyncAgentClient:
    return agent.async_client(token)


async def read_until(stream: AgentStream, done: Callable[[dict[str, Any]], bool],
                     kinds: tuple[str, ...] = ("started", "output", "exit")) -> list[dict[str, Any]]:
    """Collect events of the given kinds until `done(event)` is true."""
    events = []
    while True:
        event = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
        assert event is not None, "stream closed early"
        if event["type"] in kinds:
            events.append(event)
        if done(event):
            return events


def lines_of(events: list[dict[str, Any]], execution_id: str, stream: str = "stdout") -> list[str]:
    """The lines of one execution's stream, checking seqs run without gap or overlap."""
    out: list[str] = []
    expected = None
    for event in events:
        if event["type"] != "output" or event["id"] != execution_id:
            continue
        if expected is not None:
            assert event["seq"] == expected, f"gap or overlap at seq {expected}"
        expected = event["seq"] + len(event["lines"])
        if event["stream"] == stream:
            out.extend(event["lines"])
    return out


def merged_lines(events: list[dict[str, Any]], execution_id: str, since: int) -> list[str]:
    """What a client merging by seq shows from `since` on (as the page does): live events may
    arrive before the replay it asked for; overlaps are dropped, a gap fails."""
    out: list[str] = []
    expected = since
    for event in sorted((e for e in events if e["type"] == "output" and e["id"] == execution_id),
                        key=lambda e: e["seq"]):
        if event["seq"] + len(event["lines"]) <= expected:
            continue
        assert event["seq"] <= expected, f"gap at seq {expected}"
        out.extend(event["lines"][expected - event["seq"]:])
        expected = event["seq"] + len(event["lines"])
    return out


def is_exit(execution_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "exit" and e["id"] == execution_id


@pytest.mark.parametrize("make_token", ["missing", "forged", "tampered", "expired", "wrong-salt"])
def test_bad_tokens_close_with_4401(shared_agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser, make_token: str) -> None:
    secret = signer._serializer.secret_keys[-1]  # the test's own secret, to forge variants
    token = {
        "missing": "",
        "forged": TokenSigner(b"f" * 40).issue(alice.name),
        "tampered": tampered_token(signer.issue(alice.name)),
        "expired": expired_token(secret, alice.name),
        "wrong-salt": wrong_salt_token(secret, alice.name),
    }[make_token]

    async def scenario() -> int | None:
        stream = agent_client(shared_agent, token).stream()
        with pytest.raises(AuthenticationError):
            await stream.connect()
        return stream.close_code

    assert run(scenario()) == 4401


def test_bad_tokens_refused_on_http(shared_agent: AgentProcess, signer: TokenSigner,
                                    alice: UnixUser) -> None:
    secret = signer._serializer.secret_keys[-1]
    for token in (TokenSigner(b"f" * 40).issue(alice.name), tampered_token(signer.issue(alice.name)),
                  expired_token(secret, alice.name), wrong_salt_token(secret, alice.name)):
        with pytest.raises(AuthenticationError):
            run(agent_client(shared_agent, token).executions())


def test_unknown_user_is_forbidden_on_the_socket(shared_agent: AgentProcess,
                                                 signer: TokenSigner) -> None:
    async def scenario() -> int | None:
        stream = agent_client(shared_agent, signer.issue("nobody-such-user")).stream()
        with pytest.raises(PermissionDenied):
            await stream.connect()
        return stream.close_code

    assert run(scenario()) == 4403


def test_first_message_must_be_auth(shared_agent: AgentProcess) -> None:
    async def scenario() -> int | None:
        stream = agent_client(shared_agent, None).stream()  # type: ignore[arg-type]
        from tornado import httpclient, websocket
        stream._ws = await websocket.websocket_connect(
            httpclient.HTTPRequest(stream.url, ssl_options=stream.ssl_context))
        await stream.send({"type": "subscribe", "status": True})
        with pytest.raises(AuthenticationError, match="authenticate first"):
            await stream.read()
        return stream.close_code

    assert run(scenario()) == 4401


def test_each_user_sees_only_their_own_executions(shared_agent: AgentProcess, signer: TokenSigner,
                                                  alice: UnixUser, bob: UnixUser) -> None:
    async def scenario() -> None:
        alice_api = agent_client(shared_agent, signer.issue(alice.name))
        bob_api = agent_client(shared_agent, signer.issue(bob.name))
        alice_stream, bob_stream = alice_api.stream(), bob_api.stream()
        await alice_stream.connect()
        await bob_stream.connect()
        alice_id = await alice_api.start("echo alice-secret-output; echo err >&2")
        bob_id = await bob_api.start(["echo", "bob-output"])
        alice_events = await read_until(alice_stream, is_exit(alice_id))
        bob_events = await read_until(bob_stream, is_exit(bob_id))
        # Start a marker execution of bob's, so anything of alice's queued for bob shows first.
        marker = await bob_api.start(["true"])
        bob_events += await read_until(bob_stream, is_exit(marker))
        assert {e["id"] for e in alice_events} == {alice_id}
        assert {e["id"] for e in bob_events} == {bob_id, marker}
        assert lines_of(alice_events, alice_id) == ["alice-secret-output"]
        assert lines_of(alice_events, alice_id, "stderr") == ["err"]
        assert [e["type"] for e in alice_events][0] == "started"
        assert alice_events[-1]["rc"] == 0
        alice_stream.close()
        bob_stream.close()

    run(scenario())


def test_million_lines_arrive_complete_and_in_order(shared_agent: AgentProcess,
                                                    signer: TokenSigner, alice: UnixUser) -> None:
    async def scenario() -> None:
        api = agent_client(shared_agent, signer.issue(alice.name))
        stream = api.stream()
        await stream.connect()
        execution_id = await api.start(["seq", "1", "1000000"])
        events = await read_until(stream, is_exit(execution_id))
        lines = lines_of(events, execution_id)
        assert len(lines) == 1_000_000
        assert lines == [str(i) for i in range(1, 1_000_001)]
        assert events[-1]["seq"] == 1_000_000
        assert len(events) < 10_000  # batched: many lines per message
        stream.close()

    run(scenario())


def test_replay_after_reconnect_has_no_gap(shared_agent: AgentProcess, signer: TokenSigner,
                                           alice: UnixUser) -> None:
    async def scenario() -> None:
        api = agent_client(shared_agent, signer.issue(alice.name))
        first = api.stream()
        await first.connect()
        execution_id = await api.start(
            "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo line-$i; sleep 0.005; done")
        seen = await read_until(first, lambda e: e["type"] == "output"
                                and e["seq"] + len(e["lines"]) >= 50)
        first.close()
        next_seq = seen[-1]["seq"] + len(seen[-1]["lines"])
        await asyncio.sleep(0.5)  # output goes on while nobody watches
        second = api.stream()
        hello = await second.connect()
        assert execution_id in {e["id"] for e in hello["executions"]}
        await second.send({"type": "replay", "id": execution_id, "since": next_seq})
        rest = await read_until(second, is_exit(execution_id), kinds=("output", "exit"))
        # Live events can come before the replay answer (the socket is live from `hello` on).
        lines = lines_of(seen, execution_id) + merged_lines(rest, execution_id, next_seq)
        assert lines == [f"line-{i}" for i in range(1, 401)]
        second.close()

    run(scenario())


def test_status_subscription(shared_agent: AgentProcess, signer: TokenSigner,
                             alice: UnixUser) -> None:
    async def scenario() -> None:
        stream = agent_client(shared_agent, signer.issue(alice.name)).stream()
        await stream.connect()
        await stream.send({"type": "subscribe", "status": True})
        snapshots: list[dict[str, Any]] = []
        while len(snapshots) < 3:
            event = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
            if event and event["type"] == "status":
                snapshots.append(event["status"])
        times = [s["time"] for s in snapshots]
        assert times == sorted(times) and times[-1] - times[0] >= 1.0
        assert snapshots[-1]["memory"]["total"] > 0 and "per_core" in snapshots[-1]["cpu"]
        await stream.send({"type": "subscribe", "status": False})
        await stream.send({"type": "ping", "data": 1})
        while ((event := await asyncio.wait_for(stream.read(), READ_TIMEOUT)) or {}).get("type") \
                != "pong":
            pass
        started = time.monotonic()
        await stream.send({"type": "ping", "data": 2})
        extra = []
        while time.monotonic() - started < 2.5:
            try:
                event = await asyncio.wait_for(stream.read(), 0.5)
            except TimeoutError:
                continue
            extra.append((event or {}).get("type"))
        assert "status" not in extra
        stream.close()

    run(scenario())


def test_stop_over_the_socket(shared_agent: AgentProcess, signer: TokenSigner,
                              alice: UnixUser, bob: UnixUser) -> None:
    async def scenario() -> None:
        api = agent_client(shared_agent, signer.issue(alice.name))
        stream = api.stream()
        await stream.connect()
        execution_id = await api.start(["sleep", "600"])
        bob_stream = agent_client(shared_agent, signer.issue(bob.name)).stream()
        await bob_stream.connect()
        await bob_stream.send({"type": "stop", "id": execution_id})
        reply = await asyncio.wait_for(bob_stream.read(), READ_TIMEOUT)
        assert reply is not None and reply["type"] == "error" and reply["error"] == "not_found"
        await stream.send({"type": "stop", "id": execution_id})
        events = await read_until(stream, is_exit(execution_id))
        assert events[-1]["signal"] == "SIGTERM" and events[-1]["stopped"]
        stream.close()
        bob_stream.close()

    run(scenario())


def test_an_open_socket_closes_when_its_token_expires(start_agent, secret_file: Path,
                                                      alice: UnixUser) -> None:
    agent = start_agent(extra_args=["--token-max-age", "2"])
    signer = TokenSigner(load_secret(secret_file), 2)  # the agent's max age: its expiry time
    token = signer.issue(alice.name)

    async def scenario() -> tuple[int | None, float]:
        stream = agent_client(agent, token).stream()
        await stream.connect()
        await stream.send({"type": "ping", "data": "still valid"})
        assert ((await asyncio.wait_for(stream.read(), READ_TIMEOUT)) or {}).get("type") == "pong"
        with pytest.raises(AuthenticationError, match="expired"):
            while True:  # the client sends nothing more: the agent closes on its own
                await asyncio.wait_for(stream.read(), READ_TIMEOUT)
        return stream.close_code, time.time()

    code, closed_at = run(scenario())
    # In order: the socket served the token while valid, and closed after it expired, not
    # before (the deadline on each read bounds how late).
    assert code == 4401 and closed_at >= signer.expires_at(token)


def test_large_replays_come_in_rounds_without_closing_the_socket(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    async def scenario() -> int:
        api = agent_client(shared_agent, signer.issue(alice.name))
        execution_id = await api.start(["seq", "1", "1500000"])  # ~15 MB of stored events
        while (await api.execution(execution_id))["state"] == "running":
            await asyncio.sleep(0.1)
        stream = api.stream()
        await stream.connect()
        lines: list[str] = []
        since, rounds = 0, 0
        while True:
            await stream.send({"type": "replay", "id": execution_id, "since": since})
            rounds += 1
            events = await read_until(stream, lambda e: e["type"] == "replayed",
                                      kinds=("output", "replayed"))
            lines += lines_of(events[:-1], execution_id)
            since = events[-1]["next"]
            if events[-1]["complete"]:
                break
        assert lines == [str(i) for i in range(1, 1_500_001)]
        stream.close()
        return rounds

    assert run(scenario()) > 1
