"""Wire-protocol constants and message shapes shared by the agent and its clients.

The protocol is documented in docs/protocol.md; this module is its single source of truth in code.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

PROTOCOL_VERSION = 1
MAX_LABEL_CHARS = 1000  # an execution's label (play / task @ host)
API_PREFIX = "/v1"
SERVICE_TYPE = "_marco._tcp.local."
DEFAULT_PORT = 7370

#: WebSocket close codes (4000-4999 are application defined).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_SLOW_CONSUMER = 4408
CLOSE_BAD_MESSAGE = 4400
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_NO_SESSION = 4404        # /v1/terminal: no such (detached) session of this user
CLOSE_INPUT_BACKLOG = 4408     # /v1/terminal: input the pty took nothing of for too long
CLOSE_NORMAL = 1000
CLOSE_TAKEN_OVER = 4409        # /v1/terminal: the same user's reattach took the session
TERMINAL_PATH = "/v1/terminal"

_WILDCARDS = {"", "0.0.0.0", "::", "*"}


def encode(message: dict[str, Any]) -> str:
    """Serialise one protocol message compactly (one JSON object, no spaces)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(text: str | bytes) -> Any:
    """Parse one JSON message strictly: NaN and Infinity (which Python accepts) are refused."""
    return json.loads(text, parse_constant=_reject_constant)


def started_event(execution_id: str, label: str, command: list[str] | str, cwd: str,
                  started: float, seq: int, no_log: bool = False,
                  tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The `started` event sent to the owner's sockets when an execution begins; a `no_log`
    execution's command is censored and no `output` event follows. `tags` are the caller's
    (a run's id, task and host: docs/runs.md)."""
    return {"type": "started", "id": execution_id, "label": label, "command": command,
            "cwd": cwd, "started": started, "seq": seq, "no_log": no_log,
            "tags": tags or {}}


def output_event(execution_id: str, stream: str, seq: int, lines: list[str],
                 time: float) -> dict[str, Any]:
    """An `output` event: `lines` carry sequence numbers seq, seq+1, ... in order; `time` is
    the node's Unix time when the first of them was read (all of them share it)."""
    return {"type": "output", "id": execution_id, "stream": stream, "seq": seq,
            "time": round(time, 6), "lines": lines}


def exit_event(execution_id: str, rc: int | None, signal: str | None, duration: float,
               seq: int, timed_out: bool = False, stopped: bool = False) -> dict[str, Any]:
    """The `exit` event: `rc` for a normal exit, `signal` (e.g. "SIGTERM") when killed."""
    return {"type": "exit", "id": execution_id, "rc": rc, "signal": signal,
            "duration": duration, "seq": seq, "timed_out": timed_out, "stopped": stopped}


def specific_address(value: str, what: str) -> str:
    """`value` as a normalised specific IP address, or ConfigError (wildcards refused)."""
    text = value.strip().strip("[]")
    if text in _WILDCARDS:
        raise ConfigError(f"{what} {value!r} is a wildcard: list the addresses to announce on")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not an IP address") from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"{what} {value!r} is not a unicast address of this host")
    return str(address)


def choose_mdns_interfaces(bind: str, configured: Sequence[str]) -> list[str]:
    """Where to announce (agent) or browse (controller). Configured addresses win; else the bind
    address when it is a specific address (default bind 127.0.0.1 -> loopback only); a wildcard
    or host-name bind with nothing
    configured gives [] (the caller warns and does not announce, rather than leaking mDNS onto
    every network)."""
    if configured:
        chosen = [specific_address(item, "mDNS interface address") for item in configured]
        return list(dict.fromkeys(chosen))
    try:
        return [specific_address(bind, "bind address")]
    except ConfigError:
        return []


def require_loopback(bind: str, what: str = "--dev") -> None:
    """Plain HTTP only where nothing leaves the machine: `bind` must be a loopback address."""
    try:
        loopback = ipaddress.ip_address(bind.strip().strip("[]")).is_loopback
    except ValueError:
        loopback = bind.strip() == "localhost"
    if not loopback:
        raise ConfigError(f"{what} serves plain HTTP, so it only binds a loopback address "
                          f"(127.0.0.1 or ::1), not {bind!r}; for anything else set up TLS "
                          "(marco-controller init / issue-agent)")
