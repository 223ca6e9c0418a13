"""Tests of agent.status against the real machine (real psutil, real child processes)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from agent.status import StatusPublisher, StatusSampler

NUMBER = (int, float)


@pytest.fixture(params=["procfs", "psutil"])
def make_sampler(request):
    """Samplers reading process CPU the fast way (/proc/<pid>/stat) and the portable way."""
    def make(node_name: str = "n1", top_n: int = 10) -> StatusSampler:
        sampler = StatusSampler(node_name, top_n=top_n)
        sampler.fast_procfs = request.param == "procfs"
        return sampler
    return make


class CountingSampler(StatusSampler):
    """A real sampler that counts its snapshots."""

    def __init__(self, node_name: str = "n1") -> None:
        super().__init__(node_name)
        self.count = 0

    def snapshot(self) -> dict[str, Any]:
        self.count += 1
        return super().snapshot()


@pytest.fixture
def busy_child():
    """A child process spinning on a CPU until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_snapshot_fields_and_types(make_sampler):
    sampler = make_sampler("node-a", top_n=5)
    snap = sampler.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert set(snap) == {"time", "node", "hostname", "addresses", "uptime", "kernel", "os", "cpu",
                         "load", "memory", "swap", "temperature", "network", "processes"}
    assert abs(snap["time"] - time.time()) < 60
    assert snap["node"] == "node-a"
    assert isinstance(snap["hostname"], str) and snap["hostname"]
    assert isinstance(snap["kernel"], str) and isinstance(snap["os"], str)
    assert isinstance(snap["uptime"], NUMBER) and snap["uptime"] > 0
    for a in snap["addresses"]:
        assert set(a) == {"interface", "address", "family"}
        assert a["family"] in ("ipv4", "ipv6")
    loops = [a["address"] in ("127.0.0.1", "::1") for a in snap["addresses"]]
    assert loops == sorted(loops), "non-loopback addresses come first"
    cpu = snap["cpu"]
    assert cpu["count"] == len(cpu["per_core"]) >= 1
    assert all(isinstance(x, NUMBER) and 0 <= x <= 100 for x in [cpu["percent"], *cpu["per_core"]])
    assert len(snap["load"]) == 3 and all(isinstance(x, NUMBER) for x in snap["load"])
    mem = snap["memory"]
    assert set(mem) == {"total", "available", "used", "buffers", "cached", "percent"}
    assert all(isinstance(mem[k], int) for k in ("total", "available", "used", "buffers", "cached"))
    assert 0 < mem["available"] <= mem["total"]
    assert set(snap["swap"]) == {"total", "used", "percent"}
    assert snap["temperature"] is None or isinstance(snap["temperature"], float)
    net = snap["network"]
    assert set(net) == {"rx_bytes", "tx_bytes", "rx_rate", "tx_rate"}
    assert isinstance(net["rx_bytes"], int) and isinstance(net["tx_bytes"], int)
    assert net["rx_rate"] == 0 and net["tx_rate"] == 0, "no rate on the first snapshot"
    procs = snap["processes"]
    assert 0 < len(procs) <= 5
    for p in procs:
        assert set(p) == {"pid", "user", "name", "cpu", "rss"}
        assert isinstance(p["pid"], int) and isinstance(p["user"], str)
        assert isinstance(p["name"], str) and isinstance(p["rss"], int)
        assert isinstance(p["cpu"], NUMBER)


def test_snapshot_values_match_the_system(make_sampler):
    """The numbers are this machine's, not just of the right type (psutil and the kernel read
    independently, within what can change between the two reads)."""
    import platform
    import socket
    sampler = make_sampler("node-v")
    snap = sampler.snapshot()
    assert snap["hostname"] == socket.gethostname()
    assert snap["kernel"] == platform.release()
    assert abs(snap["uptime"] - (time.time() - psutil.boot_time())) < 5
    assert snap["cpu"]["count"] == psutil.cpu_count()
    for ours, kernel in zip(snap["load"], os.getloadavg(), strict=True):
        assert abs(ours - kernel) < 0.5 + kernel * 0.2
    memory = psutil.virtual_memory()
    assert snap["memory"]["total"] == memory.total
    assert abs(snap["memory"]["available"] - memory.available) < max(memory.total * 0.05, 64 << 20)
    assert snap["swap"]["total"] == psutil.swap_memory().total
    counters = psutil.net_io_counters(pernic=True)
    outside = [c for name, c in counters.items() if name != "lo"]
    received = sum(c.bytes_recv for c in outside)
    assert received <= snap["network"]["rx_bytes"] + (1 << 20) and \
        snap["network"]["rx_bytes"] <= received + (1 << 20)


def test_busy_child_raises_cpu_and_tops_the_process_list(make_sampler, busy_child):
    sampler = make_sampler()
    sampler.snapshot()
    time.sleep(0.5)
    snap = sampler.snapshot()
    assert snap["cpu"]["percent"] > 0
    assert max(snap["cpu"]["per_core"]) > 0
    top = {p["pid"]: p for p in snap["processes"]}
    assert busy_child.pid in top
    assert top[busy_child.pid]["cpu"] > 10
    assert top[busy_child.pid]["name"].startswith("python")
    assert top[busy_child.pid]["user"] == pwd.getpwuid(os.getuid()).pw_name
    assert top[busy_child.pid]["rss"] > 0
    cpus = [p["cpu"] for p in snap["processes"]]
    assert cpus == sorted(cpus, reverse=True)


