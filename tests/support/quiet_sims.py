"""Simulated agents that never announce themselves (issue 15): the controller is given them as
static nodes (`NAME=HOST:PORT` in its config), so a thousand of them load no one's mDNS on the
loopback (other tests' controllers browse it) and are all listed, which zeroconf on one
loopback does not manage at 1,000 (bench/README.md, "Controller at scale").

Each is `tests.support.sim_agents`' simulated agent (own port, own certificate, health with the
secret proof, status stream), served by its `Simulator` without `announce()`. Node `i` is in
group `groups[i % len(groups)]`, so a group filter has something to choose. Run it as
`python -m tests.support.quiet_sims`; `QuietSimulatorProcess` starts one and reads its ready file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marco.errors import AuthenticationError
from marco.tokens import TokenSigner, load_secret
from tests.support.daemon import end_process
from tests.support.paths import ROOT
from tests.support.sim_agents import SimSettings, Simulator
from tests.support.waiting import wait_for


class UserOrServiceSigner(TokenSigner):
    """Takes a user's token or the controller's service token on /v1/stream, as the agent does:
    the controller's page sockets get status from one service subscription per node
    (controller/status_hub.py), which sim_agents' streams alone refuse."""

    def __init__(self, secret: Any, service: TokenSigner) -> None:
        super().__init__(secret)
        self.service = service

    def verify(self, token: str | None, not_before: Any = None, denied: Any = None) -> str:
        try:
            return super().verify(token, not_before, denied)
        except AuthenticationError:
            return self.service.verify(token)


def group_nodes(simulator: Simulator, groups: Sequence[str]) -> None:
    """Node i in groups[i % len(groups)] (none without groups)."""
    for index, node in enumerate(simulator.nodes):
        node.groups = (groups[index % len(groups)],) if groups else ()


async def serve(settings: SimSettings, groups: Sequence[str]) -> None:
    """Serve every simulated agent, write the ready file, stop on SIGTERM or SIGINT."""
    simulator = Simulator(settings)
    simulator.signer = UserOrServiceSigner(load_secret(settings.secret_file), simulator.service)
    group_nodes(simulator, groups)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.time()
    simulator.serve()
    try:
        temporary = settings.ready_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(simulator.ready(started, time.time())))
        temporary.rename(settings.ready_file)
        await stop.wait()
    finally:
        await simulator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.quiet_sims",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--pki-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--groups", default="", help="comma-separated; node i gets the i-th (mod)")
    parser.add_argument("--status-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = SimSettings(prefix=args.prefix, count=args.count, secret_file=args.secret_file,
                           pki_dir=args.pki_dir, ready_file=args.ready_file,
                           status_interval=args.status_interval)
    asyncio.run(serve(settings, [g for g in args.groups.split(",") if g]))
    return 0


class QuietSimulatorProcess:
    """A quiet simulator process: `nodes` (name: port) once ready, `static_nodes()` for the
    controller's config, `stop()`. The certificates are issued here first."""

    def __init__(self, pki: Any, secret_file: Path, work_dir: Path, prefix: str, count: int,
                 groups: Sequence[str] = (), status_interval: float = 1.0,
                 ready_timeout: float = 120.0) -> None:
        self.names = SimSettings(prefix, count, secret_file, pki.dir, work_dir).names()
        for name in self.names:
            pki.agent_bundle(name)
        self.ready_file = work_dir / f"quiet-{prefix}.json"
        self.ready_file.unlink(missing_ok=True)
        self.log_path = work_dir / f"quiet-{prefix}.log"
        command = [sys.executable, "-m", "tests.support.quiet_sims", "--prefix", prefix,
                   "--count", str(count), "--secret-file", str(secret_file),
                   "--pki-dir", str(pki.dir), "--ready-file", str(self.ready_file),
                   "--groups", ",".join(groups), "--status-interval", str(status_interval)]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=ROOT)
        self.ready_timeout = ready_timeout
        self._ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        """The ready file's contents: pid, nodes (name: port)."""
        if self._ready is None:
            def ready() -> bool:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the simulator exited with {self.process.returncode}:\n"
                                       f"{self.log()}")
                return self.ready_file.exists()
            wait_for(ready, self.ready_timeout, "the quiet simulated agents to listen")
            self._ready = json.loads(self.ready_file.read_text())
        return self._ready

    @property
    def nodes(self) -> dict[str, int]:
        nodes: dict[str, int] = self.wait_ready()["nodes"]
        return nodes

    def static_nodes(self, address: str = "127.0.0.1") -> list[str]:
        """`NAME=HOST:PORT` of every simulated agent, the controller's `node` setting."""
        return [f"{name}={address}:{port}" for name, port in self.nodes.items()]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL past `timeout`."""
        return end_process(self.process, self._log, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
