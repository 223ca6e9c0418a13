"""The binary forms of POST /v1/executions (issue 14): stdin raw after a JSON head, and the
?wait=1 answer's stdout and stderr raw after theirs; the JSON form still works for old clients,
and malformed or oversized binary bodies are refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.support.daemon as daemon
from marco.agent_api import EXECUTION_TYPE, RESULT_TYPE, ExecutionResult, frame_head
from marco.errors import BadRequest, PayloadTooLarge
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.paths import ROOT
from tests.support.pki import TestPki
from tests.support.users import UnixUser

# NUL, every byte value, invalid UTF-8 (a lone continuation byte, a truncated sequence, CR)
ODD_BYTES = b"\x00" + bytes(range(256)) + b"\xff\xfe\x80abc\xe2\x82\r\n\x00"
BOTH = ["python3", "-c", "import sys; data = sys.stdin.buffer.read(); "
        "sys.stdout.buffer.write(data); sys.stderr.buffer.write(data)"]  # stdin to both
OLD_AGENT = "7a2a7df"  # the last commit whose agent knows only the JSON form
SAME_FIELDS = ("rc", "stdout", "stderr", "signal", "timed_out", "stopped", "stdout_truncated",
               "stderr_truncated", "via")


def same(result: ExecutionResult) -> tuple[Any, ...]:
    """What two runs of one command must share (not the id, the duration or the note)."""
    return tuple(getattr(result, name) for name in SAME_FIELDS)


def post(agent: AgentProcess, token: str, body: bytes | Iterator[bytes],
         headers: dict[str, str], path: str = "/v1/executions?wait=1",
         ) -> tuple[int, str, bytes]:
    """A raw POST: status, Content-Type and body of the answer."""
    conn = agent.connection(timeout=30)
    try:
        conn.request("POST", path, body=body, encode_chunked=not isinstance(body, bytes),
                     headers={"Authorization": f"Bearer {token}", **headers})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_both_forms_give_the_same_bytes(shared_agent: AgentProcess, signer: TokenSigner,
                                        alice: UnixUser) -> None:
    """Binary stdin and output (NUL, invalid UTF-8) and 5 MB each way, through the binary
    client and the JSON one: byte for byte the same result."""
    token = signer.issue(alice.name)
    big = os.urandom(5 * 1024 * 1024) + ODD_BYTES
    cases: list[tuple[list[str] | str, bytes]] = [
        (["cat"], ODD_BYTES), ("cat >&2", ODD_BYTES), (BOTH, big),
        ("printf 'a\\0b\\377'; printf 'e\\0\\376' >&2; exit 3", b""), (["true"], b"")]
    results = {}
    with shared_agent.client(token, timeout=60) as binary, \
            shared_agent.client(token, timeout=60, binary=False) as plain:
        for command, stdin in cases:
            new, old = binary.run(command, stdin=stdin), plain.run(command, stdin=stdin)
            assert same(new) == same(old), command
            results[str(command)] = new
        assert binary.binary and not plain.binary  # nobody fell back to JSON
    assert results["['cat']"].stdout == ODD_BYTES and results["cat >&2"].stderr == ODD_BYTES
    assert results[str(BOTH)].stdout == results[str(BOTH)].stderr == big
    printf = results[str(cases[3][0])]
    assert (printf.rc, printf.stdout, printf.stderr) == (3, b"a\0b\xff", b"e\0\xfe")


def test_the_async_client_speaks_both_forms(shared_agent: AgentProcess, signer: TokenSigner,
                                            alice: UnixUser) -> None:
    token = signer.issue(alice.name)

    async def both() -> tuple[ExecutionResult, ExecutionResult, str]:
        new = await shared_agent.async_client(token).run("cat; printf E >&2", stdin=ODD_BYTES)
        old = await shared_agent.async_client(token, binary=False).run("cat; printf E >&2",
                                                                       stdin=ODD_BYTES)
        started = await shared_agent.async_client(token).start(["cat"], stdin=ODD_BYTES)
        return new, old, started

    new, old, started = asyncio.run(both())
    assert same(new) == same(old) and new.stdout == ODD_BYTES and new.stderr == b"E"
    with shared_agent.client(token) as c:
        assert c.execution(started)["id"] == started


def test_the_answer_is_binary_only_when_asked(shared_agent: AgentProcess, signer: TokenSigner,
                                              alice: UnixUser) -> None:
    """A binary request that accepts RESULT_TYPE gets the raw answer (its head says the sizes);
    without that Accept, and for a JSON request, today's JSON; ?wait=0 answers the id."""
    token = signer.issue(alice.name)
    body = frame_head({"argv": ["sh", "-c", "cat; printf E >&2"]}) + ODD_BYTES
    status, kind, answer = post(shared_agent, token, body,
                                {"Content-Type": EXECUTION_TYPE, "Accept": RESULT_TYPE})
    assert (status, kind) == (200, RESULT_TYPE)
    (size,) = struct.unpack(">I", answer[:4])
    head = json.loads(answer[4:4 + size])
    assert (head["rc"], head["stdout_size"], head["stderr_size"]) == (0, len(ODD_BYTES), 1)
    assert answer[4 + size:] == ODD_BYTES + b"E"
    assert ExecutionResult.from_frame(answer).stdout == ODD_BYTES

    status, kind, answer = post(shared_agent, token, body, {"Content-Type": EXECUTION_TYPE})
    assert (status, kind.split(";")[0]) == (200, "application/json")
    assert ExecutionResult.from_json(json.loads(answer)).stdout == ODD_BYTES

    status, kind, answer = post(shared_agent, token, json.dumps({"argv": ["true"]}).encode(),
                                {"Accept": "application/json"})
    assert (status, kind.split(";")[0]) == (200, "application/json")
    assert json.loads(answer)["rc"] == 0

    status, _, answer = post(shared_agent, token, body, {"Content-Type": EXECUTION_TYPE},
                             path="/v1/executions")
    assert status == 201 and set(json.loads(answer)) == {"id", "pid"}


