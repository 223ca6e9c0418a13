"""A real cluster CA for the tests (made with `controller.pki`, the code `marco-controller
init` runs), and the certificates each agent, controller and user needs."""

from __future__ import annotations

import os
from pathlib import Path

from controller.pki import ClusterPki
from marco.tls import ClientTls

#: The bridge addresses of the tests' network namespaces, where controllers listen in the
#: netns tests (like `marco-controller init --name ADDRESS` on a real install).
NETNS_GATEWAYS = ("10.213.77.1", "10.213.78.1")


class TestPki(ClusterPki):
    """The CA plus a cache of issued bundles: one per node name, one test client."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        if not self.exists():
            self.init(controller_names=NETNS_GATEWAYS)
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
