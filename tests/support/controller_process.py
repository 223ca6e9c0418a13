"""Start a real `marco-controller` process for a test."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from tests.support.daemon import DaemonProcess, free_port


class ControllerProcess(DaemonProcess):
    module = "controller"
    health_path = "/login"

    def __init__(self, secret_file: Path, log_dir: Path, pam_service: str = "marco-test",
                 extra_args: Sequence[str] = (), bind: str = "127.0.0.1",
                 mdns_interfaces: Sequence[str] = ("127.0.0.1",)) -> None:
        port = free_port(bind)
        args = ["--bind", bind, "--port", str(port), "--secret-file", str(secret_file),
                "--state-dir", str(log_dir / f"controller-state-{port}"),
                "--pam-service", pam_service, "--log-level", "debug", "--health-interval", "0.5",
                *[arg for address in mdns_interfaces for arg in ("--mdns-interface", address)],
                *extra_args]
        super().__init__(args, log_dir / f"controller-{port}.log", bind, port)

    def get_json(self, path: str, token: str) -> Any:
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
