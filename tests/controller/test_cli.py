"""The marco-controller command line: help, refusals with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def controller_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_help_lists_the_options() -> None:
    out = controller_cli("--help")
    assert out.returncode == 0
    for flag in ("--bind", "--port", "--secret-file", "--pam-service", "--mdns-interface",
                 "--node", "--token-max-age", "--config", "MARCO_PAM_SERVICE"):
        assert flag in out.stdout


def test_refuses_su_and_a_missing_secret(secret_file: Path, tmp_path: Path) -> None:
    out = controller_cli("--secret-file", str(secret_file), "--pam-service", "su")
    assert out.returncode == 2 and "lets root in" in out.stderr and out.stderr.count("\n") == 1
    out = controller_cli("--secret-file", str(tmp_path / "none"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = controller_cli("--secret-file", str(secret_file), "--node", "host:notaport")
    assert out.returncode == 2 and "port must be a number" in out.stderr
