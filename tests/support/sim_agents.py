"""A light agent simulator (issue 15): many simulated agents in one process, to load a real
controller with hundreds or thousands of nodes without running that many agents.

Each simulated agent is what the controller sees of an agent and no more:

- its own HTTPS port on one address, mutual TLS with its own certificate from the test PKI
  (the controller checks that the certificate names the node);
- `GET /v1/health` with the node's facts and, given a challenge, the secret proof
  (`marco.tokens.health_proof`, as the agent makes it);
- `/v1/stream`: the `auth` message (a user's token of the cluster secret, or the controller's
  service token, as the agent takes for the page sockets' status subscription), `hello`, and
  status snapshots once per `status_interval` while subscribed (`{"type": "status", ...}`);
- `PUT /v1/crl` with the controller's service token (answered, not kept);
- its zeroconf announcement, built by the agent's own `agent.announce` code (same service
  type, instance and host names, TXT record). With `per_responder=1` every simulated agent
  has its own `Announcer` (its own mDNS sockets, clash check and probes: exactly a real
  agent's packets); with more, that many agents share one zeroconf responder, which answers a
  browse with one packet for all of them (fewer packets than real agents: say which in a
  measurement). Stopping sends the goodbyes after the ports are closed, as the agent does.

A simulated agent listed in `bad_proof` answers challenges with a wrong key: a real
controller must never list it. One listed in `fail_first_health` answers its first health
check 503 (a check lost once): a controller must still list it, without a new announcement.
With `announce=False` nothing is announced: a controller is given the agents as static nodes
(`SimulatorProcess.static_nodes()`), so a thousand of them load no one's mDNS on the loopback.
With `spread_groups`, node i is in `groups[i % len(groups)]` alone (else in all of them).
Run it as `python -m tests.support.sim_agents` (see `main`); `SimulatorProcess` starts one for
a test or a benchmark and reads its ready file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web
import tornado.websocket
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from agent.announce import Announcement, Announcer
from marco import __version__, protocol
from marco.errors import AuthenticationError
from marco.jsonapi import JsonApiMixin
from marco.serving import ConnectionLimits, close_server, listen
from marco.tls import ServerTlsFiles
from marco.tokens import (
    SERVICE_MAX_AGE,
    SERVICE_SALT,
    TokenSigner,
    bearer_token,
    health_proof,
    load_secret,
)
from tests.support.daemon import end_process
from tests.support.paths import ROOT
from tests.support.waiting import wait_for

log = logging.getLogger(__name__)

MAX_AGENTS = 5000          # simulated agents in one process (ports, sockets, certificates)
MAX_SOCKETS_PER_AGENT = 64  # stream sockets one simulated agent keeps open
MAX_PENDING_BYTES = 1024 * 1024  # unsent bytes per stream socket before it is closed (slow)
GOODBYE_TIMEOUT = 10.0     # seconds for a shared responder's goodbyes
TOP_PROCESSES = 10         # processes in a snapshot, as the agent's default top N
WRONG_KEY = b"not-the-cluster-secret-" * 2


@dataclass(frozen=True)
class SimSettings:
    """What to simulate: `count` agents named PREFIX-0 .. PREFIX-(count-1) on `address`."""

    prefix: str
    count: int
    secret_file: Path
    pki_dir: Path
    ready_file: Path
    address: str = "127.0.0.1"
    per_responder: int = 1
    bad_proof: frozenset[str] = frozenset()
    fail_first_health: frozenset[str] = frozenset()
    groups: tuple[str, ...] = ()
    status_interval: float = 1.0
    announce: bool = True
    spread_groups: bool = False  # node i in groups[i % len(groups)] alone

    def __post_init__(self) -> None:
        if not 0 < self.count <= MAX_AGENTS:
            raise ValueError(f"count must be 1..{MAX_AGENTS}, not {self.count}")
        if self.per_responder < 1:
            raise ValueError("per_responder must be at least 1")
        if self.status_interval < 0.05:
            raise ValueError("status_interval must be at least 0.05 s")

    def names(self) -> list[str]:
        return [f"{self.prefix}-{index}" for index in range(self.count)]

    def groups_of(self, index: int) -> tuple[str, ...]:
        if self.spread_groups and self.groups:
            return (self.groups[index % len(self.groups)],)
        return self.groups


def bundle_dir(pki_dir: Path, node: str) -> Path:
    """Where `TestPki.agent_bundle(node)` writes a node's certificate, key, CA and CRL."""
    return pki_dir / "agents" / node


