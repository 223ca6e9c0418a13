"""The controller alone against 10, 100 and 1,000 simulated agents (issue 15, item 2).

    sudo flock /tmp/marco-tests.lock .venv/bin/python bench/controller_scale.py \
        [--counts 10,100,1000] [--per-responder 1] [--health-interval 2] [--json FILE] \
        [--rmem BYTES] [--controller-arg=--health-connection-max-age=0 ...]

For each count N, in a fresh real controller (default settings but its health interval):

- discovery: N simulated agents (tests/support/sim_agents.py, one process) announce themselves
  at once; per agent, the time from the start of the announcements to its first presence in
  /api/inventory (p50, max), and the mDNS packets sent meanwhile on loopback (counted by a
  packet socket on `lo`, so nobody's packets are taken away; queries and answers);
- idle cost: the controller's CPU over `--idle-seconds` with health checks only, and its RSS
  against the same controller before the agents came; both per 100 nodes;
- `/api/inventory` latency p50/p99 over 200 requests on one kept-alive HTTPS connection;
- status: `--page-nodes` status subscriptions as a page makes them today (one /relay/NODE
  WebSocket per node, see `RelayPage`), the controller's CPU per status message relayed;
- goodbye: from SIGTERM of the simulator to all N gone from /api/nodes.

`--rmem BYTES` raises the host's UDP receive buffers (net.core.rmem_default and rmem_max)
for the bench and restores them after: on loopback every mDNS socket receives every packet,
and zeroconf's sockets keep the default size (208 KiB), so at 1,000 agents the host drops
datagrams that a LAN of separate hosts would deliver. `--controller-arg` passes settings to
the controller (e.g. `--health-connection-max-age=0 --discovery-retry-names=0
--discovery-rebrowse=0`: a health check per connection and no retries, the behaviour before
issue 15's fixes).

Needs root (a packet socket). Shares the machine with the tests: take their lock.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import tornado.httpclient
import tornado.websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.controller_process import ControllerProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402
from tests.support.sim_agents import SimulatorProcess  # noqa: E402

MDNS_PORT = 5353
PACKET_OUTGOING = 4  # linux/if_packet.h: a packet this host sent (lo shows each one twice)
ETH_P_ALL = 3
SO_ATTACH_FILTER = 26
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Classic BPF: IPv4 UDP with source or destination port 5353, unfragmented (see `MdnsCounter`).
MDNS_FILTER = [
    (0x28, 0, 0, 12), (0x15, 0, 9, 0x0800),   # ethertype IPv4, else drop
    (0x30, 0, 0, 23), (0x15, 0, 7, 17),       # protocol UDP, else drop
    (0x28, 0, 0, 20), (0x45, 5, 0, 0x1FFF),   # a fragment: drop
    (0xB1, 0, 0, 14),                         # x = IP header length
    (0x48, 0, 0, 14), (0x15, 3, 0, MDNS_PORT),  # source port 5353: keep
    (0x48, 0, 0, 16), (0x15, 1, 0, MDNS_PORT),  # destination port 5353: keep
    (0x06, 0, 0, 0), (0x06, 0, 0, 0x40000),   # drop / keep
]


@dataclass
class MdnsCount:
    queries: int = 0
    answers: int = 0
    bytes: int = 0


class MdnsCounter:
    """Counts the mDNS packets sent on loopback that mention `_marco` (queries and answers)
    with a packet socket: it sees every packet without receiving any in anyone's place."""

    def __init__(self, interface: str = "lo") -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._attach_filter()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.count = MdnsCount()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _attach_filter(self) -> None:
        """Keep only UDP 5353 in the kernel: loopback also carries every TLS health check."""
        program = b"".join(struct.pack("HBBI", *op) for op in MDNS_FILTER)
        self._program = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(MDNS_FILTER), ctypes.addressof(self._program))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def start(self) -> MdnsCounter:
        self._thread.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if address[2] != PACKET_OUTGOING or len(data) < 14 + 20 + 8 + 12:
                continue
            header = (data[14] & 0x0F) * 4
            payload = data[14 + header + 8:]
            if b"_marco" not in payload:
                continue
            with self._lock:
                if payload[2] & 0x80:
                    self.count.answers += 1
                else:
                    self.count.queries += 1
                self.count.bytes += len(payload)

    def snapshot(self) -> MdnsCount:
        with self._lock:
            return MdnsCount(**asdict(self.count))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def udp_receive_drops() -> int:
    """The host's UDP datagrams dropped for a full receive buffer so far (all sockets)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Api:
    """One kept-alive HTTPS connection to the controller's API, as a token holder."""

    def __init__(self, controller: ControllerProcess, token: str) -> None:
        self.controller, self.token = controller, token
        self.conn: http.client.HTTPConnection = controller.connection(timeout=60)

    def get(self, path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        return time.perf_counter() - started, body

    def inventory_hosts(self) -> set[str]:
        return set(json.loads(self.get("/api/inventory")[1])["_meta"]["hostvars"])

    @staticmethod
    def listed_now(controller: ControllerProcess, token: str, names: list[str]) -> set[str]:
        api = Api(controller, token)
        try:
            return api.inventory_hosts() & set(names)
        finally:
            api.close()

    def node_names(self) -> set[str]:
        return {node["name"] for node in json.loads(self.get("/api/nodes")[1])["nodes"]}

    def close(self) -> None:
        self.conn.close()


class StatusPage(Protocol):
    """How a page gets node status from the controller: `open` subscribes to `nodes` and
    returns when each has sent a first status; `received` counts status messages since."""

    received: int
    silent: int

    async def open(self, nodes: list[str]) -> None: ...

    async def close(self) -> None: ...


class RelayPage:
    """Today's page: one /relay/NODE WebSocket per node, `subscribe` status on each (the
    relay passes it to the agent's /v1/stream). A one-socket page is another StatusPage."""

    def __init__(self, controller: ControllerProcess, token: str) -> None:
        self.controller, self.token = controller, token
        self.received = 0
        self.silent = 0  # sockets that sent no status within a minute
        self._sockets: list[tornado.websocket.WebSocketClientConnection] = []
        self._readers: list[asyncio.Task[None]] = []

    async def open(self, nodes: list[str]) -> None:
        firsts = [asyncio.Event() for _ in nodes]
        for node, first in zip(nodes, firsts, strict=True):
            request = tornado.httpclient.HTTPRequest(
                f"{self.controller.ws_url}/relay/{node}",
                headers={"Authorization": f"Bearer {self.token}"},
                ssl_options=self.controller.ssl_context)
            ws = await tornado.websocket.websocket_connect(request)
            self._sockets.append(ws)
            await ws.write_message(json.dumps({"type": "subscribe", "status": True}))
            self._readers.append(asyncio.ensure_future(self._read(ws, first)))
        waiting = [asyncio.ensure_future(first.wait()) for first in firsts]
        _, late = await asyncio.wait(waiting, timeout=60)
        for task in late:
            task.cancel()
        self.silent = len(late)

    async def _read(self, ws: tornado.websocket.WebSocketClientConnection,
                    first: asyncio.Event) -> None:
        while (message := await ws.read_message()) is not None:
            if json.loads(message).get("type") == "status":
                self.received += 1
                first.set()

    async def close(self) -> None:
        for ws in self._sockets:
            ws.close()
        for reader in self._readers:
            reader.cancel()


@dataclass
class Result:
    """One count's figures (times in seconds unless named _ms)."""

    nodes: int
    per_responder: int
    announce_s: float = 0.0
    listed_p50_s: float = 0.0
    listed_max_s: float = 0.0
    listed: int = 0
    listed_after_idle: int = 0
    retried: int = 0  # services the controller had to resolve again (first tries logged)
    mdns: MdnsCount = field(default_factory=MdnsCount)
    udp_drops: int = 0
    rss_base_mib: float = 0.0
    rss_mib: float = 0.0
    idle_base_cpu_percent: float = 0.0
    idle_cpu_percent: float = 0.0
    sim_idle_cpu_percent: float = 0.0
    inventory_bytes: int = 0
    inventory_p50_ms: float = 0.0
    inventory_p99_ms: float = 0.0
    page_nodes: int = 0
    status_per_s: float = 0.0
    page_idle_cpu_percent: float = 0.0
    page_cpu_percent: float = 0.0
    cpu_ms_per_status: float = 0.0
    goodbye_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def per_100(self) -> float:
        """Hundreds of nodes the controller holds: those listed (all, unless noted)."""
        return (self.listed or self.nodes) / 100


def wait(predicate: Any, timeout: float) -> bool:
    """Poll until `predicate` is true (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Bench:
    """One controller and one simulator per count, in one work dir."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.secret_file = work / "secret"
        create_secret(self.secret_file)
        self.signer = TokenSigner(load_secret(self.secret_file))
        self.token = self.signer.issue("marco-bench")
        self.pki = TestPki(work / "pki")

    def per_responder(self, count: int) -> int:
        return self.args.per_responder or (1 if count <= 100 else 25)

    def run(self, count: int) -> Result:
        result = Result(nodes=count, per_responder=self.per_responder(count))
        home = self.work / f"n{count}"
        home.mkdir()
        controller = ControllerProcess(
            self.secret_file, home, "marco-bench-unused", pki=self.pki,
            extra_args=["--health-interval", str(self.args.health_interval),
                        "--log-level", self.args.controller_log_level,
                        *self.args.controller_arg])
        api = Api(controller, self.token)
        fleet = SimFleet()
        try:
            time.sleep(self.args.settle)  # let the fresh process settle before its baseline
            result.rss_base_mib = rss_mib(controller.process.pid)
            result.idle_base_cpu_percent = self.cpu_percent([controller.process.pid])[0]
            self.discover(api, fleet, home, result)
            self.idle(controller, fleet, result)
            self.inventory(api, result)
            asyncio.run(self.status(controller, fleet.listed, result))
            self.goodbye(api, fleet, result)
        finally:
            fleet.stop()
            api.close()
            controller.stop()
        return result

    def discover(self, api: Api, fleet: SimFleet, home: Path, result: Result) -> None:
        """Start the simulators together; poll the inventory until all are listed (or the
        deadline: then what was listed is measured, and the shortfall noted)."""
        counter, drops = MdnsCounter().start(), udp_receive_drops()
        processes = min(self.args.sim_processes, result.nodes)
        for index in range(processes):
            share = result.nodes // processes + (index < result.nodes % processes)
            fleet.processes.append(SimulatorProcess(
                self.pki, self.secret_file, home, f"scale{result.nodes}x{os.getpid()}p{index}",
                share, per_responder=result.per_responder, ready_timeout=60 + share * 0.2,
                extra_args=["--log-level", self.args.sim_log_level]))
        wanted = set(fleet.names)
        seen: dict[str, float] = {}
        deadline = time.monotonic() + self.args.discovery_timeout
        while len(seen) < len(wanted) and time.monotonic() < deadline:
            now = time.time()
            for name in api.inventory_hosts() & wanted:
                seen.setdefault(name, now)
            time.sleep(0.05)
        result.mdns = counter.snapshot()
        result.udp_drops = udp_receive_drops() - drops
        counter.stop()
        readies = [simulator.wait_ready() for simulator in fleet.processes]
        start = min(ready["announce_started"] for ready in readies)
        result.announce_s = max(ready["announced"] for ready in readies) - start
        times = [at - start for at in seen.values()] or [float("nan")]
        result.listed_p50_s, result.listed_max_s = statistics.median(times), max(times)
        result.listed = len(seen)
        fleet.listed = sorted(seen)
        if len(seen) < len(wanted):
            result.notes.append(f"only {len(seen)} of {len(wanted)} listed within "
                                f"{self.args.discovery_timeout:.0f} s")

    def idle(self, controller: ControllerProcess, fleet: SimFleet, result: Result) -> None:
        time.sleep(self.args.settle)
        profiler = self.profile(controller.process.pid, result.nodes)
        controller_cpu, *simulators = self.cpu_percent(
            [controller.process.pid, *(sim.process.pid for sim in fleet.processes)])
        if profiler is not None:
            profiler.wait()
        result.idle_cpu_percent, result.sim_idle_cpu_percent = controller_cpu, sum(simulators)
        result.listed_after_idle = len(Api.listed_now(controller, self.token, fleet.names))
        result.retried = controller.log().count("is announced but not listed")
        result.rss_mib = rss_mib(controller.process.pid)

    def profile(self, pid: int, count: int) -> subprocess.Popen[bytes] | None:
        """With --py-spy DIR: sample the controller over the idle window (py-spy pauses it to
        sample, so its CPU figure is a little high in that run)."""
        if self.args.py_spy is None:
            return None
        self.args.py_spy.mkdir(parents=True, exist_ok=True)
        out = self.args.py_spy / f"controller-{count}.txt"
        return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                                 "-p", str(pid), "-d", str(int(self.args.idle_seconds)),
                                 "-f", "raw", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cpu_percent(self, pids: list[int]) -> list[float]:
        """Each process's CPU over `--idle-seconds`, in % of one core."""
        before, started = [cpu_seconds(pid) for pid in pids], time.monotonic()
        time.sleep(self.args.idle_seconds)
        elapsed = time.monotonic() - started
        return [100 * (cpu_seconds(pid) - was) / elapsed
                for pid, was in zip(pids, before, strict=True)]

    def inventory(self, api: Api, result: Result) -> None:
        samples = []
        for _ in range(self.args.requests):
            elapsed, body = api.get("/api/inventory")
            samples.append(elapsed)
        result.inventory_bytes = len(body)
        result.inventory_p50_ms = 1000 * statistics.median(samples)
        result.inventory_p99_ms = 1000 * percentile(samples, 0.99)

    async def status(self, controller: ControllerProcess, names: list[str],
                     result: Result) -> None:
        nodes = names[:self.args.page_nodes]
        page: StatusPage = RelayPage(controller, self.token)
        result.page_nodes = len(nodes)
        pid = controller.process.pid
        # The controller's own cost meanwhile (health checks), measured just before.
        before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(self.args.status_seconds)
        idle = (cpu_seconds(pid) - before) / (time.monotonic() - started)
        await page.open(nodes)
        received, before, started = page.received, cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(self.args.status_seconds)
        used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
        count = page.received - received
        await page.close()
        if page.silent:
            result.notes.append(f"{page.silent} of {len(nodes)} page sockets sent no status")
        result.page_cpu_percent = 100 * used / elapsed
        result.page_idle_cpu_percent = 100 * idle
        relayed = used - idle * elapsed
        result.status_per_s = count / elapsed
        result.cpu_ms_per_status = 1000 * relayed / count if count else float("nan")

    def goodbye(self, api: Api, fleet: SimFleet, result: Result) -> None:
        started = time.monotonic()
        wanted = set(fleet.names)
        fleet.stop()
        if not wait(lambda: not wanted & api.node_names(), 60):
            result.notes.append("not all goodbyes removed their node within 60 s")
        result.goodbye_s = time.monotonic() - started


class SimFleet:
    """The simulator processes of one count (several share the work on several cores)."""

    def __init__(self) -> None:
        self.processes: list[SimulatorProcess] = []
        self.listed: list[str] = []

    @property
    def names(self) -> list[str]:
        return [name for simulator in self.processes for name in simulator.names]

    def stop(self) -> None:
        """SIGTERM to all first (their goodbyes go out side by side), then wait for each."""
        for simulator in self.processes:
            if simulator.process.poll() is None:
                simulator.process.send_signal(signal.SIGTERM)
        for simulator in self.processes:
            simulator.stop()


def table(results: list[Result]) -> str:
    rows = [("nodes (agents per responder)", lambda r: f"{r.nodes} ({r.per_responder})"),
            ("announce, all (s)", lambda r: f"{r.announce_s:.2f}"),
            ("listed p50 / max (s)", lambda r: f"{r.listed_p50_s:.2f} / {r.listed_max_s:.2f}"),
            ("listed at the deadline / after idle",
             lambda r: f"{r.listed} / {r.listed_after_idle}"),
            ("services resolved again (not listed at first)", lambda r: f"{r.retried}"),
            ("mDNS packets: queries / answers (KiB)",
             lambda r: f"{r.mdns.queries} / {r.mdns.answers} ({r.mdns.bytes / 1024:.0f})"),
            ("UDP datagrams dropped (full buffers, host)", lambda r: f"{r.udp_drops}"),
            ("controller RSS: base / with nodes (MiB)",
             lambda r: f"{r.rss_base_mib:.1f} / {r.rss_mib:.1f}"),
            ("RSS per 100 listed nodes (MiB)",
             lambda r: f"{(r.rss_mib - r.rss_base_mib) / r.per_100:.1f}"),
            ("idle CPU: 0 nodes / N nodes (% of a core)",
             lambda r: f"{r.idle_base_cpu_percent:.1f} / {r.idle_cpu_percent:.1f}"),
            ("idle CPU per 100 listed nodes (%)",
             lambda r: f"{(r.idle_cpu_percent - r.idle_base_cpu_percent) / r.per_100:.1f}"),
            ("simulator idle CPU (%)", lambda r: f"{r.sim_idle_cpu_percent:.1f}"),
            ("/api/inventory p50 / p99 (ms)",
             lambda r: f"{r.inventory_p50_ms:.1f} / {r.inventory_p99_ms:.1f}"),
            ("/api/inventory size (KiB)", lambda r: f"{r.inventory_bytes / 1024:.0f}"),
            ("page: relay sockets, status/s",
             lambda r: f"{r.page_nodes}, {r.status_per_s:.1f}"),
            ("controller CPU without / with the page (%)",
             lambda r: f"{r.page_idle_cpu_percent:.1f} / {r.page_cpu_percent:.1f}"),
            ("controller CPU per status (ms)", lambda r: f"{r.cpu_ms_per_status:.2f}"),
            ("goodbye: all gone (s)", lambda r: f"{r.goodbye_s:.2f}")]
    lines = ["| | " + " | ".join(str(r.nodes) for r in results) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in results) + " |"
              for name, cell in rows]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10,100,1000")
    parser.add_argument("--per-responder", type=int, default=0,
                        help="simulated agents per zeroconf responder (0: 1 up to 100 agents, "
                             "else 25)")
    parser.add_argument("--health-interval", type=float, default=2.0,
                        help="the controller's (its default is 2 s; the tests use 0.5)")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--page-nodes", type=int, default=100,
                        help="nodes the page subscribes to (at most the count)")
    parser.add_argument("--status-seconds", type=float, default=20.0,
                        help="each of the two windows: without, then with the page")
    parser.add_argument("--sim-processes", type=int, default=1,
                        help="simulator processes sharing the agents")
    parser.add_argument("--discovery-timeout", type=float, default=120.0)
    parser.add_argument("--controller-log-level", default="info")
    parser.add_argument("--sim-log-level", default="warning")
    parser.add_argument("--rmem", type=int, default=0, metavar="BYTES",
                        help="raise net.core.rmem_default and rmem_max to BYTES for the bench "
                             "(restored after); 0: leave them")
    parser.add_argument("--controller-arg", action="append", default=[], metavar="ARG",
                        help="a controller argument (repeatable; write --name=value)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the controller over the idle window into DIR (raw "
                             "collapsed stacks, one file per count)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


RMEM = (Path("/proc/sys/net/core/rmem_max"), Path("/proc/sys/net/core/rmem_default"))


class ReceiveBuffers:
    """The host's default and largest socket receive buffers raised to `size` while in the
    `with` block (new sockets get the default; zeroconf sets none), then put back."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.saved: list[str] = []

    def __enter__(self) -> ReceiveBuffers:
        if self.size:
            self.saved = [path.read_text() for path in RMEM]
            for path in RMEM:  # rmem_max first: the default may not exceed it
                path.write_text(str(max(self.size, int(self.saved[0]))
                                    if path.name == "rmem_max" else self.size))
        return self

    def __exit__(self, *exc: object) -> None:
        for path, value in reversed(list(zip(RMEM, self.saved, strict=True))):
            path.write_text(value)


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (a packet socket counts the mDNS packets)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the controller inherits it
    # A SIGTERM (timeout, kill) unwinds: the host's buffers are put back, the daemons stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ReceiveBuffers(args.rmem):
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    results = []
    work = Path(tempfile.mkdtemp(prefix="marco-scale-"))
    os.chmod(work, 0o755)
    bench = Bench(args, work)
    for count in (int(n) for n in args.counts.split(",")):
        result = bench.run(count)
        results.append(result)
        print(f"{count} nodes: {json.dumps(asdict(result))}", flush=True)
    if args.keep:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
