"""The file helper's status line: json's own text, without importing json at each start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.filehelper import encode

SOURCE = (Path(__file__).resolve().parents[2] / "agent" / "filehelper.py").read_text()


def test_the_status_line_is_what_json_dumps_writes() -> None:
    tricky = 'a "quoted" \\ path\n\t\r\b\f\x00\x1f\x7f é ☃ 😀 \udcff' + "".join(map(chr, range(300)))
    for fields in ({"ok": True, "ready": True}, {"ok": False, "status": 404, "error": tricky},
                   {"ok": True, "path": tricky, "size": 2 ** 40, "mode": "0644"},
                   {"ok": True, "none": None}):
        assert encode(fields) == json.dumps(fields)


def test_the_helper_starts_without_json(tmp_path: Path) -> None:
    """A real helper run (as the agent starts it, -I -S -c) answers a missing file with a
    404 line json reads back, and never imports json."""
    missing = tmp_path / 'no "such" fïle'
    done = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", SOURCE, "read",
                           str(missing)], capture_output=True, timeout=30, check=False)
    status = json.loads(done.stdout.splitlines()[0])
    assert status["ok"] is False and status["status"] == 404
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert imported  # -X importtime did report the imports
    assert "json" not in imported and "re" not in imported
