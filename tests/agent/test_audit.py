"""The agent's audit log: executions, files and refusals, one JSON line each, root-only."""

from __future__ import annotations

import io
import json
import os
import stat
from typing import Any

import pytest

from marco.errors import AuthenticationError
from marco.tokens import TokenSigner
from tests.support.users import UnixUser


def test_audit_log_records_who_did_what(start_agent, signer: TokenSigner,
                                        alice: UnixUser) -> None:
    agent = start_agent()
    with agent.client(signer.issue(alice.name)) as client:
        result = client.run("echo audited; exit 5", cwd="~", label="audit test")
        client.put_file(io.BytesIO(b"payload"), "audited.txt", size=7, mode=0o600)
        client.get_file("audited.txt", io.BytesIO())
    with pytest.raises(AuthenticationError):
        agent.client("forged.token.value").executions()
    agent.stop()

    log_path = agent.state_dir / "audit.log"
    info = os.stat(log_path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event["event"], []).append(event)
    start = next(e for e in by_kind["execution.start"] if e["id"] == result.id)
    end = next(e for e in by_kind["execution.end"] if e["id"] == result.id)
    assert start["user"] == alice.name and start["cwd"] == alice.home
    assert start["command"] == "echo audited; exit 5" and start["label"] == "audit test"
    assert end["rc"] == 5 and end["duration"] >= 0 and end["time"] >= start["time"]
    write = by_kind["file.write"][0]
    assert write["user"] == alice.name and write["path"] == os.path.join(alice.home, "audited.txt")
    assert write["size"] == 7 and write["mode"] == "0600" and write["client"] == "127.0.0.1"
    assert by_kind["file.read"][0]["path"] == os.path.join(alice.home, "audited.txt")
    refused = by_kind["auth.refused"][0]
    assert refused["user"] is None and refused["client"] == "127.0.0.1"
    assert all(e["node"] == agent.node_name for e in events)