@dataclass
class SimNode:
    """One simulated agent: its name, the key its proofs use, its stream subscribers."""

    name: str
    key: bytes
    groups: tuple[str, ...]
    port: int = 0
    subscribers: set[StreamSocket] = field(default_factory=set)
    sockets: int = 0
    failures_left: int = 0  # health checks still to answer 503

    def facts(self, challenge: str | None) -> dict[str, Any]:
        """What `/v1/health` answers: the agent's facts, the proof when challenged."""
        facts: dict[str, Any] = {"node": self.name, "version": __version__,
                                 "proto": protocol.PROTOCOL_VERSION,
                                 "os": platform.system().lower(), "arch": platform.machine(),
                                 "cpus": 1, "groups": ",".join(self.groups),
                                 "user_switching": False, "isolation": "simulated"}
        if challenge:
            facts["proof"] = health_proof(self.key, challenge[:128], self.name)
        return facts

    def snapshot(self, tick: int) -> dict[str, Any]:
        """A status snapshot with the agent's keys and about its size (agent/status.py)."""
        now = time.time()
        busy = float(tick % 100)
        return {
            "time": now, "node": self.name, "hostname": self.name,
            "addresses": [{"interface": "eth0", "address": "192.0.2.1", "family": "ipv4"}],
            "uptime": 1000.0 + tick, "kernel": platform.release(), "os": "simulated",
            "cpu": {"percent": busy, "per_core": [busy, busy], "count": 2},
            "load": [0.1, 0.2, 0.3],
            "memory": {"total": 8 << 30, "available": 6 << 30, "used": 2 << 30,
                       "buffers": 1 << 20, "cached": 1 << 30, "percent": 25.0},
            "swap": {"total": 0, "used": 0, "percent": 0.0},
            "temperature": None,
            "network": {"rx_bytes": tick * 1000, "tx_bytes": tick * 500,
                        "rx_rate": 1000.0, "tx_rate": 500.0},
            "processes": [{"pid": 100 + i, "user": "root", "name": f"proc{i}",
                           "cpu": busy / (i + 1), "rss": (i + 1) << 20}
                          for i in range(TOP_PROCESSES)],
        }


class HealthHandler(JsonApiMixin, tornado.web.RequestHandler):
    """GET /v1/health[?challenge=NONCE] of one simulated agent."""

    service_name = "agent"

    def initialize(self, node: SimNode) -> None:
        self.node = node

    def get(self) -> None:
        log.debug("health of %s asked", self.node.name)  # which nodes a controller probes
        if self.node.failures_left > 0:
            self.node.failures_left -= 1
            log.warning("failing a health check of %s (503)", self.node.name)
            self.write_json({"error": "unavailable", "message": "simulated failure"}, 503)
            return
        self.write_json(self.node.facts(self.get_query_argument("challenge", None)))


class CrlHandler(JsonApiMixin, tornado.web.RequestHandler):
    """PUT /v1/crl, which the controller sends each new node: its service token is checked,
    the CRL is not kept (the simulated agents' TLS stays on the CRL they started with)."""

    service_name = "agent"

    def initialize(self, node: SimNode, service: TokenSigner) -> None:
        self.node, self.service = node, service

    def put(self) -> None:
        token = bearer_token(self.request.headers.get("Authorization"))
        try:
            self.service.verify(token)
        except AuthenticationError as error:
            self.write_json({"error": "unauthorized", "message": str(error)}, 401)
            return
        self.write_json({"updated": False})


