"""ZeroconfBrowser's resolutions per service name: a flood of announcements for one name (a
rogue flipping its TXT record) makes one more pass after the running one, never a queue (the
mDNS resolution replaced by a slow stand-in: that test is about the scheduling). And which
services it tries again: real announcements on the loopback, real health checks."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from agent.announce import Announcement, Announcer
from marco.discovery import DiscoveryLimits, Outcome, ZeroconfBrowser
from marco.health import HealthMonitor, Probe
from marco.nodes import Node, NodeRegistry
from marco.protocol import SERVICE_TYPE
from marco.tokens import load_secret
from tests.support.pki import TestPki
from tests.support.sim_agents import SimulatorProcess


def test_announcements_during_a_resolution_make_one_more_pass() -> None:
    browser = ZeroconfBrowser(NodeRegistry(), ["127.0.0.1"])
    passes: list[str] = []
    release = asyncio.Event()

    async def slow_resolve(name: str) -> Outcome:  # stands in for an unanswered 2 s probe
        passes.append(name)
        await release.wait()
        return Outcome.SETTLED

    browser._resolve_one = slow_resolve  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.ensure_future(browser._resolve("rogue._marco._tcp.local."))
        await asyncio.sleep(0)
        flood = [asyncio.ensure_future(browser._resolve("rogue._marco._tcp.local."))
                 for _ in range(500)]
        await asyncio.gather(*flood)  # each returns at once: nothing waits behind the lock
        assert passes == ["rogue._marco._tcp.local."]
        release.set()
        await first
        assert len(passes) == 2  # the flood's one pass, after the first
        assert browser._resolving == {}

    asyncio.run(scenario())


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll `predicate` on the loop until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def service(node: str) -> str:
    return f"{node}.{SERVICE_TYPE}"


def test_a_wrong_answer_is_not_tried_again_and_no_answer_only_so_often(
        pki: TestPki, secret_file: Path, tmp_path: Path, unique_name) -> None:
    """A forged service (a wrong secret proof) is checked once; one whose port never answers
    `retry_tries` times more, then left to its next announcement; one whose first check is
    lost (503) is tried again and listed."""
    prefix = unique_name("retries")
    good, forged, unlucky = f"{prefix}-0", f"{prefix}-1", f"{prefix}-2"
    silent = unique_name("silent")
    simulator = SimulatorProcess(pki, secret_file, tmp_path, prefix, 3, bad_proof=[forged],
                                 fail_first_health=[unlucky])
    registry = NodeRegistry()
    monitor = HealthMonitor(registry, 1.0, keys=load_secret(secret_file),
                            tls=pki.client_tls())
    checks: Counter[str] = Counter()
    unanswered: Counter[str] = Counter()

    async def probe(node: Node) -> Probe:
        checks[node.name] += 1
        result = await monitor.probe(node)
        unanswered[node.name] += not result.answered
        return result

    browser = ZeroconfBrowser(registry, ["127.0.0.1"], verify=probe, limits=DiscoveryLimits(
        retry_first=0.05, retry_longest=0.1, retry_tries=3, rebrowse=0))

    async def scenario(closed_port: int) -> None:
        announcer = Announcer(Announcement(node=silent, port=closed_port,
                                           addresses=("127.0.0.1",), tls=True), ["127.0.0.1"])
        await announcer.start()
        await browser.start()
        try:
            await eventually(lambda: registry.get(good) and registry.get(unlucky),
                             "the good and the unlucky simulated agents listed")
            await eventually(lambda: service(forged) in browser._given_up, "the forged one "
                             "given up")
            await eventually(lambda: service(silent) in browser._given_up, "the silent one "
                             "given up")
            assert checks[forged] == 1 and registry.get(forged) is None
            assert checks[silent] == 1 + 3  # its first check and `retry_tries` more
            # Tried again once per check it did not answer. Its one 503 is usually ours; a
            # controller of another test browsing the same loopback may take it first.
            assert checks[unlucky] == 1 + unanswered[unlucky] <= 2
            for name in (forged, silent):
                assert service(name) not in browser._retries  # no timer left to dial it
        finally:
            await browser.stop()
            await announcer.stop()
            monitor.stop()

    try:
        simulator.wait_ready()
        with socket.socket() as closed:  # bound, never listening: refused, no answer
            closed.bind(("127.0.0.1", 0))
            asyncio.run(scenario(closed.getsockname()[1]))
    finally:
        assert simulator.stop() == 0, simulator.log()


def test_the_mdns_sockets_get_the_receive_buffer_asked_for() -> None:
    """A burst of announcements (a hundred agents starting at once) overflowed the system's
    default buffer: the browser's sockets take `receive_buffer` (the kernel reports double)."""
    asked = 3 * 1024 * 1024

    async def buffers(limits: DiscoveryLimits) -> list[int]:
        browser = ZeroconfBrowser(NodeRegistry(), ["127.0.0.1"], limits=limits)
        await browser.start()
        try:
            assert browser._zc is not None
            engine = browser._zc.zeroconf.engine
            sockets = [s for s in [engine._listen_socket, *engine._respond_sockets] if s]
            return [s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in sockets]
        finally:
            await browser.stop()

    grown = asyncio.run(buffers(DiscoveryLimits(rebrowse=0, receive_buffer=asked)))
    assert grown and all(size >= asked for size in grown), grown
    default = asyncio.run(buffers(DiscoveryLimits(rebrowse=0, receive_buffer=0)))
    assert all(size < asked for size in default), default
