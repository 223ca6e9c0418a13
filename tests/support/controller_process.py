"""Start a real `marco-controller` process for a test."""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marco.tls import server_trust_context
from tests.support.daemon import DaemonProcess
from tests.support.pki import TestPki


class ControllerProcess(DaemonProcess):
    """With `pki`: HTTPS for the web and API, mutual TLS to agents; without: --dev. It binds
    any free port; its log and state dir are in a fresh controller-* dir under `log_dir`. With
    `netns` it runs inside that network namespace (`bind` one of its addresses)."""

    module = "controller"
    health_path = "/login"

    def __init__(self, secret_file: Path, log_dir: Path, pam_service: str,
                 extra_args: Sequence[str] = (), bind: str = "127.0.0.1",
                 mdns_interfaces: Sequence[str] = ("127.0.0.1",),
                 pki: TestPki | None = None, port: int = 0, home: Path | None = None,
                 netns: str | None = None) -> None:
        self.pki = pki
        if home is None:  # its log and state dir
            home = Path(tempfile.mkdtemp(prefix="controller-", dir=log_dir))
        self._arguments = dict(secret_file=secret_file, log_dir=log_dir, pam_service=pam_service,
                               extra_args=extra_args, bind=bind,
                               mdns_interfaces=mdns_interfaces, pki=pki, home=home, netns=netns)
        args = ["--bind", bind, "--port", str(port), "--secret-file", str(secret_file),
                "--state-dir", str(home / "state"),
                "--pam-service", pam_service, "--log-level", "debug", "--health-interval", "0.5",
                *[arg for address in mdns_interfaces for arg in ("--mdns-interface", address)],
                *(["--pki-dir", str(pki.dir)] if pki is not None else ["--dev"]),
                *extra_args]
        context = server_trust_context(str(pki.ca_file)) if pki is not None else None
        super().__init__(args, home / "controller.log", bind, home / "state",
                         netns=netns, ssl_context=context)

    def restarted(self, more_args: Sequence[str] = ()) -> ControllerProcess:
        """A new process with everything this one had: state dir, port, options (for restarts
        after `stop()`), and `more_args` after them; its log starts afresh."""
        arguments = dict(self._arguments, extra_args=[*self._arguments["extra_args"],  # type: ignore[misc]
                                                      *more_args])
        return ControllerProcess(port=self.port, **arguments)  # type: ignore[arg-type]

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1)

    @property
    def ca_file(self) -> Path:
        """The CA clients trust to reach this controller (a --dev one has none)."""
        assert self.pki is not None, "a --dev controller has no CA"
        return self.pki.ca_file

    def inventory_hosts(self, token: str) -> dict[str, Any]:
        """The hosts of `/api/inventory` with their variables, as Ansible sees them."""
        hosts: dict[str, Any] = self.get_json("/api/inventory", token)["_meta"]["hostvars"]
        return hosts

    def get_json(self, path: str, token: str) -> Any:
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10, context=self.ssl_context) as response:
            return json.load(response)