class NotFoundHandler(JsonApiMixin, tornado.web.RequestHandler):
    service_name = "agent"

    def initialize(self, node: SimNode) -> None:
        self.node = node

    def prepare(self) -> None:
        self.write_json({"error": "not_found", "message": "not simulated"}, 404)


class StreamSocket(tornado.websocket.WebSocketHandler):
    """/v1/stream as the agent speaks it: auth first (a token of the cluster secret, checked),
    then hello; `subscribe` with status true adds the socket to the node's status sends."""

    def initialize(self, node: SimNode, signer: TokenSigner, service: TokenSigner) -> None:
        self.node, self.signer, self.service = node, signer, service
        self.user: str | None = None
        self.pending = 0
        self.counted = False

    def open(self) -> None:
        if self.node.sockets >= MAX_SOCKETS_PER_AGENT:
            self.close(protocol.CLOSE_TOO_MANY_SOCKETS, "too many sockets on this simulated node")
            return
        self.node.sockets += 1
        self.counted = True

    def on_message(self, message: str | bytes) -> None:
        try:
            data = protocol.decode(message)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.close(protocol.CLOSE_BAD_MESSAGE, "messages must be JSON objects")
            return
        if self.user is None:
            self._authenticate(data)
        elif data.get("type") == "subscribe" and isinstance(data.get("status"), bool):
            (self.node.subscribers.add if data["status"] else self.node.subscribers.discard)(self)
        elif data.get("type") == "ping":
            self.send(protocol.encode({"type": "pong", "data": data.get("data")}))

    def _authenticate(self, data: dict[str, Any]) -> None:
        token = data.get("token") if data.get("type") == "auth" else None
        try:
            self.user = self._verify(token if isinstance(token, str) else "")
        except AuthenticationError as error:
            self.close(protocol.CLOSE_UNAUTHORIZED, str(error)[:120])
            return
        self.send(protocol.encode({"type": "hello", "user": self.user, "node": self.node.name,
                                   "proto": protocol.PROTOCOL_VERSION, "executions": []}))

    def _verify(self, token: str) -> str:
        """A user's token, else the controller's service token (its status subscription)."""
        try:
            return self.signer.verify(token)
        except AuthenticationError:
            return self.service.verify(token)

    def send(self, message: str) -> None:
        """Queue without blocking; a socket too far behind is closed, as the agent does."""
        if self.pending + len(message) > MAX_PENDING_BYTES:
            self.close(protocol.CLOSE_SLOW_CONSUMER, "too slow")
            return
        try:
            future = self.write_message(message)
        except tornado.websocket.WebSocketClosedError:
            return
        self.pending += len(message)
        future.add_done_callback(lambda _: self._written(len(message)))

    def _written(self, size: int) -> None:
        self.pending -= size

    def on_close(self) -> None:
        self.node.subscribers.discard(self)
        if self.counted:
            self.node.sockets -= 1
            self.counted = False


def make_app(node: SimNode, signer: TokenSigner,
             service: TokenSigner) -> tornado.web.Application:
    """One simulated agent's routes (health, stream, the CRL push; else a JSON 404)."""
    args = {"node": node}
    return tornado.web.Application(
        [(r"/v1/health", HealthHandler, args),
         (r"/v1/crl", CrlHandler, {**args, "service": service}),
         (r"/v1/stream", StreamSocket, {**args, "signer": signer, "service": service})],
        default_handler_class=NotFoundHandler, default_handler_args=args,
        websocket_max_message_size=64 * 1024)


def server_tls(pki_dir: Path, node: str) -> ssl.SSLContext:
    """The node's server context, as the agent builds it (client certificate required)."""
    out = bundle_dir(pki_dir, node)
    return ServerTlsFiles(str(out / "agent.pem"), str(out / "agent.key"), str(out / "ca.pem"),
                          str(out / "crl.pem")).context()


