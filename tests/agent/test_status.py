"""Tests of agent.status against the real machine (real psutil, real child processes)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from agent.status import StatusPublisher, StatusSampler
from tests.support.waiting import wait_for

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


def _send_outside(address: str, datagrams: int, size: int) -> None:
    """Multicast UDP datagrams out of the interface that has `address` (TTL 1: the link only;
    an administratively scoped group nobody listens on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        for _ in range(datagrams):
            sock.sendto(b"x" * size, ("239.255.77.77", 9))


def _outside_tx_bytes(sampler: StatusSampler) -> int:
    """Bytes sent on the interfaces the sampler counts (not loopback), read independently."""
    counters = psutil.net_io_counters(pernic=True)
    return sum(c.bytes_sent for name, c in counters.items()
               if name not in sampler._loopback_ifaces)


def test_network_rates_between_two_snapshots():
    """The rates are the byte deltas over the time between two snapshots on the sampler's own
    clock (set here: 2.5 s apart, whatever the wall clock does)."""
    sampler = StatusSampler("n1")
    now = [1000.0]
    sampler.clock = lambda: now[0]
    first = sampler.snapshot()
    outside = [a["address"] for a in first["addresses"]
               if a["family"] == "ipv4" and not a["address"].startswith("127.")]
    if not outside:
        pytest.skip("no non-loopback IPv4 address to send traffic from")
    _send_outside(outside[0], datagrams=10, size=1000)
    wait_for(lambda: _outside_tx_bytes(sampler) >= first["network"]["tx_bytes"] + 10_000,
             what="the datagrams counted as sent")
    now[0] += 2.5
    second = sampler.snapshot()
    sent = second["network"]["tx_bytes"] - first["network"]["tx_bytes"]
    assert sent >= 10_000
    for key in ("rx", "tx"):
        delta = second["network"][f"{key}_bytes"] - first["network"][f"{key}_bytes"]
        assert second["network"][f"{key}_rate"] == round(delta / 2.5, 1)


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Let the event loop run until `predicate()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


class Witness:
    """A second publisher on the same loop at the same interval, subscribed throughout: its
    ticks show the loop ran long enough for the publisher under test to collect, had it been
    running, and count how many collections one periodic task makes meanwhile."""

    def __init__(self, interval: float) -> None:
        self.sampler = CountingSampler("witness")
        self.publisher = StatusPublisher(self.sampler, interval=interval)
        self.publisher.subscribe(self._ignore)

    @staticmethod
    def _ignore(message: str) -> None:
        """The witness's subscriber: only its sampler's count matters."""

    @property
    def ticks(self) -> int:
        return self.sampler.count

    async def wait_ticks(self, count: int) -> None:
        start = self.ticks
        await until(lambda: self.ticks >= start + count, f"{count} ticks of the witness")


def test_publisher_collects_only_while_subscribed():
    sampler = CountingSampler()
    interval = 0.05

    async def main() -> None:
        witness = Witness(interval)
        publisher = StatusPublisher(sampler, interval=interval)
        await witness.wait_ticks(5)
        assert sampler.count == 0, "no subscriber, no collection"

        got_a: list[str] = []
        got_b: list[str] = []
        publisher.subscribe(got_a.append)
        publisher.subscribe(got_b.append)
        assert publisher.subscriber_count == 2
        await until(lambda: sampler.count >= 1, "the first collection")
        counted, ticked = sampler.count, witness.ticks
        await witness.wait_ticks(20)
        # One shared periodic task: as many collections as the witness's one task made
        # (give or take the tick at each end), not one task per subscriber.
        assert sampler.count - counted <= witness.ticks - ticked + 2
        collected = sampler.count
        assert got_a == got_b, "every subscriber gets the same messages"
        assert len(got_a) == collected, "one message per collection"
        message = json.loads(got_a[-1])
        assert message["type"] == "status" and message["status"]["node"] == "n1"

        publisher.unsubscribe(got_a.append)
        assert publisher.subscriber_count == 1
        await until(lambda: sampler.count >= collected + 2, "collections for the one left")
        assert len(got_a) == collected and len(got_b) == sampler.count

        publisher.unsubscribe(got_b.append)
        assert publisher.subscriber_count == 0
        stopped_at = sampler.count
        await witness.wait_ticks(5)
        assert sampler.count == stopped_at, "stopped after the last unsubscribe"

        publisher.subscribe(got_a.append)  # restarts
        await until(lambda: sampler.count > stopped_at, "collection for a new subscriber")
        publisher.close()
        closed_at = sampler.count
        await witness.wait_ticks(5)
        assert sampler.count == closed_at
        witness.publisher.close()

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
        await until(lambda: len(good) >= 2, "two messages to the good subscriber")
        assert publisher.subscriber_count == 1
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
        await until(lambda: sampler.count >= 3, "a snapshot after the failing one")
        publisher.close()
        assert len(got) == sampler.count - 1

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


# -- incremental process reading (issue 15, item 5) -------------------------------------------

SPIN = "while True: pass"
#: Stops itself at once (so it is idle from birth, its CPU time tiny), spins once continued.
IDLE_THEN_SPIN = "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\nwhile True: pass"


class SimulatedSampler(StatusSampler):
    """A real sampler whose clock advances one second per snapshot (as at 1 Hz, without
    sleeping) and that counts its /proc/<pid>/stat reads and can run a hook right after it
    listed the pids (where a real process can be made to exit in the middle of a scan)."""

    def __init__(self, top_n: int = 10, process_refresh: float = 5.0) -> None:
        super().__init__("n1", top_n=top_n, process_refresh=process_refresh)
        self.now = 1000.0
        self.clock = lambda: self.now
        self.reads = 0
        self.after_listing: Callable[[], None] | None = None

    def tick(self) -> dict[str, Any]:
        """One snapshot one simulated second after the previous one."""
        self.now += 1.0
        return self.snapshot()

    def _pids(self) -> list[int]:
        pids = super()._pids()
        if self.after_listing is not None:
            self.after_listing()
        return pids

    def _read_procfs(self, state: Any) -> tuple[float, object, int | None]:
        self.reads += 1
        return super()._read_procfs(state)


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _spend(pid: int, seconds: float) -> None:
    """Wait until process `pid` has used `seconds` more CPU time (read independently)."""
    start = _cpu_seconds(pid)
    wait_for(lambda: _cpu_seconds(pid) >= start + seconds, what=f"{pid} to use {seconds} s CPU")


def _stop(child: subprocess.Popen[bytes]) -> None:
    """SIGSTOP `child` and wait until the kernel shows it stopped (it uses no CPU after)."""
    child.send_signal(signal.SIGSTOP)
    wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_STOPPED,
             what=f"{child.pid} stopped")


@pytest.fixture
def children():
    """Start child processes (argv lists); all are killed and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), **kwargs)
        started.append(child)
        return child
    yield start
    for child in started:
        child.kill()
        child.wait()


def _rows(snap: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for p in snap["processes"]}


def test_every_process_is_read_within_process_refresh():
    """The turns: after the first full readings, each live process is read again at least once
    per `process_refresh` seconds of the sampler's clock."""
    sampler = SimulatedSampler(process_refresh=5.0)
    sampler.tick()
    sampler.tick()
    for _ in range(12):
        sampler.tick()
        late = {pid: sampler.now - s.read_at for pid, s in sampler._procs.items()
                if s.read_at is not None and sampler.now - s.read_at > 5.0}
        assert not late, f"not read within process_refresh: {late}"


def test_a_snapshot_reads_a_share_of_the_processes_not_all():
    """What bounds the cost: past the first two snapshots one reads the new processes, the top
    N and about len/process_refresh of the others, not every process; with process_refresh 0
    it reads them all, as before."""
    sampler = SimulatedSampler(top_n=5, process_refresh=10.0)
    for _ in range(3):  # the third reads again what the second's full reading ranked high
        sampler.tick()
    for _ in range(5):
        sampler.reads = 0
        sampler.tick()
        count = len(sampler._procs)
        # new ones (a few at most here), the 5 listed, count/10 turns, a few ranking in
        assert sampler.reads <= 5 + math.ceil(count / 10) + 10 < count
    sampler.process_refresh = 0.0
    sampler.reads = 0
    sampler.tick()
    assert sampler.reads >= len(sampler._procs)


def test_a_new_busy_process_is_listed_at_the_next_snapshot(children):
    """New processes are read at once: one started after the previous snapshot is in the list
    of the next one, with its CPU time counted since the previous snapshot."""
    sampler = SimulatedSampler(process_refresh=1000.0)  # turns do not reach it in time
    for _ in range(3):
        sampler.tick()
    busy = children(sys.executable, "-c", SPIN)
    _spend(busy.pid, 0.5)
    row = _rows(sampler.tick()).get(busy.pid)
    assert row is not None and row["cpu"] >= 50.0  # >= 0.5 s over one (simulated) second
    assert row["name"].startswith("python") and row["rss"] > 0


def test_an_idle_process_that_turns_busy_is_listed_within_process_refresh(children):
    """A process idle for a while (here: stopped) is read only in its turn; once busy it is in
    the list within process_refresh seconds of the sampler's clock."""
    sampler = SimulatedSampler(process_refresh=5.0)
    sleeper = children(sys.executable, "-c", IDLE_THEN_SPIN)
    wait_for(lambda: psutil.Process(sleeper.pid).status() == psutil.STATUS_STOPPED,
             what="the child stopped")
    for _ in range(8):  # steady state: the sleeper is neither new nor among the top
        assert sleeper.pid not in _rows(sampler.tick())
    sleeper.send_signal(signal.SIGCONT)
    for _ in range(6):  # process_refresh (5 s) and the second it turned busy in
        _spend(sleeper.pid, 0.2)
        if sleeper.pid in _rows(sampler.tick()):
            return
    raise AssertionError("the busy process was not listed within process_refresh")


@pytest.mark.parametrize("fast_procfs", [True, False], ids=["procfs", "psutil"])
def test_a_busy_process_ranks_above_processes_that_were_busy(children, fast_procfs):
    """Ranking is by CPU % now, not accumulated CPU time nor an old reading: processes that
    spun (and hold more CPU time) and then stopped rank below one that spins now; the list
    is sorted and only genuinely busier processes can precede the busy one."""
    sampler = SimulatedSampler(top_n=10, process_refresh=1000.0)
    sampler.fast_procfs = fast_procfs
    former = [children(sys.executable, "-c", SPIN) for _ in range(2)]
    sampler.tick()
    for child in former:
        _spend(child.pid, 1.0)
        _stop(child)  # before the reading, which therefore ranks them high
    sampler.tick()
    busy = children(sys.executable, "-c", SPIN)
    for _ in range(2):
        _spend(busy.pid, 0.3)
        snap = sampler.tick()
    rows = snap["processes"]
    pids = [p["pid"] for p in rows]
    assert busy.pid in pids
    cpus = [p["cpu"] for p in rows]
    assert cpus == sorted(cpus, reverse=True)
    mine = [pid for pid in pids if pid in {busy.pid, *(c.pid for c in former)}]
    assert mine[0] == busy.pid
    for p in rows:
        if p["pid"] in {c.pid for c in former}:
            assert p["cpu"] == 0.0, "a stopped process is listed with its fresh 0 %"


def test_a_listed_row_is_never_an_old_reading(children):
    """A process that is not among the top (not read every second) but whose last reading
    would rank it in is read again before it is listed: two spinners are stopped; the one
    that was not the top is not listed with the CPU % it had a second ago, but with 0."""
    sampler = SimulatedSampler(top_n=1, process_refresh=1000.0)
    spinners = [children(sys.executable, "-c", SPIN) for _ in range(2)]
    sampler.tick()
    for child in spinners:
        _spend(child.pid, 0.3)
        _stop(child)  # before the reading: they ran in its window only
    sampler.tick()
    assert all(sampler._procs[child.pid].cpu_percent >= 20 for child in spinners)
    after = sampler.tick()
    for row in after["processes"]:
        if row["pid"] in {child.pid for child in spinners}:
            assert row["cpu"] == 0.0
        state = sampler._procs[row["pid"]]
        assert state.read_at == sampler.now, "every listed row was read in this snapshot"


@pytest.mark.parametrize("fast_procfs", [True, False], ids=["procfs", "psutil"])
def test_processes_that_exit_in_the_middle_of_a_scan(children, fast_procfs):
    """Processes listed by the scan that exit before they are read (new ones, top ones,
    zombies not yet reaped) are skipped and forgotten; the snapshot goes on."""
    sampler = SimulatedSampler(top_n=10, process_refresh=1000.0)
    sampler.fast_procfs = fast_procfs
    busy = [children(sys.executable, "-c", SPIN) for _ in range(2)]
    sampler.tick()
    for child in busy:
        _spend(child.pid, 0.2)
    top = _rows(sampler.tick())
    assert all(child.pid in top for child in busy), "the spinners are among the top (hot)"
    newborn = [children("sleep", "60") for _ in range(3)]
    zombie = children("sleep", "60")

    def exit_now() -> None:
        for child in [*busy, *newborn]:
            child.kill()
            child.wait()
        zombie.kill()  # not reaped: a zombie until the fixture waits for it
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE,
                 what="a zombie")

    sampler.after_listing = exit_now
    snap = sampler.tick()
    sampler.after_listing = None
    gone = {child.pid for child in [*busy, *newborn]}
    assert not gone & set(_rows(snap)), "exited processes are not listed"
    assert not gone & set(sampler._procs), "exited processes are forgotten"
    assert len(snap["processes"]) == 10
    sampler.tick()


@pytest.mark.parametrize("process_refresh", [1000.0, 0.0])
def test_what_the_sampler_keeps_is_bounded(children, process_refresh):
    """Per-process state only for live processes; the turns queue does not grow with
    processes that came and went (in turns, or with every process read every second)."""
    sampler = SimulatedSampler(process_refresh=process_refresh)
    sampler.tick()
    sampler.tick()
    for _ in range(12):
        # 30 processes are listed, then exit before they are read: their turns stay queued
        batch = [children("sleep", "60") for _ in range(30)]

        def exit_now(batch: list[subprocess.Popen[bytes]] = batch) -> None:
            for child in batch:
                child.kill()
                child.wait()

        sampler.after_listing = exit_now
        sampler.tick()
        assert not {child.pid for child in batch} & set(sampler._procs)
        assert len(sampler._turns) <= 2 * len(sampler._procs) + 64


def test_the_usernames_cache_is_capped(alice, children):
    """Rows of two users' processes with room for one username: both rows are right and the
    cache never holds more than its cap."""
    sampler = SimulatedSampler(top_n=1000, process_refresh=1000.0)
    sampler.usernames_max = 1
    theirs = children("sleep", "60", user=alice.name)
    for _ in range(3):
        rows = _rows(sampler.tick())
        assert len(sampler._usernames) <= 1
    assert rows[theirs.pid]["user"] == alice.name
    assert rows[os.getpid()]["user"] == "root"