@pytest.fixture
def small_agent(start_agent) -> AgentProcess:
    return start_agent(extra_args=["--max-stdin-bytes", "100000",
                                   "--max-command-bytes", "10000"])


def test_malformed_binary_bodies_are_400(small_agent: AgentProcess, signer: TokenSigner,
                                         alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    binary = {"Content-Type": EXECUTION_TYPE, "Accept": RESULT_TYPE}
    bodies = {
        b"": "shorter than its 4-byte head length",
        b"\x00\x00\x01": "shorter than its 4-byte head length",
        struct.pack(">I", 100) + b'{"argv":["true"]}': "goes past the end of the body",
        struct.pack(">I", 3) + b"[1]x": "binary body: the head must be a JSON object",
        struct.pack(">I", 5) + b"nope!": "not valid JSON",
        struct.pack(">I", 3) + b"NaN": "not valid JSON",
        frame_head({"argv": ["cat"], "stdin": "eA=="}) + b"x": "follows the head",
        frame_head({"argv": "cat"}) + b"x": "non-empty list of strings",
    }
    with small_agent.client(token) as c:
        before = len(c.executions())
        for body, message in bodies.items():
            status, _, answer = post(small_agent, token, body, binary)
            assert status == 400, (body, answer)
            assert message in json.loads(answer)["message"], (body, answer)
        assert len(c.executions()) == before  # nothing started
        assert c.run(["true"]).rc == 0  # and the agent serves on


def test_limits_apply_to_the_binary_form(small_agent: AgentProcess, signer: TokenSigner,
                                         alice: UnixUser) -> None:
    """stdin, the command and the whole body are bounded as in the JSON form, with 413."""
    token = signer.issue(alice.name)
    binary = {"Content-Type": EXECUTION_TYPE}
    with small_agent.client(token) as c, small_agent.client(token, binary=False) as plain:
        assert c.run(["wc", "-c"], stdin=b"x" * 100_000).stdout.strip() == b"100000"
        for client in (c, plain):
            with pytest.raises(PayloadTooLarge, match="stdin takes 100001 bytes.*at most 100000"):
                client.run(["sleep", "60"], stdin=b"x" * 100_001)
            with pytest.raises(PayloadTooLarge, match="at most 10000"):
                client.run(["echo", "y" * 10_000])
        before = len(c.executions())
        too_long_head = struct.pack(">I", 10**9) + b"{}"
        chunks = iter([frame_head({"argv": ["cat"]})] + [b"z" * 65536] * 30)  # no length given
        # no length given either: stdin is measured once the body is in
        stdin_chunks = iter([frame_head({"argv": ["cat"]}), b"s" * 50_000, b"s" * 50_001])
        for body, message in ((too_long_head, "request head takes 1000000000 bytes"),
                              (stdin_chunks, "stdin takes 100001 bytes"),
                              (b"\0" * 300_000, "request body is 300000 bytes"),
                              (chunks, "request body passed")):
            status, _, answer = post(small_agent, token, body, binary)
            assert status == 413, (message, answer)
            assert message in json.loads(answer)["message"], answer
        # a caller whose token fails learns that, not the limits, and its body is not kept
        for body in (b"\0" * 300_000, frame_head({"argv": ["true"]})):
            status, _, answer = post(small_agent, "not-a-token", body, binary)
            assert status == 401, answer
        assert len(c.executions()) == before  # nothing started
        assert c.run(["true"]).rc == 0
        with pytest.raises(BadRequest, match="PATH_MAX"):
            c.run(["true"], cwd="/" + "d" * 5000)


@pytest.fixture
def old_agent(secret_file: Path, tmp_path: Path, pki: TestPki,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentProcess]:
    """A real agent of OLD_AGENT: its agent/ and marco/ from git, run from their own tree."""
    found = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_AGENT, "agent", "marco"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"this checkout lacks commit {OLD_AGENT}: {found.stderr[-200:]!r}")
    tree = tmp_path / "old-tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=found.stdout, check=True)
    monkeypatch.setattr(daemon, "ROOT", tree)  # DaemonProcess runs `python -m agent` there
    agent = AgentProcess(secret_file, tmp_path / "old-state", pki=pki)
    monkeypatch.undo()
    yield agent
    agent.stop()


def test_an_old_agent_gets_the_json_form(old_agent: AgentProcess, signer: TokenSigner,
                                         alice: UnixUser) -> None:
    """An agent that refuses the binary body (400) gets the call again as JSON, and JSON from
    then on; its JSON answer reads as ever."""
    token = signer.issue(alice.name)
    with old_agent.client(token) as c:
        assert c.binary and c.run(["cat"], stdin=ODD_BYTES).stdout == ODD_BYTES
        assert not c.binary
        assert c.run("cat >&2", stdin=ODD_BYTES).stderr == ODD_BYTES

    async def asynchronous() -> tuple[ExecutionResult, bool]:
        client = old_agent.async_client(token)
        return await client.run(["cat"], stdin=ODD_BYTES), client.binary

    result, binary = asyncio.run(asynchronous())
    assert result.stdout == ODD_BYTES and not binary