class Simulator:
    """The simulated agents of one process: servers, announcements, status sends."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        secret = load_secret(settings.secret_file)
        self.signer = TokenSigner(secret)
        self.service = TokenSigner(secret, SERVICE_MAX_AGE, salt=SERVICE_SALT)
        self.nodes = [SimNode(name, WRONG_KEY if name in settings.bad_proof else secret[-1],
                              settings.groups_of(index),
                              failures_left=int(name in settings.fail_first_health))
                      for index, name in enumerate(settings.names())]
        self._servers: list[Any] = []
        self._announcers: list[Announcer] = []
        self._responders: list[tuple[AsyncZeroconf, list[AsyncServiceInfo]]] = []
        self._status: asyncio.Task[None] | None = None

    def serve(self) -> None:
        """Listen: one port per simulated agent on the address, each with its own certificate."""
        limits = ConnectionLimits()
        for node in self.nodes:
            server = listen(make_app(node, self.signer, self.service), 0, self.settings.address, limits,
                            xheaders=False,
                            ssl_options=server_tls(self.settings.pki_dir, node.name))
            node.port = server.port
            self._servers.append(server)
        self._status = asyncio.ensure_future(self._send_status())

    def announcement(self, node: SimNode) -> Announcement:
        return Announcement(node=node.name, port=node.port, addresses=(self.settings.address,),
                            groups=node.groups, tls=True)

    async def announce(self) -> None:
        """Announce every node at once, as agents started together would."""
        size = self.settings.per_responder
        if size == 1:
            self._announcers = [Announcer(self.announcement(node), [self.settings.address])
                                for node in self.nodes]
            await asyncio.gather(*(announcer.start() for announcer in self._announcers))
            return
        chunks = [self.nodes[i:i + size] for i in range(0, len(self.nodes), size)]
        await asyncio.gather(*(self._announce_shared(chunk) for chunk in chunks))

    async def _announce_shared(self, nodes: Sequence[SimNode]) -> None:
        """Several nodes on one responder: the agent's own records, zeroconf's own probes."""
        zc = AsyncZeroconf(interfaces=[self.settings.address])
        infos = [Announcer(self.announcement(node), [self.settings.address]).build_info()
                 for node in nodes]
        self._responders.append((zc, infos))
        announced = await asyncio.gather(*(zc.async_register_service(info) for info in infos))
        await asyncio.gather(*announced)

    async def _send_status(self) -> None:
        """Each interval, one snapshot per node with subscribers, sent to each of them."""
        tick = 0
        while True:
            await asyncio.sleep(self.settings.status_interval)
            tick += 1
            for node in self.nodes:
                if node.subscribers:
                    message = protocol.encode({"type": "status", "status": node.snapshot(tick)})
                    for socket in list(node.subscribers):
                        socket.send(message)

    async def stop(self) -> None:
        """Close the ports first, then say goodbye (a controller checks a goodbye by
        connecting: a node still answering is kept)."""
        if self._status is not None:
            self._status.cancel()
        for server in self._servers:
            server.stop()
        await asyncio.gather(*(announcer.stop() for announcer in self._announcers),
                             *(self._goodbye(zc, infos) for zc, infos in self._responders))
        await asyncio.gather(*(close_server(server) for server in self._servers))

    @staticmethod
    async def _goodbye(zc: AsyncZeroconf, infos: list[AsyncServiceInfo]) -> None:
        """A shared responder's goodbyes for all its nodes, bounded; then its sockets close."""
        try:
            goodbyes = await asyncio.gather(*(zc.async_unregister_service(info)
                                              for info in infos))
            await asyncio.wait_for(asyncio.gather(*goodbyes), GOODBYE_TIMEOUT)
        except Exception:  # noqa: BLE001 - the sockets must close; the peers' TTL expires them
            log.warning("goodbyes not all sent", exc_info=True)
        finally:
            await zc.async_close()

    def ready(self, announce_started: float, announced: float) -> dict[str, Any]:
        return {"pid": os.getpid(), "nodes": {node.name: node.port for node in self.nodes},
                "announce_started": announce_started, "announced": announced}


