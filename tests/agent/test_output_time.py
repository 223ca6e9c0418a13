"""Output events carry the node's time (docs/protocol.md "Output events and `seq`"): the same
value live, in the spool, in both replays; a spool an older agent wrote (no `time`) still
replays. Against real agents, as a real user."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from marco.client import AgentStream, AsyncAgentClient
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.users import UnixUser

READ_TIMEOUT = 30.0
TWO_LINES = "echo a; sleep 0.3; echo b"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def live_events(stream: AgentStream, execution_id: str) -> list[dict[str, Any]]:
    """The execution's `output` events as the socket sends them, until its `exit`."""
    events = []
    while True:
        event = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
        assert event is not None, "stream closed early"
        if event.get("id") != execution_id:
            continue
        if event["type"] == "output":
            events.append(event)
        if event["type"] == "exit":
            return events


async def socket_replay(stream: AgentStream, execution_id: str) -> list[dict[str, Any]]:
    """The execution's stored events as the socket's `replay` sends them."""
    await stream.send({"type": "replay", "id": execution_id, "since": 0})
    events = []
    while True:
        event = await asyncio.wait_for(stream.read(), READ_TIMEOUT)
        assert event is not None, "stream closed early"
        if event["type"] == "output" and event["id"] == execution_id:
            events.append(event)
        if event["type"] == "replayed" and event["id"] == execution_id:
            assert event["complete"]
            return events


def stamps(events: list[dict[str, Any]]) -> list[tuple[int, list[str], float | None]]:
    """Each event's seq, lines and time (None when it has none)."""
    return [(e["seq"], e["lines"], e.get("time")) for e in events]


def test_each_event_carries_the_time_its_first_line_was_read(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    async def scenario() -> None:
        api = shared_agent.async_client(signer.issue(alice.name))
        stream = api.stream()
        await stream.connect()
        execution_id = await api.start(TWO_LINES)
        live = await live_events(stream, execution_id)
        replayed = await socket_replay(stream, execution_id)
        stream.close()
        answer = await api.output(execution_id)
        execution = answer["execution"]
        assert [(seq, lines) for seq, lines, _ in stamps(live)] == [(0, ["a"]), (1, ["b"])]
        first, second = (time for _, _, time in stamps(live))
        assert isinstance(first, float) and isinstance(second, float)
        assert execution["started"] <= first < second <= execution["ended"]
        assert second - first >= 0.25  # the shell's sleep lies between the two reads
        assert round(first, 6) == first and round(second, 6) == second
        # The spool keeps what went live: both replays give the same times.
        assert stamps(replayed) == stamps(live)
        assert stamps(answer["events"]) == stamps(live)

    run(scenario())


def test_a_last_line_without_newline_keeps_the_time_it_was_read(
        shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    """It goes out only at exit, but carries the time of the read that brought it."""
    async def scenario() -> None:
        api = shared_agent.async_client(signer.issue(alice.name))
        stream = api.stream()
        await stream.connect()
        execution_id = await api.start("printf partial; sleep 1")
        live = await live_events(stream, execution_id)
        stream.close()
        execution = await api.execution(execution_id)
        assert [(seq, lines) for seq, lines, _ in stamps(live)] == [(0, ["partial"])]
        assert execution["started"] <= live[0]["time"] <= execution["ended"] - 0.5

    run(scenario())


def without_times(spool: Path) -> list[tuple[int, list[str], None]]:
    """Rewrite an output spool as an older agent wrote it (no `time`); its events' seq and
    lines, as a replay should give them."""
    events = [json.loads(line) for line in spool.read_text().splitlines()]
    assert events and all("time" in event for event in events)
    for event in events:
        del event["time"]
    spool.write_text("".join(json.dumps(event) + "\n" for event in events))
    return [(event["seq"], event["lines"], None) for event in events]


def test_a_spool_written_without_times_still_replays(start_agent, signer: TokenSigner,
                                                     alice: UnixUser) -> None:
    agent = start_agent()
    token = signer.issue(alice.name)
    with agent.client(token, timeout=60) as client:
        execution_id = client.run("seq 1 3").id
    agent.stop()
    expected = without_times(agent.state_dir / "executions" / execution_id / "output.jsonl")
    again = agent.restarted()
    try:
        async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            api: AsyncAgentClient = again.async_client(token)
            stream = api.stream()
            await stream.connect()
            replayed = await socket_replay(stream, execution_id)
            stream.close()
            return replayed, (await api.output(execution_id))["events"]

        replayed, page = run(scenario())
        assert [line for _, lines, _ in expected for line in lines] == ["1", "2", "3"]
        assert stamps(replayed) == stamps(page) == expected
        assert all("time" not in event for event in replayed + page)  # absent, not null
    finally:
        again.stop()
