"""One socket per page against one per node (issue 15, item 3), in the same run.

    sudo flock /tmp/marco-tests.lock .venv/bin/python bench/page_sockets.py \
        [--agents 10] [--pages 20] [--users 4] [--seconds 10] [--json FILE]

N real agents (their own certificates, mutual TLS) behind one real controller; K pages, real
WebSocket clients spread over M real Unix users (Bearer tokens, as the page's cookie carries
them). First today's page: one /relay/NODE socket per node, status subscribed on each; then
the new one: one /page-socket watching every node; before both, no page at all (the
controller's own cost: health checks every 2 s, its default). For each: the sockets the pages hold to the
controller, the upstream sockets the controller holds to the agents, the controller's and the
agents' CPU (percent of a core) over `--seconds` once every page has had a status of every
node, and the status messages the pages received per second.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import tornado.httpclient
import tornado.websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.daemon import stop_all  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.run import this_run  # noqa: E402
from tests.support.users import create_user, remove_user  # noqa: E402

Socket = tornado.websocket.WebSocketClientConnection
STATUS_MARK = '"type":"status"'  # in each status, as marco.protocol.encode writes it
OPENING_AT_ONCE = 32  # sockets being opened at once


class Pages:
    """K pages' sockets and the statuses they got, per node."""

    def __init__(self, controller: ControllerProcess, tokens: list[str]) -> None:
        self.controller, self.tokens = controller, tokens
        self.sockets: list[Socket] = []
        self.received = 0
        self.seen: set[tuple[int, str]] = set()  # (page, node) that had a status
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self, path: str, token: str) -> Socket:
        request = tornado.httpclient.HTTPRequest(
            f"{self.controller.ws_url}{path}", headers={"Authorization": f"Bearer {token}"},
            ssl_options=self.controller.ssl_context, connect_timeout=60, request_timeout=60)
        ws = await tornado.websocket.websocket_connect(request, max_message_size=64 << 20)
        self.sockets.append(ws)
        return ws

    def read(self, ws: Socket, page: int, nodes: list[str], node: str | None) -> None:
        self._readers.append(asyncio.ensure_future(self._read(ws, page, nodes, node)))

    async def _read(self, ws: Socket, page: int, nodes: list[str], node: str | None) -> None:
        """Count the statuses `ws` brings; parse its frames only until its page had a status of
        each of its nodes (`node` for a relay socket): the bench's own CPU competes with the
        controller's on a small machine, and a substring count is much cheaper than JSON."""
        missing = {node} if node is not None else set(nodes)
        while (message := await ws.read_message()) is not None:
            count = message.count(STATUS_MARK) if isinstance(message, str) else 0
            self.received += count
            if not count or not missing:
                continue
            event = json.loads(message)
            # The page socket batches statuses (one `statuses` frame); the relay does not.
            for one in event["statuses"] if event.get("type") == "statuses" else [event]:
                if one.get("type") == "status":
                    seen = node or one["node"]
                    missing.discard(seen)
                    self.seen.add((page, seen))

    async def each(self, jobs: list[Callable[[], Awaitable[None]]]) -> None:
        """Run the socket openings, OPENING_AT_ONCE at a time (thousands, one by one, take
        longer than the measure)."""
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def one(job: Callable[[], Awaitable[None]]) -> None:
            async with gate:
                await job()
        await asyncio.gather(*(one(job) for job in jobs))

    async def open_relay(self, nodes: list[str]) -> None:
        """Today's page: one relay socket per node, status subscribed on each."""
        async def relay(page: int, token: str, node: str) -> None:
            ws = await self.connect(f"/relay/{node}", token)
            await ws.write_message(json.dumps({"type": "subscribe", "status": True}))
            self.read(ws, page, nodes, node)
        await self.each([functools.partial(relay, page, token, node)
                         for page, token in enumerate(self.tokens) for node in nodes])

    async def open_page_sockets(self, nodes: list[str]) -> None:
        """The new page: one socket, every node watched over it."""
        async def page_socket(page: int, token: str) -> None:
            ws = await self.connect("/page-socket", token)
            for node in nodes:
                await ws.write_message(json.dumps({"type": "watch", "node": node}))
            self.read(ws, page, nodes, None)
        await self.each([functools.partial(page_socket, page, token)
                         for page, token in enumerate(self.tokens)])

    async def close(self) -> None:
        for ws in self.sockets:
            ws.close()
        for reader in self._readers:
            reader.cancel()