async def run(settings: SimSettings) -> None:
    """Serve, announce, write the ready file; on SIGTERM or SIGINT stop with goodbyes."""
    simulator = Simulator(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    simulator.serve()
    try:
        started = time.time()
        if settings.announce:
            await simulator.announce()
        ready = simulator.ready(started, time.time())
        temporary = settings.ready_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(ready))
        temporary.rename(settings.ready_file)
        log.info("%d simulated agents announced in %.2f s", settings.count,
                 ready["announced"] - started)
        await stop.wait()
    finally:
        await simulator.stop()


def parse_args(argv: Sequence[str] | None) -> SimSettings:
    parser = argparse.ArgumentParser(prog="python -m tests.support.sim_agents",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--pki-dir", type=Path, required=True,
                        help="the test PKI; each node's bundle must be issued already")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--per-responder", type=int, default=1)
    parser.add_argument("--bad-proof", action="append", default=[])
    parser.add_argument("--fail-first-health", action="append", default=[])
    parser.add_argument("--groups", default="")
    parser.add_argument("--spread-groups", action="store_true",
                        help="node i in the i-th group (mod) alone, not in all of them")
    parser.add_argument("--no-announce", dest="announce", action="store_false",
                        help="announce nothing: give the controller static nodes")
    parser.add_argument("--status-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return SimSettings(prefix=args.prefix, count=args.count, secret_file=args.secret_file,
                       pki_dir=args.pki_dir, ready_file=args.ready_file, address=args.address,
                       per_responder=args.per_responder, bad_proof=frozenset(args.bad_proof),
                       fail_first_health=frozenset(args.fail_first_health),
                       groups=tuple(g for g in args.groups.split(",") if g),
                       status_interval=args.status_interval, announce=args.announce,
                       spread_groups=args.spread_groups)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0


class SimulatorProcess:
    """A simulator process for a test or a benchmark: `nodes` (name: port) once it is ready;
    `stop()` sends SIGTERM (goodbyes) and waits. The certificates are issued here first."""

    def __init__(self, pki: Any, secret_file: Path, work_dir: Path, prefix: str, count: int,
                 per_responder: int = 1, bad_proof: Sequence[str] = (),
                 fail_first_health: Sequence[str] = (), extra_args: Sequence[str] = (),
                 ready_timeout: float = 120.0) -> None:
        names = SimSettings(prefix, count, secret_file, pki.dir, work_dir).names()
        for name in names:
            pki.agent_bundle(name)
        self.names = names
        self.ready_file = work_dir / f"sim-{prefix}.json"
        self.ready_file.unlink(missing_ok=True)
        self.log_path = work_dir / f"sim-{prefix}.log"
        command = [sys.executable, "-m", "tests.support.sim_agents", "--prefix", prefix,
                   "--count", str(count), "--secret-file", str(secret_file),
                   "--pki-dir", str(pki.dir), "--ready-file", str(self.ready_file),
                   "--per-responder", str(per_responder),
                   *[arg for name in bad_proof for arg in ("--bad-proof", name)],
                   *[arg for name in fail_first_health
                     for arg in ("--fail-first-health", name)], *extra_args]
        self.started = time.time()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=ROOT)
        self.ready_timeout = ready_timeout
        self._ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        """The ready file's contents: pid, nodes (name: port), announce_started, announced."""
        if self._ready is None:
            def ready() -> bool:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the simulator exited with {self.process.returncode}:\n"
                                       f"{self.log()}")
                return self.ready_file.exists()
            wait_for(ready, self.ready_timeout, "the simulated agents to announce themselves")
            self._ready = json.loads(self.ready_file.read_text())
        return self._ready

    @property
    def nodes(self) -> dict[str, int]:
        nodes: dict[str, int] = self.wait_ready()["nodes"]
        return nodes

    def static_nodes(self, address: str = "127.0.0.1") -> list[str]:
        """`NAME=HOST:PORT` of every simulated agent, the controller's `node` setting (for a
        simulator started with `--no-announce`)."""
        return [f"{name}={address}:{port}" for name, port in self.nodes.items()]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (goodbyes after the ports close) and wait; SIGKILL past `timeout`."""
        return end_process(self.process, self._log, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
