"""The agent API's request layer, without I/O: what each call sends, how each answer reads, the
one timeout rule, and the two clients exposing the same calls. Also the shared small parsers
(Bearer headers, octal modes). Pure: no root, no network."""

from __future__ import annotations

import base64
import inspect
import io
import json

import pytest

from marco.agent_api import (
    EXECUTION_TYPE,
    NO_LIMIT,
    RESULT_TYPE,
    AgentRequests,
    Download,
    ExecutionResult,
    frame_head,
    parse_answer,
    raise_for_status,
    split_frame,
)
from marco.client import AgentClient, AsyncAgentClient
from marco.errors import (
    AgentUnreachable,
    BadRequest,
    InsufficientStorage,
    ProtocolError,
    to_body,
    wire_errors,
)
from marco.modes import format_mode, parse_mode
from marco.tokens import bearer_token

API = AgentRequests("tok", timeout=30)
JSON_API = AgentRequests("tok", timeout=30, binary=False)
CALLS = ["health", "executions", "execution", "output", "start", "run", "stop", "status",
         "push_revocations", "push_crl", "put_file", "get_file"]


def test_json_calls_carry_the_token_and_a_json_body() -> None:
    request = JSON_API.start(["ls", "-l"], stdin=b"in", cwd="/tmp", label="x", no_log=True)
    assert (request.method, request.path) == ("POST", "/v1/executions")
    assert request.headers == {"Authorization": "Bearer tok", "Content-Type": "application/json"}
    assert json.loads(request.body or b"") == {"argv": ["ls", "-l"], "cwd": "/tmp", "label": "x",
                                               "stdin": base64.b64encode(b"in").decode(),
                                               "no_log": True}
    assert parse_answer(request, 201, b'{"id": "abc", "pid": 7}') == "abc"
    get = AgentRequests(None).status()
    assert (get.method, get.path, get.headers, get.body) == ("GET", "/v1/status", {}, None)


@pytest.mark.parametrize("request_, path", [
    (API.health(), "/v1/health"),
    (API.health("n0nce"), "/v1/health?challenge=n0nce"),
    (API.executions(), "/v1/executions"),
    (API.execution("e1"), "/v1/executions/e1"),
    (API.output("e1"), "/v1/executions/e1/output?since=0"),
    (API.output("e1", since=5, limit=10), "/v1/executions/e1/output?since=5&limit=10"),
    (API.stop("e1"), "/v1/executions/e1"),
    # An id from a run's own events stays one path segment (review #19).
    (API.execution("../status"), "/v1/executions/..%2Fstatus"),
    (API.output("a/b?c", since=1), "/v1/executions/a%2Fb%3Fc/output?since=1"),
    (API.stop("../../v1/files"), "/v1/executions/..%2F..%2Fv1%2Ffiles"),
    (API.run("true"), "/v1/executions?wait=1"),
    (API.push_revocations({"alice": 1.0}), "/v1/revocations"),
    (API.push_crl(b"PEM"), "/v1/crl"),
    (API.put_file("~/a b", mode=0o640, overwrite=False),
     "/v1/files?path=~%2Fa+b&overwrite=false&mode=0640"),
    (API.get_file("/etc/x"), "/v1/files?path=%2Fetc%2Fx"),
], ids=lambda value: getattr(value, "method", value))
def test_each_call_names_its_endpoint(request_, path: str) -> None:
    assert request_.path == path
    assert request_.headers["Authorization"] == "Bearer tok"


def test_one_timeout_rule() -> None:
    assert API.status().timeout == 30
    assert API.run("sleep 5", timeout=5).timeout == 35  # its own timeout plus the client's
    assert API.run("sleep 5").timeout == NO_LIMIT + 30
    assert API.run("sleep 5", timeout=5, wait_timeout=7).timeout == 7
    assert API.put_file("f").streamed and API.get_file("f").streamed
    assert not API.run("true").streamed


def test_uploads_ask_before_sending_and_give_a_length_when_known() -> None:
    sized, chunked = API.put_file("f", size=4), API.put_file("f")
    assert sized.headers["Expect"] == "100-continue" and sized.headers["Content-Length"] == "4"
    assert "Content-Length" not in chunked.headers and chunked.body is None
    assert API.push_crl(b"PEM").headers["Content-Type"] == "application/pkix-crl"


def test_answers_read_into_results() -> None:
    answer = {"id": "e", "rc": None, "signal": "SIGTERM", "duration": 1.5, "timed_out": True,
              "stdout": base64.b64encode(b"out").decode(), "stderr": ""}
    result = parse_answer(API.run("x"), 200, json.dumps(answer).encode())
    assert result == ExecutionResult("e", None, b"out", b"", 1.5, "SIGTERM", timed_out=True)
    assert parse_answer(API.executions(), 200, b'{"executions": [1]}') == [1]
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_answer(API.status(), 200, b"<html>")


