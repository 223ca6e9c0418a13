"""Load: 60 real Unix users at once, each with 2 viewers (the page's sockets, through the
controller's relay, as browsers use them) on 3 agents, each running a chatty command on all 3
agents through the controller. Asserts that no line is lost, duplicated, reordered or shown to
another user; measures the delivery latency (printed and written to `load-latency.json` in the
test's temp dir; a figure for the notes, never asserted)."""

from __future__ import annotations

import asyncio
import json
import shlex
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from tornado import httpclient, websocket

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.http import login_cookie
from tests.support.run import RunNames
from tests.support.users import UnixUser, create_user, remove_user

USERS = 60
VIEWERS = 2
AGENTS = 3
LINES = 200
INTERVAL = 0.02  # 50 lines/s per execution, 9,000 lines/s in all, each to 2 viewers
CHATTY = ("/usr/bin/python3 -I -S -c " + shlex.quote(
    "import time\n"
    f"for i in range(1, {LINES + 1}):\n"
    "    print(i, repr(time.time()), flush=True)\n"
    f"    time.sleep({INTERVAL})\n"))


@pytest.fixture(scope="module")
def crowd(run: RunNames) -> Iterator[list[UnixUser]]:
    names = [run.load_user(index) for index in range(1, USERS + 1)]
    try:
        yield [create_user(name) for name in names]
    finally:
        for name in names:
            remove_user(name)


@dataclass
class Viewer:
    """One page socket of one user to one node, through the relay."""

    user: str
    node: str
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    ws: Any = None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_sixty_users_two_viewers_each_chatty_commands_on_three_agents(
        start_agent, start_controller, crowd: list[UnixUser], signer: TokenSigner,
        tmp_path: Path) -> None:
    agents = [start_agent(node_name=f"load{index}") for index in range(1, AGENTS + 1)]
    nodes = [agent.node_name for agent in agents]
    controller: ControllerProcess = start_controller(extra_args=[
        "--no-discovery", *[arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]])
    cookies = {user.name: login_cookie(controller, user) for user in crowd}  # real PAM logins
    viewers = [Viewer(user.name, node) for user in crowd for _ in range(VIEWERS) for node in nodes]
    started_ids: dict[str, dict[str, str]] = {}

    async def open_viewer(viewer: Viewer) -> None:
        request = httpclient.HTTPRequest(f"{controller.ws_url}/relay/{viewer.node}",
                                         headers={"Cookie": cookies[viewer.user]},
                                         ssl_options=controller.ssl_context,
                                         connect_timeout=60, request_timeout=60)
        viewer.ws = await websocket.websocket_connect(request, max_message_size=64 * 2**20)
        hello = json.loads(await asyncio.wait_for(viewer.ws.read_message(), 60))
        assert hello["type"] == "hello" and hello["user"] == viewer.user

    async def read_until_exits(viewer: Viewer) -> None:
        exits = 0
        while exits < 1:
            message = await viewer.ws.read_message()
            assert message is not None, f"relay closed ({viewer.ws.close_code})"
            event = json.loads(message)
            viewer.events.append((time.time(), event))
            if event["type"] == "exit":
                exits += 1

    async def run_for(user: UnixUser) -> None:
        client = httpclient.AsyncHTTPClient()
        response = await client.fetch(
            f"{controller.url}/api/run", method="POST", ssl_options=controller.ssl_context,
            headers={"Authorization": f"Bearer {signer.issue(user.name)}",
                     "Content-Type": "application/json"},
            body=json.dumps({"nodes": nodes, "command": CHATTY, "label": "load"}),
            request_timeout=120)
        results = json.loads(response.body)["results"]
        assert all(result["ok"] for result in results.values()), results
        started_ids[user.name] = {node: result["id"] for node, result in results.items()}

    async def scenario() -> float:
        httpclient.AsyncHTTPClient.configure(None, max_clients=USERS)
        opening = [asyncio.ensure_future(open_viewer(v)) for v in viewers]
        await asyncio.wait_for(asyncio.gather(*opening), 180)
        readers = [asyncio.ensure_future(read_until_exits(v)) for v in viewers]
        began = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(run_for(user) for user in crowd)), 180)
        await asyncio.wait_for(asyncio.gather(*readers), 300)
        for viewer in viewers:
            viewer.ws.close()
        return time.monotonic() - began

    processes = {"controller": psutil.Process(controller.process.pid),
                 **{a.node_name: psutil.Process(a.process.pid) for a in agents},
                 "test client": psutil.Process()}
    cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    wall = asyncio.run(scenario())
    cpu = {name: round(sum(p.cpu_times()[:2]) - cpu_before[name], 1)
           for name, p in processes.items()}

    latencies: list[float] = []
    for viewer in viewers:
        mine = started_ids[viewer.user][viewer.node]
        lines: list[int] = []
        seqs: list[int] = []
        for received, event in viewer.events:
            if "id" in event:  # every execution event a viewer sees is its own user's
                assert event["id"] == mine, (viewer.user, viewer.node, event)
            if event["type"] == "output" and event["stream"] == "stdout":
                seqs.append(event["seq"])
                for line in event["lines"]:
                    number, stamp = line.split()
                    lines.append(int(number))
                    latencies.append(received - float(stamp))
        assert lines == list(range(1, LINES + 1)), (viewer.user, viewer.node, lines[:10], len(lines))
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    delivered = len(latencies)
    assert delivered == USERS * VIEWERS * AGENTS * LINES
    figures = {
        "users": USERS, "viewers_per_user": VIEWERS, "agents": AGENTS, "lines_per_execution": LINES,
        "lines_delivered": delivered, "wall_seconds": round(wall, 2), "cpu_seconds": cpu,
        "latency_ms": {"p50": round(statistics.median(latencies) * 1000, 1),
                       "p90": round(percentile(latencies, 0.90) * 1000, 1),
                       "p99": round(percentile(latencies, 0.99) * 1000, 1),
                       "max": round(max(latencies) * 1000, 1)},
    }
    (tmp_path / "load-latency.json").write_text(json.dumps(figures, indent=1))
    print("\nload:", json.dumps(figures))