def test_process_started_between_snapshots_is_counted(make_sampler):
    """A process that appeared since the previous snapshot gets its CPU % right away."""
    sampler = make_sampler()
    sampler.prime()
    late = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        top = {p["pid"]: p for p in sampler.snapshot()["processes"]}
        assert late.pid in top and top[late.pid]["cpu"] > 10
    finally:
        late.kill()
        late.wait()


def test_vanished_processes_are_forgotten(make_sampler):
    sampler = make_sampler()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    sampler.snapshot()
    child.kill()
    child.wait()
    snap = sampler.snapshot()
    assert child.pid not in {p["pid"] for p in snap["processes"]}
    assert child.pid not in sampler._procs


def test_procfs_and_psutil_agree_on_a_process():
    """The fast /proc reader gives what psutil gives for CPU time and RSS of the same process."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        fast, portable = StatusSampler("n1"), StatusSampler("n1")
        portable.fast_procfs = False
        fast.prime()
        portable.prime()
        a, b = fast._procs[child.pid], portable._procs[child.pid]
        assert abs(a.cpu_total - b.cpu_total) < 0.05
        assert a.rss == pytest.approx(psutil.Process(child.pid).memory_info().rss, rel=0.2)
        assert b.rss is None
    finally:
        child.kill()
        child.wait()


def test_network_rates_between_two_snapshots():
    sampler = StatusSampler("n1")
    first = sampler.snapshot()["network"]
    time.sleep(0.2)
    second = sampler.snapshot()["network"]
    assert second["rx_bytes"] >= first["rx_bytes"] and second["tx_bytes"] >= first["tx_bytes"]
    for key in ("rx", "tx"):
        rate = second[f"{key}_rate"]
        assert isinstance(rate, NUMBER) and rate >= 0
        # the rate is the byte delta over ~0.2 s (generous bounds)
        delta = second[f"{key}_bytes"] - first[f"{key}_bytes"]
        assert rate <= delta / 0.19 + 1
        assert delta == 0 or rate > 0


def test_publisher_collects_only_while_subscribed():
    sampler = CountingSampler()
    interval = 0.05

    async def main() -> None:
        publisher = StatusPublisher(sampler, interval=interval)
        await asyncio.sleep(5 * interval)
        assert sampler.count == 0, "no subscriber, no collection"

        got_a: list[str] = []
        got_b: list[str] = []
        publisher.subscribe(got_a.append)
        publisher.subscribe(got_b.append)
        assert publisher.subscriber_count == 2
        await asyncio.sleep(20 * interval)
        collected = sampler.count
        # one shared collection per interval: about 20, certainly not 2 x 20
        assert 5 <= collected <= 24
        assert got_a == got_b, "every subscriber gets the same messages"
        assert len(got_a) == collected
        message = json.loads(got_a[-1])
        assert message["type"] == "status" and message["status"]["node"] == "n1"

        publisher.unsubscribe(got_a.append)
        assert publisher.subscriber_count == 1
        await asyncio.sleep(4 * interval)
        assert sampler.count > collected, "still collecting for the remaining subscriber"

        publisher.unsubscribe(got_b.append)
        assert publisher.subscriber_count == 0
        stopped_at = sampler.count
        await asyncio.sleep(5 * interval)
        assert sampler.count == stopped_at, "stopped after the last unsubscribe"

        publisher.subscribe(got_a.append)  # restarts
        await asyncio.sleep(5 * interval)
        assert sampler.count > stopped_at
        publisher.close()
        closed_at = sampler.count
        await asyncio.sleep(4 * interval)
        assert sampler.count == closed_at

    asyncio.run(main())


def test_raising_subscriber_is_dropped_without_affecting_others():
    sampler = CountingSampler()

    def broken(message: str) -> None:
        raise ConnectionError("socket closed")

    async def main() -> None:
        publisher = StatusPublisher(sampler, interval=0.05)
        good: list[str] = []
        publisher.subscribe(broken)
        publisher.subscribe(good.append)
        await asyncio.sleep(0.3)
        assert publisher.subscriber_count == 1
        assert len(good) >= 2
        publisher.unsubscribe(broken)  # already gone: harmless
        publisher.close()

    asyncio.run(main())


def test_a_failing_snapshot_does_not_stop_the_publisher():
    class FlakySampler(CountingSampler):
        def snapshot(self) -> dict[str, Any]:
            snap = super().snapshot()
            if self.count == 2:
                raise RuntimeError("boom")
            return snap

    sampler = FlakySampler()

    async def main() -> None:
        publisher = StatusPublisher(sampler, interval=0.05)
        got: list[str] = []
        publisher.subscribe(got.append)
        await asyncio.sleep(0.3)
        publisher.close()
        assert sampler.count >= 3 and len(got) == sampler.count - 1

    asyncio.run(main())


def test_current_primes_then_reuses_a_fresh_snapshot(busy_child):
    sampler = CountingSampler()

    async def main() -> None:
        publisher = StatusPublisher(sampler, interval=0.5)
        first = await publisher.current()
        assert sampler.count == 1
        # primed before sampling, so CPU percentages are meaningful at once
        assert first["cpu"]["percent"] > 0
        assert busy_child.pid in {p["pid"] for p in first["processes"]}
        again = await publisher.current()
        assert again is first and sampler.count == 1, "younger than interval: reused"
        await asyncio.sleep(0.55)
        fresh = await publisher.current()
        assert fresh is not first and sampler.count == 2
        both = await asyncio.gather(publisher.current(), publisher.current())
        assert both[0] is both[1] is fresh
        assert publisher.subscriber_count == 0

    asyncio.run(main())


def test_nothing_runs_before_a_subscriber_or_request():
    sampler = CountingSampler()
    StatusPublisher(sampler)  # constructing outside a running loop is allowed
    assert sampler.count == 0 and not sampler.primed
