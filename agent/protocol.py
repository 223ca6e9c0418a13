"""Wire-protocol constants and message shapes shared by the agent and its clients.

The protocol is documented in docs/protocol.md; this module is its single source of truth in code.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"
SERVICE_TYPE = "_marco._tcp.local."
DEFAULT_PORT = 7370

#: WebSocket close codes (4000-4999 are application defined).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_SLOW_CONSUMER = 4408
CLOSE_BAD_MESSAGE = 4400


def encode(message: dict[str, Any]) -> str:
    """Serialise one protocol message compactly (one JSON object, no spaces)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def started_event(execution_id: str, label: str, command: list[str] | str, cwd: str,
                  started: float, seq: int) -> dict[str, Any]:
    """The `started` event sent to the owner's sockets when an execution begins."""
    return {"type": "started", "id": execution_id, "label": label, "command": command,
            "cwd": cwd, "started": started, "seq": seq}


def output_event(execution_id: str, stream: str, seq: int, lines: list[str]) -> dict[str, Any]:
    """An `output` event: `lines` carry sequence numbers seq, seq+1, ... in order."""
    return {"type": "output", "id": execution_id, "stream": stream, "seq": seq, "lines": lines}


def exit_event(execution_id: str, rc: int | None, signal: str | None, duration: float,
               seq: int, timed_out: bool = False, stopped: bool = False) -> dict[str, Any]:
    """The `exit` event: `rc` for a normal exit, `signal` (e.g. "SIGTERM") when killed."""
    return {"type": "exit", "id": execution_id, "rc": rc, "signal": signal,
            "duration": duration, "seq": seq, "timed_out": timed_out, "stopped": stopped}