def test_executions_go_binary_with_a_json_fallback() -> None:
    """stdin raw after a length-prefixed JSON head; ?wait=1 asks for the binary answer and
    still reads JSON (an agent that does not know it); the fallback is the JSON form."""
    stdin = b"\0\xff" * 1000
    run = API.run(["cat"], stdin=stdin, cwd="/tmp", runner=False)
    assert (run.method, run.path) == ("POST", "/v1/executions?wait=1")
    assert run.headers["Content-Type"] == EXECUTION_TYPE
    assert run.headers["Accept"].startswith(RESULT_TYPE)
    head, rest = split_frame(run.body or b"")
    assert head == {"argv": ["cat"], "cwd": "/tmp", "runner": False} and rest == stdin
    assert run.timeout == NO_LIMIT + 30 and not run.streamed
    assert run.fallback is not None
    assert run.fallback() == JSON_API.run(["cat"], stdin=stdin, cwd="/tmp", runner=False)
    start = API.start("true")
    assert start.path == "/v1/executions" and "Accept" not in start.headers
    assert split_frame(start.body or b"") == ({"shell": "true"}, b"")
    assert parse_answer(start, 201, b'{"id": "abc", "pid": 7}', RESULT_TYPE) == "abc"
    json_answer = {"id": "e", "rc": 0, "duration": 1.0, "stdout": "b3V0", "stderr": ""}
    assert parse_answer(run, 200, json.dumps(json_answer).encode(),
                        "application/json").stdout == b"out"
    assert JSON_API.run("x").fallback is None and JSON_API.run("x").read_frame is None


def test_binary_answers_read_into_results() -> None:
    head = {"id": "e", "rc": 1, "signal": None, "duration": 0.5, "stdout_truncated": True,
            "via": "runner", "runner_note": "warm", "stdout_size": 3, "stderr_size": 2}
    body = frame_head(head) + b"\0\xffo" + b"er"
    result = parse_answer(API.run("x"), 200, body, f"{RESULT_TYPE}; charset=binary")
    assert result == ExecutionResult("e", 1, b"\0\xffo", b"er", 0.5, stdout_truncated=True,
                                      via="runner", runner_note="warm")
    for broken, why in ((body[:-1], "4 bytes of output for 5"),
                        (body + b"x", "6 bytes of output for 5"),
                        (b"\0\0", "shorter than its 4-byte head length"),
                        (frame_head({**head, "stderr_size": -1}) + b"\0\xffo",
                         "without its output sizes"),
                        (frame_head({**head, "stdout_size": True}) + b"\0\xffo",
                         "without its output sizes")):
        with pytest.raises(ProtocolError, match=why):
            parse_answer(API.run("x"), 200, broken, RESULT_TYPE)


WIRE_ERRORS = sorted(wire_errors().values(), key=lambda c: c.code)


@pytest.mark.parametrize("cls", WIRE_ERRORS, ids=[c.code for c in WIRE_ERRORS])
def test_every_error_status_raises_its_class(cls) -> None:
    body = json.dumps(to_body(cls("no", hint="h"))).encode()
    with pytest.raises(cls) as raised:
        parse_answer(API.status(), cls.status, body)
    assert type(raised.value) is cls and raised.value.hint == "h"


def test_a_download_streams_its_body_and_keeps_an_error_aside() -> None:
    out = io.BytesIO()
    download = Download(out)
    download.start(200, "6")
    download.feed(b"abc")
    download.feed(b"def")
    assert download.finish("agent n1") == 6 and out.getvalue() == b"abcdef"

    short = Download(io.BytesIO())
    short.start(200, "10")
    short.feed(b"abc")
    with pytest.raises(AgentUnreachable, match="ended early"):
        short.finish("agent n1")

    refused, untouched = Download(out), out.getvalue()
    refused.start(507, None)
    refused.feed(json.dumps(to_body(InsufficientStorage("disk full"))).encode())
    with pytest.raises(InsufficientStorage, match="disk full"):
        refused.finish("agent n1")
    assert out.getvalue() == untouched
    raise_for_status(204, b"")


def test_both_clients_offer_the_same_calls() -> None:
    for name in CALLS:
        sync, asynchronous = getattr(AgentClient, name), getattr(AsyncAgentClient, name)
        assert inspect.iscoroutinefunction(asynchronous), name
        shape = [(p.name, p.default, p.kind) for p in inspect.signature(sync).parameters.values()]
        assert shape == [(p.name, p.default, p.kind)
                         for p in inspect.signature(asynchronous).parameters.values()], name
        # and both build their request with the same AgentRequests method of that name
        assert hasattr(AgentRequests, name)


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc"),
    ("Bearer ", None), ("Basic abc", None), ("", None), (None, None), ("Bearer", None),
])
def test_bearer_headers(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("raw, mode", [
    ("0644", 0o644), ("755", 0o755), (" 0600 ", 0o600), (0o640, 0o640), ("7777", 0o7777),
    (None, None), ("", None),
])
def test_modes(raw: str | int | None, mode: int | None) -> None:
    assert parse_mode(raw) == mode


@pytest.mark.parametrize("raw", ["rwx", "8", "10000", -1, True, "0x1"])
def test_bad_modes(raw: object) -> None:
    with pytest.raises(BadRequest, match="mode"):
        parse_mode(raw)  # type: ignore[arg-type]


def test_mode_spelling_on_the_wire() -> None:
    assert format_mode(0o7) == "0007" and format_mode(0o4755) == "4755"
