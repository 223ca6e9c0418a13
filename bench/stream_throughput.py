"""Streaming benchmark: lines/s from `seq 1 N` to a subscribed WebSocket, and line latency.

Measured in one run against a naive baseline shaped like the ancestor (MarcoDeployer): read the
child's stdout line by line and send one WebSocket message per line. Both run the same command
on this machine over loopback; the figure that matters is the ratio.

    python bench/stream_throughput.py [--lines 1000000] [--sparse 500]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tornado.httpserver  # noqa: E402
import tornado.netutil  # noqa: E402
import tornado.process  # noqa: E402
import tornado.web  # noqa: E402
import tornado.websocket  # noqa: E402
from tornado.iostream import StreamClosedError  # noqa: E402

from marco.client import AsyncAgentClient  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

SPARSE_COMMAND = ("import time,sys\n"
                  "for i in range({n}):\n"
                  "    print(repr(time.time()), flush=True); time.sleep(0.01)\n")


class NaiveLineSocket(tornado.websocket.WebSocketHandler):
    """The ancestor's way: one message per line, read line by line from the pipe."""

    async def open(self) -> None:  # type: ignore[override]
        count = int(self.get_query_argument("lines"))
        process = tornado.process.Subprocess(["seq", "1", str(count)],
                                             stdout=tornado.process.Subprocess.STREAM)
        assert process.stdout is not None
        try:
            while True:
                line = await process.stdout.read_until(b"\n")
                await self.write_message(json.dumps({"line": line.decode().rstrip("\n")}))
        except StreamClosedError:
            pass
        await process.wait_for_exit(raise_error=False)
        self.close()


async def naive_lines_per_second(lines: int) -> float:
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")  # any free port, no race
    port = sockets[0].getsockname()[1]
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/naive", NaiveLineSocket)]))
    server.add_sockets(sockets)
    try:
        started = time.perf_counter()
        ws = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/naive?lines={lines}")
        received = 0
        while (message := await ws.read_message()) is not None:
            json.loads(message)
            received += 1
        elapsed = time.perf_counter() - started
        assert received == lines, (received, lines)
        return lines / elapsed
    finally:
        server.stop()


async def marco_lines_per_second(api: AsyncAgentClient, lines: int) -> float:
    stream = api.stream()
    await stream.connect()
    started = time.perf_counter()
    execution_id = await api.start(["seq", "1", str(lines)])
    received = 0
    while True:
        event = await stream.read()
        assert event is not None
        if event.get("id") != execution_id:
            continue
        if event["type"] == "output":
            received += len(event["lines"])
        elif event["type"] == "exit":
            break
    elapsed = time.perf_counter() - started
    stream.close()
    assert received == lines, (received, lines)
    return lines / elapsed


async def sparse_latency_ms(api: AsyncAgentClient, count: int) -> list[float]:
    """Delay from a line's print (its own timestamp) to its arrival, one line every 10 ms."""
    stream = api.stream()
    await stream.connect()
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    execution_id = await api.start([python, "-c", SPARSE_COMMAND.format(n=count)])
    delays = []
    while True:
        event = await stream.read()
        assert event is not None
        now = time.time()
        if event.get("id") != execution_id:
            continue
        if event["type"] == "output":
            delays += [(now - float(line)) * 1000 for line in event["lines"]]
        elif event["type"] == "exit":
            break
    stream.close()
    return delays


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="marco-bench-") as tmp:
        secret = create_secret(Path(tmp) / "secret")
        token = TokenSigner(load_secret(secret)).issue(getpass.getuser())
        pki = TestPki(Path(tmp) / "pki")
        agent = AgentProcess(secret, Path(tmp) / "state", node_name="bench",
                             extra_args=["--log-level", "warning"], pki=pki)
        dev = AgentProcess(secret, Path(tmp) / "state-dev", node_name="bench-dev",
                           extra_args=["--log-level", "warning"])
        try:
            api = agent.async_client(token)
            plain = dev.async_client(token)
            marco = [await marco_lines_per_second(api, args.lines) for _ in range(args.runs)]
            marco_dev = [await marco_lines_per_second(plain, args.lines) for _ in range(args.runs)]
            naive = [await naive_lines_per_second(args.lines) for _ in range(args.runs)]
            delays = await sparse_latency_ms(api, args.sparse)
        finally:
            agent.stop()
            dev.stop()
    best_marco, best_naive = statistics.median(marco), statistics.median(naive)
    best_dev = statistics.median(marco_dev)
    print(f"| method | lines/s (median of {args.runs}) | ratio |")
    print("|---|---:|---:|")
    print(f"| marco agent, batched messages, mutual TLS | {best_marco:,.0f} | "
          f"{best_marco / best_naive:.1f}x |")
    print(f"| marco agent, batched messages, --dev (plain) | {best_dev:,.0f} | "
          f"{best_dev / best_naive:.1f}x |")
    print(f"| naive: one message per line, plain | {best_naive:,.0f} | 1.0x |")
    print()
    print(f"sparse output ({args.sparse} lines, one every 10 ms): latency p50 "
          f"{percentile(delays, 0.5):.1f} ms, p99 {percentile(delays, 0.99):.1f} ms, "
          f"max {max(delays):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sparse", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
