"""The agent's HTTP API without I/O: what each call sends (`Request`) and how its answer reads
(`parse_answer`, `Download`). The sync and the async client (`marco.client`) only move the
bytes, so both send the same requests, apply the same timeouts and raise the same typed errors.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Generic, TypeVar
from urllib.parse import quote, urlencode

from .errors import AgentUnreachable, ProtocolError, error_from_answer
from .modes import format_mode
from .protocol import decode
from .tokens import bearer_header

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
NO_LIMIT = 24 * 3600.0  # how long an answer may take when nothing else bounds it
ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer kept while streaming a download

# The binary forms of POST /v1/executions (docs/protocol.md): a 4-byte big-endian length, a
# JSON head, then raw bytes; they spare base64 (4/3 the size, and an encode and a decode on
# each side) for stdin (an Ansible module payload is ~180 KB) and for a ?wait=1 answer.
EXECUTION_TYPE = "application/x-marco-execution"  # the request: head + stdin
RESULT_TYPE = "application/x-marco-result"        # the ?wait=1 answer: head + stdout + stderr
HEAD_LENGTH = struct.Struct(">I")


def frame_head(head: dict[str, Any]) -> bytes:
    """A binary body's start: the head's length, then the head as JSON."""
    text = json.dumps(head, separators=(",", ":")).encode()
    return HEAD_LENGTH.pack(len(text)) + text


def split_frame(body: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """A binary body's JSON head and the raw bytes after it (not copied); ValueError says
    what is wrong with it."""
    view = memoryview(body)
    if len(view) < HEAD_LENGTH.size:
        raise ValueError(f"the body ({len(view)} bytes) is shorter than its 4-byte head length")
    (size,) = HEAD_LENGTH.unpack_from(view)
    end = HEAD_LENGTH.size + size
    if end > len(view):
        raise ValueError(f"the head length ({size} bytes) goes past the end of the body "
                         f"({len(view)} bytes)")
    try:
        head = decode(bytes(view[HEAD_LENGTH.size:end]))
    except ValueError:
        raise ValueError("the head is not valid JSON") from None
    if not isinstance(head, dict):
        raise ValueError("the head must be a JSON object")
    return head, view[end:]


def media_type(header: str | None) -> str:
    """A Content-Type's media type, without parameters, in lower case."""
    return (header or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of a finished execution run with `wait`."""

    id: str
    rc: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    signal: str | None = None
    timed_out: bool = False
    stopped: bool = False
    stdout_truncated: bool = False   # cut by the capture limit or the user's disk budget
    stderr_truncated: bool = False
    via: str = "process"             # "runner": a warm module runner ran it (docs/protocol.md)
    runner_note: str = ""            # why that path, e.g. "warm (runner 42, task 7)"
    user: str = ""                   # whom it ran as, and that user's home on the node: what
    home: str = ""                   # `echo ~` prints there ("" from older agents)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecutionResult:
        """A JSON answer: stdout and stderr in base64."""
        return cls.from_head(data, base64.b64decode(data["stdout"]),
                             base64.b64decode(data["stderr"]))

    @classmethod
    def from_frame(cls, body: bytes) -> ExecutionResult:
        """A binary answer (RESULT_TYPE): the JSON head (the JSON answer without stdout and
        stderr, plus `stdout_size` and `stderr_size`), raw stdout, raw stderr."""
        try:
            head, rest = split_frame(body)
        except ValueError as error:
            raise ProtocolError(f"agent sent a malformed result: {error}") from None
        out, err = head.get("stdout_size"), head.get("stderr_size")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                   for n in (out, err)):
            raise ProtocolError("agent sent a result without its output sizes")
        assert isinstance(out, int) and isinstance(err, int)
        if out + err != len(rest):
            raise ProtocolError(f"agent sent {len(rest)} bytes of output for {out + err}")
        return cls.from_head(head, bytes(rest[:out]), bytes(rest[out:]))

    @classmethod
    def from_head(cls, data: dict[str, Any], stdout: bytes, stderr: bytes) -> ExecutionResult:
        return cls(id=data["id"], rc=data["rc"], stdout=stdout, stderr=stderr,
                   duration=data["duration"], signal=data.get("signal"),
                   timed_out=data.get("timed_out", False), stopped=data.get("stopped", False),
                   stdout_truncated=data.get("stdout_truncated", False),
                   stderr_truncated=data.get("stderr_truncated", False),
                   via=data.get("via", "process"), runner_note=data.get("runner_note", ""),
                   user=str(data.get("user") or ""), home=str(data.get("home") or ""))


def execution_body(command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                   env: dict[str, str] | None = None, label: str = "",
                   timeout: float | None = None, no_log: bool = False,
                   tags: dict[str, str] | None = None, runner: bool = True) -> dict[str, Any]:
    """The JSON body of POST /v1/executions for an argv list or a shell string; `no_log`
    asks the agent to keep and stream nothing of it (only a `wait` caller gets the output);
    `tags` (e.g. a run's id, task and host) are kept with the execution; `runner=False`
    keeps a pipelined Ansible module out of the agent's warm module runner."""
    body: dict[str, Any] = {"argv": command} if isinstance(command, list) else {"shell": command}
    if stdin:
        body["stdin"] = base64.b64encode(stdin).decode("ascii")
    if cwd:
        body["cwd"] = cwd
    if env:
        body["env"] = env
    if label:
        body["label"] = label
    if timeout:
        body["timeout"] = timeout
    if no_log:
        body["no_log"] = True
    if tags:
        body["tags"] = tags
    if not runner:
        body["runner"] = False
    return body


def _same(data: Any) -> Any:
    return data


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call: what to send, how long its answer may take, and how to read it.

    `timeout` bounds the wait for the answer once the request is sent. A `streamed` body
    (upload, download) has no total bound: the sync transport bounds each socket operation by
    its client's timeout, the async one the whole exchange by NO_LIMIT (deploys watch their
    uploads for stalls themselves)."""

    method: str
    path: str  # with its query
    headers: dict[str, str]
    timeout: float
    body: bytes | None = None
    streamed: bool = False
    read: Callable[[Any], T] = field(default=_same)
    read_frame: Callable[[bytes], T] | None = None  # reads a RESULT_TYPE answer
    # The JSON form of a binary request, for an agent that refuses the binary one (400):
    # an agent older than it; a 400 started nothing, so sending it again is safe.
    fallback: Callable[[], Request[T]] | None = None


def raise_for_status(status: int, body: bytes) -> None:
    if status >= 400:
        raise error_from_answer(status, body)


def parse_answer(request: Request[T], status: int, body: bytes,
                 content_type: str | None = None) -> T:
    """The result of `request` from its answer (JSON, or binary as its `content_type` says),
    or the typed error it carries."""
    raise_for_status(status, body)
    if request.read_frame is not None and media_type(content_type) == RESULT_TYPE:
        return request.read_frame(body)
    try:
        data = json.loads(body)
    except ValueError:
        raise ProtocolError("agent answered something that is not JSON") from None
    return request.read(data)


class Download:
    """A streamed GET /v1/files answer: the file's bytes go to `destination`, an error answer
    is kept (its first ERROR_BODY_LIMIT bytes) and raised by `finish`."""

    def __init__(self, destination: BinaryIO) -> None:
        self.destination = destination
        self.status = 0
        self.expected = -1
        self.written = 0
        self._error = b""

    def start(self, status: int, content_length: str | None) -> None:
        """The answer's head (an unreadable length only skips the completeness check)."""
        self.status = status
        try:
            self.expected = int(content_length) if content_length is not None else -1
        except ValueError:
            self.expected = -1

    def feed(self, chunk: bytes) -> None:
        if self.status >= 400:
            self._error = (self._error + chunk)[:ERROR_BODY_LIMIT]
        else:
            self.destination.write(chunk)
            self.written += len(chunk)

    def finish(self, what: str) -> int:
        """The byte count written; the answer's error, or AgentUnreachable if it ended early."""
        raise_for_status(self.status, self._error)
        if 0 <= self.expected and self.written < self.expected:
            raise AgentUnreachable(f"download from {what} ended early")
        return self.written


def base_url(host: str, port: int, tls: bool) -> str:
    """http(s)://host:port, IPv6 addresses in brackets."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{'https' if tls else 'http'}://{netloc}"


def describe(host: str, port: int, node: str) -> str:
    """How errors name an agent: its node name and address."""
    return f"agent {node} ({host}:{port})" if node != host else f"agent {host}:{port}"


class AgentRequests:
    """Builds the requests of every agent API call for one token and default timeout;
    `binary` sends executions' stdin and reads ?wait=1 output raw (EXECUTION_TYPE,
    RESULT_TYPE) rather than base64 in JSON."""

    def __init__(self, token: str | None, timeout: float = DEFAULT_TIMEOUT,
                 binary: bool = True) -> None:
        self.token, self.timeout, self.binary = token, timeout, binary

    def call(self, method: str, path: str, json_body: Any = None, *,
             query: dict[str, Any] | None = None, timeout: float | None = None,
             read: Callable[[Any], T] = _same) -> Request[T]:
        """A request with a JSON body (or none) and a JSON answer."""
        headers = bearer_header(self.token)
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        return Request(method, path + (f"?{urlencode(query)}" if query else ""), headers,
                       timeout or self.timeout, body, read=read)

    def wait_timeout(self, timeout: float | None, wait_timeout: float | None) -> float:
        """How long a `?wait=1` answer may take: as asked, else the execution's own timeout (a
        day without one) plus the client's timeout."""
        return wait_timeout or (timeout or NO_LIMIT) + self.timeout

    def health(self, challenge: str | None = None) -> Request[dict[str, Any]]:
        return self.call("GET", "/v1/health", query={"challenge": challenge} if challenge else None)

    def executions(self, run: str | None = None) -> Request[list[dict[str, Any]]]:
        return self.call("GET", "/v1/executions", query={"run": run} if run else None,
                         read=lambda data: data["executions"])

    def execution(self, execution_id: str) -> Request[dict[str, Any]]:
        return self.call("GET", f"/v1/executions/{quote(execution_id, safe='')}")

    def output(self, execution_id: str, since: int = 0,
               limit: int | None = None) -> Request[dict[str, Any]]:
        return self.call("GET", f"/v1/executions/{quote(execution_id, safe='')}/output",
                         query={"since": since, **({"limit": limit} if limit else {})})

    def start(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
              env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
              no_log: bool = False, tags: dict[str, str] | None = None,
              runner: bool = True) -> Request[str]:
        if not self.binary:
            return self.call("POST", "/v1/executions",
                             execution_body(command, stdin, cwd, env, label, timeout, no_log,
                                            tags, runner),
                             read=lambda data: data["id"])
        return self._framed(execution_body(command, b"", cwd, env, label, timeout, no_log, tags,
                                           runner), stdin, self.timeout,
                            read=lambda data: data["id"],
                            fallback=functools.partial(
                                AgentRequests(self.token, self.timeout, binary=False).start,
                                command, stdin, cwd, env, label, timeout, no_log, tags, runner))

    def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
            env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
            wait_timeout: float | None = None, no_log: bool = False,
            tags: dict[str, str] | None = None,
            runner: bool = True) -> Request[ExecutionResult]:
        if not self.binary:
            return self.call("POST", "/v1/executions",
                             execution_body(command, stdin, cwd, env, label, timeout, no_log,
                                            tags, runner),
                             query={"wait": 1}, timeout=self.wait_timeout(timeout, wait_timeout),
                             read=ExecutionResult.from_json)
        return self._framed(execution_body(command, b"", cwd, env, label, timeout, no_log, tags,
                                           runner), stdin, self.wait_timeout(timeout, wait_timeout),
                            read=ExecutionResult.from_json, read_frame=ExecutionResult.from_frame,
                            fallback=functools.partial(
                                AgentRequests(self.token, self.timeout, binary=False).run,
                                command, stdin, cwd, env, label, timeout, wait_timeout, no_log,
                                tags, runner))

    def _framed(self, head: dict[str, Any], stdin: bytes, timeout: float,
                read: Callable[[Any], T], fallback: Callable[[], Request[T]],
                read_frame: Callable[[bytes], T] | None = None) -> Request[T]:
        """A binary POST /v1/executions: `head` (the JSON body without stdin), then stdin raw;
        with `read_frame`, a ?wait=1 call that asks for the binary answer (an agent that does
        not know it answers JSON, which `read` reads)."""
        headers = {**bearer_header(self.token), "Content-Type": EXECUTION_TYPE}
        path = "/v1/executions"
        if read_frame is not None:
            headers["Accept"] = f"{RESULT_TYPE}, application/json"
            path += "?wait=1"
        return Request("POST", path, headers, timeout, frame_head(head) + stdin, read=read,
                       read_frame=read_frame, fallback=fallback)

    def stop(self, execution_id: str) -> Request[dict[str, Any]]:
        return self.call("DELETE", f"/v1/executions/{quote(execution_id, safe='')}")

    def status(self) -> Request[dict[str, Any]]:
        return self.call("GET", "/v1/status")

    def push_revocations(self, table: dict[str, float],
                         tokens: dict[str, float] | None = None) -> Request[dict[str, Any]]:
        return self.call("PUT", "/v1/revocations", {"revocations": table, "tokens": tokens or {}})

    def push_crl(self, pem: bytes) -> Request[dict[str, Any]]:
        return Request("PUT", "/v1/crl", {**bearer_header(self.token),
                                          "Content-Type": "application/pkix-crl"},
                       self.timeout, pem)

    def put_file(self, path: str, mode: int | None = None, overwrite: bool = True,
                 size: int | None = None, mkdir: bool = False) -> Request[dict[str, Any]]:
        """The head of an upload; the transport streams the body (chunked without `size`).
        `Expect: 100-continue` lets the agent refuse (403, 404, 409) before any byte moves.
        `mkdir`: the agent makes the file's directory first, as Ansible makes its remote tmp
        (it must not exist yet)."""
        query: dict[str, Any] = {"path": path, "overwrite": "true" if overwrite else "false"}
        if mkdir:
            query["mkdir"] = "true"
        if mode is not None:
            query["mode"] = format_mode(mode)
        headers = {**bearer_header(self.token), "Content-Type": "application/octet-stream",
                   "Expect": "100-continue"}
        if size is not None:
            headers["Content-Length"] = str(size)
        return Request("PUT", f"/v1/files?{urlencode(query)}", headers, self.timeout,
                       streamed=True)

    def get_file(self, path: str) -> Request[None]:
        """A download; its answer goes through a `Download`."""
        return Request("GET", f"/v1/files?{urlencode({'path': path})}",
                       bearer_header(self.token), self.timeout, streamed=True)