def upstreams(controller: ControllerProcess, ports: set[int]) -> int:
    process = psutil.Process(controller.process.pid)
    return sum(1 for c in process.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def measure(kind: str, controller: ControllerProcess, agents: list[AgentProcess],
                  tokens: list[str], seconds: float) -> dict[str, Any]:
    nodes = [agent.node_name for agent in agents]
    ports = {agent.port for agent in agents}
    pages = Pages(controller, tokens)
    began = time.monotonic()
    if kind == "relay":
        await pages.open_relay(nodes)
    elif kind == "page-socket":
        await pages.open_page_sockets(nodes)
    wanted = len(tokens) * len(nodes) if kind != "idle" else 0
    while len(pages.seen) < wanted and time.monotonic() - began < 120:
        await asyncio.sleep(0.1)
    ready = time.monotonic() - began
    agent_pids = [agent.process.pid for agent in agents]
    held = upstreams(controller, ports)
    cpu0, agents0, got0, t0 = (cpu_seconds([controller.process.pid]), cpu_seconds(agent_pids),
                               pages.received, time.monotonic())
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    result = {
        "kind": kind, "pages": len(tokens) if kind != "idle" else 0, "nodes": len(nodes),
        "page_sockets": len(pages.sockets), "upstream_sockets": held,
        "all_statuses_after_s": round(ready, 2), "statuses_missing": wanted - len(pages.seen),
        "controller_cpu_percent": round(
            100 * (cpu_seconds([controller.process.pid]) - cpu0) / elapsed, 2),
        "agents_cpu_percent": round(100 * (cpu_seconds(agent_pids) - agents0) / elapsed, 2),
        "statuses_per_s": round((pages.received - got0) / elapsed, 1),
    }
    await pages.close()
    deadline = time.monotonic() + 30
    while upstreams(controller, ports) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the next kind starts from no upstream at all
    return result


def raise_on_sigterm() -> None:
    """SIGTERM (a `timeout`) ends the bench like Ctrl-C: through the `finally` that stops the
    daemons and removes the users."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    raise_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="page-sockets-"))
    work.chmod(0o755)
    secret = work / "secret"
    create_secret(secret)
    signer = TokenSigner(load_secret(secret))
    pki = TestPki(work / "pki")
    users = [create_user(this_run().user(f"pgbench{i}")) for i in range(args.users)]
    daemons: list[AgentProcess | ControllerProcess] = []
    try:
        agents = [AgentProcess(secret, work / f"a{i}" / "state", node_name=f"pg{i}", pki=pki,
                               extra_args=["--max-sockets-per-user", "64"])
                  for i in range(args.agents)]
        daemons += agents
        nodes = [arg for a in agents for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
        controller = ControllerProcess(secret, work, pam_service="login", pki=pki,
                                       extra_args=["--no-discovery", "--health-interval", "2",
                                                   # every page watches every node
                                                   "--page-max-nodes", str(max(64, args.agents)),
                                                   *nodes])
        daemons.append(controller)
        token = signer.issue(users[0].name)
        deadline = time.monotonic() + 60
        while len(controller.inventory_hosts(token)) < args.agents:
            if time.monotonic() > deadline:
                raise SystemExit("the agents were not all up within 60 s")
            time.sleep(0.2)
        tokens = [signer.issue(users[i % len(users)].name) for i in range(args.pages)]
        results = [asyncio.run(measure(kind, controller, agents, tokens, args.seconds))
                   for kind in ("idle", "relay", "page-socket")]
    finally:
        stop_all(daemons)
        for user in users:
            remove_user(user.name)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
