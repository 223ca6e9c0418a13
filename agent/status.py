"""Node status snapshots (psutil) and their once-per-second publication to subscribers.

`StatusSampler.snapshot()` returns one JSON-serialisable dict; its keys are stable:

==============  ==================================================================================
key             value
==============  ==================================================================================
``time``        epoch seconds (float) when the snapshot was taken
``node``        the agent's node name
``hostname``    ``socket.gethostname()``
``addresses``   ``[{"interface", "address", "family": "ipv4"|"ipv6"}]``, non-loopback first
``uptime``      seconds since boot (float)
``kernel``      ``platform.release()``
``os``          distribution name (os-release ``PRETTY_NAME``), else ``platform.system()``
``cpu``         ``{"percent": total %, "per_core": [% per logical core], "count": n}``
``load``        ``[1, 5, 15]`` minute load averages
``memory``      ``{"total", "available", "used", "buffers", "cached"}`` bytes and ``"percent"``
``swap``        ``{"total", "used"}`` bytes and ``"percent"``
``temperature`` highest current reading of ``psutil.sensors_temperatures()`` in °C, or null
``network``     ``{"rx_bytes", "tx_bytes"}`` totals over non-loopback interfaces (int) and
                ``{"rx_rate", "tx_rate"}`` bytes/s since the previous snapshot (0 on the first)
``processes``   top N by CPU: ``[{"pid", "user", "name", "cpu", "rss"}]``; ``cpu`` is % of one
                core since the process's previous reading (the previous snapshot, or up to
                ``process_refresh`` s earlier for a process that was idle; may exceed 100 for
                multi-threaded processes), ``rss`` bytes
==============  ==================================================================================

CPU percentages are computed from the sampler's own previous counters (not psutil's module-wide
state), so the first snapshot reports 0 and ranks processes by their accumulated CPU time.
Hostname, addresses, kernel and os are re-read every `StatusSampler.static_ttl` seconds, the
temperature every `StatusSampler.temperature_ttl` seconds, a top process's user and name every
`StatusSampler.details_ttl` seconds; everything else at every snapshot, except the CPU time of
idle processes (below).

Cost: reading every process's CPU time is most of a snapshot (about 5 µs per process). The
sampler therefore reads it incrementally: at every snapshot it lists the pids (one directory
read), reads the processes it has not seen before, the last top N and a share of the others in
turns, so that every process is read at least once per `process_refresh` seconds (the agent's
``status_process_refresh`` setting). A process's ``cpu`` is its % of one core since its
previous reading: for the listed and for new processes that is the previous snapshot, for a
process that was idle up to `process_refresh` seconds earlier, so an idle process that turns
busy enters the list within `process_refresh` seconds; a new process within one snapshot.
Every row of the list is read in the snapshot that reports it (a process whose previous reading
would rank it in is read again first, and ranks by the new one), so its ``cpu`` and ``rss`` are
never older than the snapshot. The snapshot after the first one (or after `prime`) reads every
process. On Linux the
sampler reads CPU time (and RSS) straight from ``/proc/<pid>/stat``, one read per process and no
psutil.Process objects, which halves the cost; elsewhere (or with ``fast_procfs = False``) it uses
``psutil.Process.cpu_times()``. Only the top N get psutil.Process objects. See bench/README.md.

`StatusPublisher` takes one snapshot per interval, only while at least one subscriber is
present, and sends the same encoded ``{"type": "status", "status": ...}`` message to all of them.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import math
import os
import platform
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from marco.protocol import encode

try:
    import pwd
except ImportError:  # pragma: no cover - non-POSIX
    pwd = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


class _ProcState:
    """What the sampler remembers about one pid between snapshots."""

    __slots__ = ("pid", "ident", "read_at", "cpu_total", "cpu_percent", "rss", "user", "name",
                 "details_at", "_proc")

    def __init__(self, pid: int, ident: object = None, read_at: float | None = None) -> None:
        self.pid = pid
        self.ident = ident  # start time, to tell a reused pid from the process seen before
        self.read_at = read_at  # clock time of the reading cpu_total is from (None: not yet)
        self.cpu_total = 0.0  # user + system seconds
        self.cpu_percent = 0.0
        self.rss: int | None = None  # bytes, when the scan read it anyway (procfs)
        self.user = ""
        self.name = ""
        self.details_at = float("-inf")  # clock time user and name were read
        self._proc: psutil.Process | None = None

    @property
    def proc(self) -> psutil.Process:
        """The psutil.Process, created on first use (top processes and the fallback need it)."""
        if self._proc is None:
            self._proc = psutil.Process(self.pid)
        return self._proc


class StatusSampler:
    """Takes psutil snapshots; keeps previous counters to compute rates and per-process CPU %."""

    #: Seconds the hostname, addresses, kernel and os stay cached.
    static_ttl = 30.0
    #: Seconds a temperature reading stays cached (reading every hwmon sensor is costly).
    temperature_ttl = 5.0
    #: Seconds a top process's user and name stay cached (its CPU % and RSS are always fresh).
    details_ttl = 5.0
    #: Monotonic clock (seconds) for rates and cache ages; replaceable per instance, e.g. by a
    #: benchmark that simulates one snapshot per second without sleeping.
    clock: Callable[[], float] = staticmethod(time.monotonic)
    #: On Linux, read each process's CPU ticks from /proc/<pid>/stat directly: half the cost of
    #: psutil.Process.cpu_times(), which is most of a snapshot. False (or no /proc) = psutil.
    fast_procfs = True
    #: Usernames remembered (uid -> name); all are forgotten at once beyond this.
    usernames_max = 1024

    def __init__(self, node_name: str, top_n: int = 10, process_refresh: float = 5.0) -> None:
        self.node_name = node_name
        self.top_n = top_n
        #: Seconds within which every process's CPU time is read again (0: at every snapshot).
        self.process_refresh = process_refresh
        self._static: dict[str, Any] = {}
        self._static_at = float("-inf")
        self._loopback_ifaces: frozenset[str] = frozenset({"lo"})
        self._boot_time = 0.0
        self._temperature: float | None = None
        self._temperature_at = float("-inf")
        self._usernames: dict[int, str] = {}
        self._procs: dict[int, _ProcState] = {}
        self._turns: deque[int] = deque()  # pids in the order their turn to be read comes
        self._hot: list[int] = []  # pids of the last top N: read at every scan
        self._read_all = True  # the next scan reads every process (first scan, after prime)
        self._procfs = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")
        self._clock_ticks = os.sysconf("SC_CLK_TCK") if self._procfs else 100
        self._page_size = os.sysconf("SC_PAGE_SIZE") if self._procfs else 4096
        self._cpu_prev: list[tuple[float, float]] | None = None  # (busy, total) per core
        self._net_prev: tuple[float, int, int] | None = None  # (monotonic, rx, tx)
        self._procs_at: float | None = None  # monotonic time of the last process scan

    @property
    def primed(self) -> bool:
        """True once CPU and process counters have been read at least once."""
        return self._procs_at is not None

    def prime(self) -> None:
        """Read the CPU and process counters so the next snapshot has meaningful percentages."""
        self._cpu()
        self._scan_processes()
        self._read_all = True  # the next snapshot ranks every process over the same window

    def snapshot(self) -> dict[str, Any]:
        """Take one status snapshot (synchronous, a few milliseconds)."""
        now = time.time()
        mono = self.clock()
        static = self._static_info(mono)
        cpu_percent, per_core = self._cpu()
        vm = psutil.virtual_memory()
        sw = self._swap()
        return {
            "time": now,
            "node": self.node_name,
            "hostname": static["hostname"],
            "addresses": static["addresses"],
            "uptime": round(now - self._boot_time, 1),
            "kernel": static["kernel"],
            "os": static["os"],
            "cpu": {"percent": cpu_percent, "per_core": per_core, "count": len(per_core)},
            "load": [round(x, 2) for x in psutil.getloadavg()],
            "memory": {"total": vm.total, "available": vm.available, "used": vm.used,
                       "buffers": getattr(vm, "buffers", 0), "cached": getattr(vm, "cached", 0),
                       "percent": vm.percent},
            "swap": sw,
            "temperature": self._temperature_reading(mono),
            "network": self._network(mono),
            "processes": self._top_processes(self._scan_processes()),
        }

    # -- cached, slowly changing facts -------------------------------------------------------

    def _static_info(self, mono: float) -> dict[str, Any]:
        if mono - self._static_at >= self.static_ttl:
            addresses, loopback = _addresses()
            self._loopback_ifaces = frozenset(loopback | {"lo"})
            self._boot_time = psutil.boot_time()
            self._static = {"hostname": socket.gethostname(), "addresses": addresses,
                            "kernel": platform.release(), "os": _os_name()}
            self._static_at = mono
        return self._static

    def _temperature_reading(self, mono: float) -> float | None:
        if mono - self._temperature_at >= self.temperature_ttl:
            self._temperature = _highest_temperature()
            self._temperature_at = mono
            if self._temperature is None:  # no sensor: ask again only as often as static facts
                self._temperature_at += max(0.0, self.static_ttl - self.temperature_ttl)
        return self._temperature

    # -- counters ----------------------------------------------------------------------------

    def _cpu(self) -> tuple[float, list[float]]:
        """(total %, per-core %) busy since the previous call (all 0 on the first)."""
        current = [_busy_total(t) for t in psutil.cpu_times(percpu=True)]
        prev, self._cpu_prev = self._cpu_prev, current
        if prev is None or len(prev) != len(current):
            return 0.0, [0.0] * len(current)
        per_core = [_percent(b - b0, t - t0)
                    for (b, t), (b0, t0) in zip(current, prev, strict=True)]
        busy = sum(b for b, _ in current) - sum(b for b, _ in prev)
        total = sum(t for _, t in current) - sum(t for _, t in prev)
        return _percent(busy, total), per_core

    def _swap(self) -> dict[str, Any]:
        """Swap total and used bytes and % as psutil.swap_memory() gives them; on Linux from
        /proc/meminfo alone (psutil also reads the long /proc/vmstat for counters not sent)."""
        if self._procfs:
            try:
                total, free = _meminfo_swap()
            except (OSError, ValueError, KeyError):
                pass
            else:
                used = total - free
                return {"total": total, "used": used,
                        "percent": round(used / total * 100, 1) if total else 0.0}
        sw = psutil.swap_memory()
        return {"total": sw.total, "used": sw.used, "percent": sw.percent}

    def _network(self, mono: float) -> dict[str, Any]:
        rx, tx = self._net_bytes()
        prev, self._net_prev = self._net_prev, (mono, rx, tx)
        rx_rate = tx_rate = 0.0
        if prev is not None and mono > prev[0]:
            dt = mono - prev[0]
            rx_rate = round(max(0, rx - prev[1]) / dt, 1)
            tx_rate = round(max(0, tx - prev[2]) / dt, 1)
        return {"rx_bytes": rx, "tx_bytes": tx, "rx_rate": rx_rate, "tx_rate": tx_rate}

    def _net_bytes(self) -> tuple[int, int]:
        """Bytes received and sent over non-loopback interfaces, as psutil.net_io_counters()
        counts them; on Linux parsed from /proc/net/dev directly (a third of psutil's cost)."""
        skip = self._loopback_ifaces
        if self._procfs:
            try:
                return _proc_net_dev(skip)
            except (OSError, ValueError, IndexError):
                pass
        rx = tx = 0
        for name, c in psutil.net_io_counters(pernic=True).items():
            if name not in skip:
                rx += c.bytes_recv
                tx += c.bytes_sent
        return rx, tx

    def _scan_processes(self) -> float:
        """List the pids; read new processes, the hot ones and the others' turns (see module).

        Returns the clock time the readings of this scan are marked with."""
        mono = self.clock()
        previous, self._procs_at = self._procs_at, mono
        procs = self._procs
        alive = set(self._pids())
        for pid in procs.keys() - alive:
            del procs[pid]
        born = list(alive.difference(procs))
        read_all, self._read_all = self._read_all, previous is None
        # A process that appeared since the last scan used all its CPU time since then.
        for pid in born:
            procs[pid] = _ProcState(pid, read_at=previous)
        if read_all or previous is None or self.process_refresh <= 0:
            self._turns = deque(procs)  # a full reading starts the turns afresh
            self._read(list(procs), mono)
            return mono
        self._turns.extend(born)
        self._read(born, mono)
        self._read(self._hot, mono)
        self._read(self._next_turns(len(procs) * (mono - previous) / self.process_refresh), mono)
        return mono

    def _pids(self) -> list[int]:
        """Every pid (psutil.pids() without its sorting, on Linux)."""
        if not self._procfs:
            return psutil.pids()
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]

    def _next_turns(self, share: float) -> list[int]:
        """The next ceil(`share`) live pids whose turn has come (rotated to the back)."""
        procs, turns = self._procs, self._turns
        if len(turns) > 2 * len(procs) + 64:  # pids that died (or came back) pile up: rebuild
            turns.clear()
            turns.extend(procs)
        due: list[int] = []
        wanted = math.ceil(share)
        for _ in range(len(turns)):
            if len(due) >= wanted:
                break
            pid = turns.popleft()
            state = procs.get(pid)
            if state is None:
                continue  # gone: its turn goes with it
            turns.append(pid)
            due.append(pid)  # one already read in this scan just uses up its turn
        return due

    def _read(self, pids: list[int], mono: float) -> None:
        """Read the CPU time of each of `pids` not yet read at `mono`; forget those gone."""
        read = self._read_procfs if self.fast_procfs and self._procfs else self._read_psutil
        procs = self._procs
        for pid in pids:
            state = procs.get(pid)
            if state is None or state.read_at == mono:
                continue
            try:
                total, ident, rss = read(state)
            except (OSError, IndexError, ValueError, *_GONE):
                del procs[pid]  # vanished or unreadable (exited in the middle of the scan)
                continue
            if state.ident is None:
                state.ident = ident
            elif ident != state.ident or total < state.cpu_total:
                # The pid was reused by a new process, which started after the last reading.
                state = procs[pid] = _ProcState(pid, ident, state.read_at)
            dt = mono - state.read_at if state.read_at is not None else 0.0
            state.cpu_percent = round((total - state.cpu_total) / dt * 100.0, 1) if dt > 0 else 0.0
            state.cpu_total = total
            state.rss = rss
            state.read_at = mono

    def _read_procfs(self, state: _ProcState) -> tuple[float, object, int | None]:
        """(user + system seconds, start ticks, rss bytes) from /proc/<pid>/stat."""
        fd = os.open(f"/proc/{state.pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # Fields after the parenthesised name (which may hold spaces and parentheses): state is
        # [0], utime [11], stime [12], starttime [19], rss pages [21] (man 5 proc numbers - 3).
        fields = data[data.rfind(b")") + 2:].split(maxsplit=22)
        return ((int(fields[11]) + int(fields[12])) / self._clock_ticks, fields[19],
                int(fields[21]) * self._page_size)

    @staticmethod
    def _read_psutil(state: _ProcState) -> tuple[float, object, int | None]:
        """(user + system seconds, create time, None) through psutil (any platform)."""
        proc = state.proc
        ct = proc.cpu_times()
        return ct.user + ct.system, proc.create_time(), None  # create_time() is cached

    def _top_processes(self, mono: float) -> list[dict[str, Any]]:
        """Details (user, name, rss) of the top N by CPU %, ties broken by accumulated CPU
        (`mono`: the scan's clock time)."""
        ranked = self._rank(mono)
        self._hot = [state.pid for state in ranked]
        top: list[dict[str, Any]] = []
        for state in ranked:
            if len(top) >= self.top_n:
                break
            try:
                proc = state.proc
                if mono - state.details_at >= self.details_ttl:
                    state.user, state.name = self._username(proc), proc.name()
                    state.details_at = mono
                rss = state.rss if state.rss is not None else proc.memory_info().rss
            except _GONE:
                continue
            top.append({"pid": proc.pid, "user": state.user, "name": state.name,
                        "cpu": state.cpu_percent, "rss": rss})
        return top

    def _rank(self, mono: float) -> list[_ProcState]:
        """The top `top_n` by `_rank_key`, every one read at `mono` (this scan), best first.

        A process not read in this scan holds its previous reading: each one that would rank
        above the `top_n`-th of those read is read now and ranks by its new reading."""
        fresh: list[_ProcState] = []
        stale: list[_ProcState] = []
        for state in self._procs.values():
            (fresh if state.read_at == mono else stale).append(state)
        best = heapq.nlargest(self.top_n, fresh, key=_rank_key)
        floor = _rank_key(best[-1]) if best and len(best) >= self.top_n else _LOWEST
        # Strictly above: a tie with the last of the top may stay out (it would rank equal).
        self._read([s.pid for s in stale if _rank_key(s) > floor], mono)
        return heapq.nlargest(self.top_n, (s for s in self._procs.values() if s.read_at == mono),
                              key=_rank_key)

    def _username(self, proc: psutil.Process) -> str:
        if pwd is None:  # pragma: no cover - non-POSIX
            return proc.username()
        uid = proc.uids().real
        name = self._usernames.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            if len(self._usernames) >= self.usernames_max:
                self._usernames.clear()
            self._usernames[uid] = name
        return name


_LOWEST = (float("-inf"), float("-inf"))


def _rank_key(state: _ProcState) -> tuple[float, float]:
    """Busiest first: CPU % at the last reading, then accumulated CPU time."""
    return state.cpu_percent, state.cpu_total


def _proc_net_dev(skip: frozenset[str]) -> tuple[int, int]:
    """(received, sent) bytes summed over /proc/net/dev's interfaces not in `skip`."""
    rx = tx = 0
    with open("/proc/net/dev", "rb") as f:
        lines = f.read().splitlines()[2:]  # two header lines
    for line in lines:
        colon = line.rfind(b":")
        if line[:colon].strip().decode(errors="replace") in skip:
            continue
        fields = line[colon + 1:].split()
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


def _meminfo_swap() -> tuple[int, int]:
    """(SwapTotal, SwapFree) bytes from /proc/meminfo (KeyError if the kernel lists neither)."""
    found: dict[bytes, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"Swap"):
                name, value = line.split()[:2]
                found[name] = int(value) * 1024
    return found[b"SwapTotal:"], found[b"SwapFree:"]


def _busy_total(t: Any) -> tuple[float, float]:
    """(busy, total) seconds of one cpu_times() tuple, counted the way psutil.cpu_percent does."""
    total = sum(t)
    # On Linux user/nice already include guest/guest_nice.
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


def _percent(busy: float, total: float) -> float:
    return round(min(100.0, max(0.0, busy / total * 100.0)), 1) if total > 0 else 0.0


def _addresses() -> tuple[list[dict[str, str]], set[str]]:
    """IPv4/IPv6 addresses, non-loopback first, and the names of loopback interfaces."""
    families = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
    rows: list[tuple[bool, str, str, str]] = []
    loopback: set[str] = set()
    for iface, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            family = families.get(a.family)
            if family is None:
                continue
            address = a.address.split("%", 1)[0]
            try:
                is_loop = ipaddress.ip_address(address).is_loopback
            except ValueError:
                continue
            if is_loop:
                loopback.add(iface)
            rows.append((is_loop, family, iface, address))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # stable: keeps each interface's own order
    return ([{"interface": iface, "address": addr, "family": fam}
             for _, fam, iface, addr in rows], loopback)


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME") or platform.system()
    except (OSError, AttributeError):
        return platform.system()


def _highest_temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [e.current for entries in sensors.values() for e in entries
                if e.current is not None]
    return round(max(readings), 1) if readings else None


class StatusPublisher:
    """One collection per `interval` shared by all subscribers; runs only while >= 1 subscriber.

    `subscribe` must be called from the event loop's thread while the loop runs (any Tornado
    handler does): the periodic task starts on the first subscriber and stops with the last.
    """

    #: Seconds `current()` waits between priming the CPU counters and sampling.
    prime_delay = 0.25

    def __init__(self, sampler: StatusSampler, interval: float = 1.0) -> None:
        self.sampler = sampler
        self.interval = interval
        self._subscribers: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, Any] | None = None
        self._last_at = float("-inf")  # monotonic
        self._lock = asyncio.Lock()

    @property
    def subscriber_count(self) -> int:
        """How many `send` callables currently receive status messages."""
        return len(self._subscribers)

    def subscribe(self, send: Callable[[str], None]) -> None:
        """Send every future status message to `send`; starts the periodic task if needed."""
        loop = asyncio.get_running_loop()  # RuntimeError outside the event loop
        if send not in self._subscribers:
            self._subscribers.append(send)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def unsubscribe(self, send: Callable[[str], None]) -> None:
        """Stop sending to `send`; stops the periodic task when nobody is left."""
        try:
            self._subscribers.remove(send)
        except ValueError:
            pass
        if not self._subscribers:
            self._stop()

    async def current(self) -> dict[str, Any]:
        """The last snapshot if younger than `interval`, else a fresh one (primed if needed)."""
        async with self._lock:
            if time.monotonic() - self._last_at < self.interval and self._last is not None:
                return self._last
            if not self.sampler.primed:
                self.sampler.prime()
                await asyncio.sleep(min(self.prime_delay, self.interval))
            return self._take()

    def close(self) -> None:
        """Stop the periodic task and forget every subscriber."""
        self._subscribers.clear()
        self._stop()

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _take(self) -> dict[str, Any]:
        snap = self.sampler.snapshot()
        self._last, self._last_at = snap, time.monotonic()
        return snap

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.sampler.primed:
            self.sampler.prime()
            await asyncio.sleep(min(self.prime_delay, self.interval))
        next_at = loop.time()
        while self._subscribers:
            # A snapshot `current()` took moments ago is reused rather than resampled over a
            # tiny window (which would give noisy percentages).
            if time.monotonic() - self._last_at < self.interval / 2 and self._last is not None:
                self._broadcast(self._last)
            else:
                try:
                    snap = self._take()
                except Exception:  # keep publishing: the next tick may well succeed
                    log.exception("status snapshot failed")
                else:
                    self._broadcast(snap)
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # fell behind (slow loop): skip the missed ticks
                next_at = now
            await asyncio.sleep(next_at - now)
        if self._task is asyncio.current_task():
            self._task = None

    def _broadcast(self, snap: dict[str, Any]) -> None:
        """Encode once; send to every subscriber, dropping those whose `send` raises."""
        message = encode({"type": "status", "status": snap})
        for send in list(self._subscribers):
            try:
                send(message)
            except Exception:
                log.exception("status subscriber %r failed; dropping it", send)
                if send in self._subscribers:
                    self._subscribers.remove(send)
