"""The marco_runs callback's sender process: posts batches of a run's events to the controller.

    python -m ansible_plugins.core.runs_sender   (started by the callback, never by hand)

ansible-playbook forks a worker per task and host; a thread of its own that speaks TLS may
hold OpenSSL's locks at the moment of a fork, and the worker then hangs forever in its own
first TLS call (seen: `SSL_CTX_new` waiting on `CRYPTO_THREAD_write_lock`). So the callback's
thread only moves lines through pipes, and this process, started by fork + exec, does the
HTTPS. It reads JSON lines on stdin: first `{"url", "path", "token", "timeout"}`, then one
`{"events": [...]}` per batch, each answered on stdout by `{"ok": true}` or
`{"error": "..."}`. It ends at the end of its input.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from marco.controller_client import call_controller
from marco.errors import MarcoError


def serve(lines: IO[str], answers: IO[str]) -> None:
    """Post each batch read from `lines`, answering each on `answers`."""
    config: dict[str, Any] = json.loads(lines.readline() or "{}")
    for line in lines:
        try:
            call_controller(config["url"], config["path"], config["token"],
                            {"events": json.loads(line)["events"]},
                            timeout=float(config["timeout"]))
            answer: dict[str, Any] = {"ok": True}
        except MarcoError as error:
            answer = {"error": str(error)}
        except (ValueError, KeyError, TypeError) as error:
            answer = {"error": f"bad batch: {error}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
