"""A real cluster CA for the tests (made with `controller.pki`, the code `marco-controller
init` runs), and the certificates each agent, controller and user needs."""

from __future__ import annotations

import os
from pathlib import Path

from controller.pki import ClusterPki
from marco.tls import ClientTls


class TestPki(ClusterPki):
    """The CA plus a cache of issued bundles: one per node name, one test client."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, directory: Path, controller_names: tuple[str, ...] = ()) -> None:
        """`controller_names`: addresses the controller's certificate names besides localhost,
        like `marco-controller init --name ADDRESS` on a real install (the netns bridges)."""
        super().__init__(directory)
        if not self.exists():
            self.init(controller_names=controller_names)
        os.chmod(self.dir, 0o755)  # only the key files inside are secret (0600)
        self._client: ClientTls | None = None

    def agent_bundle(self, node: str) -> Path:
        """The bundle `marco-controller issue-agent NODE` writes (issued once per name)."""
        out = self.dir / "agents" / node
        if not (out / "agent.pem").exists():
            self.issue(node, "agent", out_dir=out)
        return out

    def agent_args(self, node: str) -> list[str]:
        out = self.agent_bundle(node)
        return ["--tls-cert", str(out / "agent.pem"), "--tls-key", str(out / "agent.key"),
                "--tls-ca", str(out / "ca.pem"), "--tls-crl", str(out / "crl.pem")]

    def client_tls(self) -> ClientTls:
        """The test process's own client identity (like an automation certificate)."""
        if self._client is None:
            out = self.dir / "clients" / "tester"
            if not (out / "client.pem").exists():
                self.issue("tester", "client", out_dir=out)
            self._client = ClientTls(str(self.ca_file), str(out / "client.pem"),
                                     str(out / "client.key"), str(self.crl_file))
        return self._client

    def client_env(self) -> dict[str, str]:
        """The test client's files as the MARCO_CLIENT_* variables the CLI and plugins read."""
        tls = self.client_tls()
        return {"MARCO_CLIENT_CERT": tls.cert_file, "MARCO_CLIENT_KEY": tls.key_file,
                "MARCO_TLS_CA": tls.ca_file}
