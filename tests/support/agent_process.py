"""Start a real `marco-agent` process for a test and stop it afterwards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marco.client import AgentClient, AsyncAgentClient
from tests.support.daemon import DaemonProcess
from tests.support.pki import TestPki

NETNS_PORT = 7370  # an agent alone in its network namespace keeps the default port


class AgentProcess(DaemonProcess):
    """One agent; announce off unless asked, debug logs next to its state dir. With `pki` it
    serves mutual TLS with a certificate for its node name; without, it runs in --dev mode.
    Without `port` it binds any free port (in a namespace: 7370) and `port` is the one it got."""

    module = "agent"
    health_path = "/v1/health"

    def __init__(self, secret_file: Path, state_dir: Path, node_name: str = "test-node",
                 extra_args: Sequence[str] = (), bind: str = "127.0.0.1",
                 port: int | None = None, announce: bool = False,
                 env: dict[str, str] | None = None, netns: str | None = None,
                 pki: TestPki | None = None) -> None:
        self._arguments = dict(node_name=node_name, extra_args=extra_args, bind=bind, port=port,
                               announce=announce, env=env, netns=netns, pki=pki)
        self.node_name = node_name
        self.secret_file, self.state_dir, self.extra_args = secret_file, state_dir, extra_args
        self.announce, self.pki = announce, pki
        self.tls = pki.client_tls() if pki is not None else None
        if port is None:
            port = 0 if netns is None else NETNS_PORT
        args = ["--bind", bind, "--port", str(port), "--secret-file", str(secret_file),
                "--state-dir", str(state_dir), "--node-name", node_name, "--log-level", "debug",
                "--announce" if announce else "--no-announce",
                *(pki.agent_args(node_name) if pki is not None else ["--dev"]), *extra_args]
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(args, state_dir.with_name(f"{state_dir.name}.log"), bind, state_dir,
                         env=env, netns=netns,
                         ssl_context=self.tls.context_for(node_name) if self.tls else None)
        self._arguments["port"] = self.port  # a restart comes back where clients know it

    def restarted(self) -> AgentProcess:
        """A new process with everything this one had: state dir, port, name, certificate
        (for restarts after `stop()`, including SIGKILL: the predecessor's listening.json
        stays behind, and the new process is waited for until it writes its own)."""
        return AgentProcess(self.secret_file, self.state_dir, **self._arguments)  # type: ignore[arg-type]

    def client(self, token: str | None, **kwargs: Any) -> AgentClient:
        """A sync client to this agent (mutual TLS as the test client when it serves TLS)."""
        kwargs.setdefault("tls", self.tls)
        return AgentClient(self.host, self.port, token, node=self.node_name, **kwargs)

    def async_client(self, token: str | None, **kwargs: Any) -> AsyncAgentClient:
        kwargs.setdefault("tls", self.tls)
        return AsyncAgentClient(self.host, self.port, token, node=self.node_name, **kwargs)
