"""The README's first command in its --once mode: agents, controller, discovery, live output."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.paths import ROOT
from tests.support.run import RunNames

pytestmark = [pytest.mark.root, pytest.mark.slow]  # the demo makes a cluster as root


def test_demo_once_runs_marcos_main_job(run: RunNames) -> None:
    prefix = f"demo{run.tag}"  # another run's demo may announce at the same time
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--once",
                          "--name-prefix", prefix], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"discovered all 3 agents by zeroconf", out.stdout)
    for node in (f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"):
        assert f"{node} | step 5 of 5" in out.stdout
        assert f"{node} ! a warning on stderr" in out.stdout
    assert f"exit codes: {prefix}-1=0, {prefix}-2=0, {prefix}-3=0" in out.stdout
    assert re.search(r"Viewer: https://127\.0\.0\.1:\d+/", out.stdout)
    assert "mutual TLS" in out.stdout
    # The example playbook ran through the marco connection, its build lines printed live.
    assert re.search(rf"{prefix}-1\s+\| step: compile", out.stdout)
    assert re.search(rf"{prefix}-\d\s+:\s+ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0", out.stdout)
    assert "ansible-playbook exited with 0" in out.stdout
    # The playbook is one run on the controller (the marco_runs callback), with its permalink.
    assert re.search(r"Marco run: https://127\.0\.0\.1:\d+/runs/r[0-9a-f]{20}\n", out.stdout)
