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
    any free port; its log and state dir are in a fresh controller-* dir under `log_dir`."""

    module = "controller"
    health_path = "/login"

    def __init__(self, secret_file: Path, log_dir: Path, pam_service: str,
                 extra_args: Sequence[str] = (), bind: str = "127.0.0.1",
                 mdns_interfaces: Sequence[str] = ("127.0.0.1",),
                 pki: TestPki | None = None) -> None:
        self.pki = pki
        home = Path(tempfile.mkdtemp(prefix="controller-", dir=log_dir))  # its log and state
        args = ["--bind", bind, "--port", "0", "--secret-file", str(secret_file),
                "--state-dir", str(home / "state"),
                "--pam-service", pam_service, "--log-level", "debug", "--health-interval", "0.5",
                *[arg for address in mdns_interfaces for arg in ("--mdns-interface", address)],
                *(["--pki-dir", str(pki.dir)] if pki is not None else ["--dev"]),
                *extra_args]
        context = server_trust_context(str(pki.ca_file)) if pki is not None else None
        super().__init__(args, home / "controller.log", bind, home / "state",
                         ssl_context=context)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1)

    @property
    def ca_file(self) -> Path:
        """The CA clients trust to reach this controller (a --dev one has none)."""
        assert self.pki is not None, "a --dev controller has no CA"
        return self.pki.ca_file

    def get_json(self, path: str, token: str) -> Any:
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10, context=self.ssl_context) as response:
            return json.load(response)
