"""Clients of the agent API: `AgentClient` (sync, kept-alive; for Ansible workers and the CLI)
and `AsyncAgentClient` (Tornado; for the controller), plus `AgentStream` for /v1/stream.

Both raise the typed errors of `marco.errors`: an agent that cannot be reached raises
`AgentUnreachable`, an error answer raises the class the agent named (401 ->
`AuthenticationError`/`TokenExpired`, 403 -> `PermissionDenied`, 404, 409, ...).
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import shutil
import socket
import ssl
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable
from urllib.parse import urlencode

from tornado import httpclient, websocket
from tornado.httputil import url_concat

from . import protocol
from .errors import (AgentUnreachable, AuthenticationError, MarcoError, PermissionDenied,
                     ProtocolError, TooManySockets, error_from_response)
from .tls import ClientTls, describe_tls_error

UPLOAD_CHUNK = 1024 * 1024
CONTINUE_WAIT = 2.0  # seconds to wait for `100 Continue` before sending a body anyway
DEFAULT_TIMEOUT = 30.0


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExecutionResult":
        return cls(id=data["id"], rc=data["rc"], stdout=base64.b64decode(data["stdout"]),
                   stderr=base64.b64decode(data["stderr"]), duration=data["duration"],
                   signal=data.get("signal"), timed_out=data.get("timed_out", False),
                   stopped=data.get("stopped", False),
                   stdout_truncated=data.get("stdout_truncated", False),
                   stderr_truncated=data.get("stderr_truncated", False))


def execution_body(command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                   env: dict[str, str] | None = None, label: str = "",
                   timeout: float | None = None, no_log: bool = False) -> dict[str, Any]:
    """The JSON body of POST /v1/executions for an argv list or a shell string; `no_log`
    asks the agent to keep and stream nothing of it (only a `wait` caller gets the output)."""
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
    return body


def _raise_for(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        data = json.loads(body)
        code, message = data.get("error"), data.get("message", "")
    except (ValueError, AttributeError):
        code, message = None, body[:200].decode("utf-8", "replace")
    raise error_from_response(status, code, message)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ProtocolError("agent answered something that is not JSON") from None


def base_url(host: str, port: int, tls: bool) -> str:
    """http(s)://host:port, IPv6 addresses in brackets."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{'https' if tls else 'http'}://{netloc}"


def _transport_error(exc: BaseException, what: str,
                     tls: ClientTls | None = None) -> AgentUnreachable:
    """A failed connection as a typed error: TLS refusals say why (our own expired certificate
    first), the rest is unreachable."""
    refused = describe_tls_error(exc, what)
    if refused is not None:
        return (tls.expired() if tls is not None else None) or refused
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return AgentUnreachable(f"{what} timed out")
    detail = getattr(exc, "strerror", None) or exc
    return AgentUnreachable(f"cannot reach {what}: {detail}")


class AgentClient:
    """Synchronous client on one kept-alive HTTP(S) connection (not thread-safe).

    With `tls`, the connection is mutual TLS and the agent's certificate must name `node`
    (the node name from the inventory; default: `host`)."""

    def __init__(self, host: str, port: int = protocol.DEFAULT_PORT, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
                 node: str | None = None) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.tls, self.node = tls, node or host
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- transport ----------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        """The kept-alive connection, replaced first if the agent closed it while idle.

        Checking before sending (an idle socket that is readable has been closed by the peer)
        means a request is never sent into a dead connection, so nothing needs resending after
        a failure: a POST is sent at most once.
        """
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                readable = select.select([conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = [conn.sock]
            if readable:
                self.close()
                conn = None
        if conn is None:
            if self.tls is not None:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, blocksize=UPLOAD_CHUNK,
                    context=self.tls.context_for(self.node))
            else:
                conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout, blocksize=UPLOAD_CHUNK)
            self._conn = conn
        if conn.sock is None:  # connect (and handshake) within the short timeout
            conn.timeout = self.timeout
            conn.connect()
        conn.timeout = timeout or self.timeout
        assert conn.sock is not None
        conn.sock.settimeout(conn.timeout)
        return conn

    def _unreachable(self, exc: BaseException) -> AgentUnreachable:
        self.close()
        return _transport_error(exc, f"agent {self.node} ({self.host}:{self.port})"
                                if self.node != self.host else f"agent {self.host}:{self.port}",
                                self.tls)

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None,
              timeout: float | None = None) -> http.client.HTTPResponse:
        """Send one request and return the response (its body still to be read)."""
        try:
            conn = self._connection(timeout)
            conn.request(method, path, body=body, headers=self._headers(headers))
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _upload(self, path: str, source: BinaryIO, size: int | None) -> http.client.HTTPResponse:
        """PUT a stream with `Expect: 100-continue`: an agent that refuses the upload (403,
        404, 409) answers before any byte of the body moves."""
        try:
            conn = self._connection(None)
            conn.putrequest("PUT", path)
            for key, value in self._headers({"Content-Type": "application/octet-stream",
                                             "Expect": "100-continue"}).items():
                conn.putheader(key, value)
            conn.putheader(*(("Content-Length", str(size)) if size is not None
                             else ("Transfer-Encoding", "chunked")))
            conn.endheaders()
            early = self._early_answer(conn)
            if early is not None:  # refused before the body: the connection is not reusable
                self.close()
                _raise_for(*early)
                raise ProtocolError(f"agent answered {early[0]} before the upload")
            while chunk := source.read(UPLOAD_CHUNK):
                conn.send(chunk if size is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if size is None:
                conn.send(b"0\r\n\r\n")
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    @staticmethod
    def _early_answer(conn: http.client.HTTPConnection) -> tuple[int, bytes] | None:
        """Wait up to CONTINUE_WAIT for `100 Continue` (None: send the body) or a final answer
        (its status and body). Read byte by byte so nothing past the interim answer is
        consumed; works the same over TLS (no MSG_PEEK there)."""
        sock = conn.sock
        assert sock is not None
        previous = sock.gettimeout()
        sock.settimeout(CONTINUE_WAIT)
        head = b""
        try:
            while not head.endswith(b"\r\n\r\n"):
                byte = sock.recv(1)
                if not byte:
                    raise ConnectionResetError("agent closed the connection")
                head += byte
                if len(head) > 65536:
                    raise ProtocolError("agent sent an oversized answer head")
        except (socket.timeout, TimeoutError):
            if head:
                raise
            return None  # no interim answer in time: send the body anyway
        finally:
            sock.settimeout(previous)
        status_line, _, header_text = head.partition(b"\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"agent answered {status_line[:80]!r}") from None
        if status == 100:
            return None
        length = 0
        for line in header_text.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip() or 0)
                except ValueError:
                    raise ProtocolError("agent sent a bad Content-Length") from None
        body = b""
        while len(body) < min(length, 1024 * 1024):
            chunk = sock.recv(length - len(body))
            if not chunk:
                break
            body += chunk
        return status, body

    def _request(self, method: str, path: str, json_body: Any = None,
                 timeout: float | None = None) -> Any:
        body = None if json_body is None else json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return self._answer(self._send(method, path, body, headers, timeout))

    def _answer(self, response: http.client.HTTPResponse) -> Any:
        """Read a JSON answer; an error status raises its typed error."""
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        _raise_for(response.status, data)
        return _json(data)

    # -- API ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health")

    def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
            env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
            wait_timeout: float | None = None, no_log: bool = False) -> ExecutionResult:
        """Run a command to completion in one round trip and return rc, stdout, stderr."""
        body = execution_body(command, stdin, cwd, env, label, timeout, no_log)
        data = self._request("POST", "/v1/executions?wait=1", body,
                             timeout=wait_timeout or (timeout + self.timeout if timeout else 24 * 3600))
        return ExecutionResult.from_json(data)

    def start(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
              env: dict[str, str] | None = None, label: str = "",
              timeout: float | None = None) -> str:
        """Start a command and return its execution id at once."""
        body = execution_body(command, stdin, cwd, env, label, timeout)
        return self._request("POST", "/v1/executions", body)["id"]

    def executions(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/executions")["executions"]

    def execution(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/executions/{execution_id}")

    def output(self, execution_id: str, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        query = {"since": since, **({"limit": limit} if limit else {})}
        return self._request("GET", f"/v1/executions/{execution_id}/output?{urlencode(query)}")

    def stop(self, execution_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/executions/{execution_id}")

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status")

    def put_file(self, source: BinaryIO, path: str, mode: int | None = None,
                 overwrite: bool = True, size: int | None = None) -> dict[str, Any]:
        """Stream `source` to `path` on the node (never read whole into memory)."""
        query: dict[str, Any] = {"path": path, "overwrite": "true" if overwrite else "false"}
        if mode is not None:
            query["mode"] = f"{mode:04o}"
        return self._answer(self._upload(f"/v1/files?{urlencode(query)}", source, size))

    def get_file(self, path: str, destination: BinaryIO) -> int:
        """Stream the node's file at `path` into `destination`; return the byte count."""
        response = self._send("GET", f"/v1/files?{urlencode({'path': path})}")
        if response.status >= 400:
            _raise_for(response.status, response.read())
        expected = int(response.headers.get("Content-Length", "-1"))
        try:
            shutil.copyfileobj(response, destination, UPLOAD_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        written = destination.tell() if destination.seekable() else expected
        if expected >= 0 and destination.seekable() and written < expected:
            raise AgentUnreachable(f"download from {self.host} ended early")
        return expected


class AsyncAgentClient:
    """Asynchronous client (Tornado's HTTP client) for the controller and async tools; `tls`
    and `node` as for `AgentClient`."""

    def __init__(self, host: str, port: int = protocol.DEFAULT_PORT, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
                 node: str | None = None) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.node, self.tls = node or host, tls
        self.ssl_context = tls.context_for(self.node) if tls is not None else None
        self.base = base_url(host, port, tls is not None)
        self.what = (f"agent {self.node} ({host}:{port})" if self.node != host
                     else f"agent {host}:{port}")
        self._http = httpclient.AsyncHTTPClient()

    async def _fetch(self, method: str, path: str, body: bytes | None = None,
                     request_timeout: float | None = None, **kwargs: Any) -> httpclient.HTTPResponse:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kwargs.pop("headers", {}))
        try:
            response = await self._http.fetch(
                self.base + path, method=method, body=body, headers=headers,
                connect_timeout=self.timeout, request_timeout=request_timeout or self.timeout,
                raise_error=False, allow_nonstandard_methods=True,
                ssl_options=self.ssl_context, **kwargs)
        except (OSError, httpclient.HTTPClientError) as exc:
            raise _transport_error(exc, self.what, self.tls) from None
        if response.code == 599 and isinstance(response.error, ssl.SSLError):
            raise _transport_error(response.error, self.what, self.tls)
        return response

    async def _request(self, method: str, path: str, json_body: Any = None,
                       request_timeout: float | None = None) -> Any:
        body = None if json_body is None else json.dumps(json_body).encode()
        response = await self._fetch(method, path, body, request_timeout)
        if response.code == 599:
            raise _transport_error(response.error or OSError("no answer"), self.what, self.tls)
        _raise_for(response.code, response.body or b"")
        return _json(response.body)

    async def health(self, challenge: str | None = None) -> dict[str, Any]:
        """Node facts; with `challenge`, the agent's proof that it holds the cluster secret."""
        path = "/v1/health" + (f"?{urlencode({'challenge': challenge})}" if challenge else "")
        return await self._request("GET", path)

    async def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                  env: dict[str, str] | None = None, label: str = "",
                  timeout: float | None = None, no_log: bool = False) -> ExecutionResult:
        body = execution_body(command, stdin, cwd, env, label, timeout, no_log)
        data = await self._request("POST", "/v1/executions?wait=1", body,
                                   request_timeout=(timeout or 24 * 3600) + self.timeout)
        return ExecutionResult.from_json(data)

    async def start(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                    env: dict[str, str] | None = None, label: str = "",
                    timeout: float | None = None) -> str:
        body = execution_body(command, stdin, cwd, env, label, timeout)
        return (await self._request("POST", "/v1/executions", body))["id"]

    async def executions(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/executions"))["executions"]

    async def execution(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/executions/{execution_id}")

    async def output(self, execution_id: str, since: int = 0) -> dict[str, Any]:
        return await self._request("GET", f"/v1/executions/{execution_id}/output?since={since}")

    async def stop(self, execution_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/v1/executions/{execution_id}")

    async def status(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/status")

    async def push_revocations(self, table: dict[str, float],
                               tokens: dict[str, float] | None = None) -> dict[str, Any]:
        """Controller only (this client's token must be a service token): per-user not-before
        times and logged-out tokens (SHA-256 digest -> expiry) the agent then enforces."""
        return await self._request("PUT", "/v1/revocations",
                                   {"revocations": table, "tokens": tokens or {}})

    async def push_crl(self, pem: bytes) -> dict[str, Any]:
        """Controller only (service token): the cluster CA's current revocation list."""
        response = await self._fetch("PUT", "/v1/crl", pem,
                                     headers={"Content-Type": "application/pkix-crl"})
        if response.code == 599:
            raise _transport_error(response.error or OSError("no answer"), self.what, self.tls)
        _raise_for(response.code, response.body or b"")
        return _json(response.body)

    async def put_file(self, read_chunk: Callable[[], Any], path: str, mode: int | None = None,
                       overwrite: bool = True) -> dict[str, Any]:
        """Upload from `read_chunk` (sync or async callable returning b"" at the end)."""
        query: dict[str, Any] = {"path": path, "overwrite": "true" if overwrite else "false"}
        if mode is not None:
            query["mode"] = f"{mode:04o}"

        async def producer(write: Callable[[bytes], Any]) -> None:
            while True:
                chunk = read_chunk()
                if hasattr(chunk, "__await__"):
                    chunk = await chunk
                if not chunk:
                    return
                await write(chunk)

        # Expect: 100-continue lets the agent refuse (403, 404, 409) before any byte moves.
        response = await self._fetch("PUT", url_concat("/v1/files", query),
                                     body_producer=producer, request_timeout=24 * 3600,
                                     expect_100_continue=True,
                                     headers={"Content-Type": "application/octet-stream"})
        if response.code == 599:
            if isinstance(response.error, MarcoError):  # the body producer gave up: say why
                raise response.error
            raise _transport_error(response.error or OSError("no answer"), self.what, self.tls)
        _raise_for(response.code, response.body or b"")
        return _json(response.body)

    def stream(self) -> "AgentStream":
        """A /v1/stream connection; `await stream.connect()` authenticates it."""
        return AgentStream(self.base.replace("http", "ws", 1) + "/v1/stream", self.token,
                           self.ssl_context, self.what, self.tls)


class AgentStream:
    """The per-user WebSocket: events of the user's executions, status, replay, stop."""

    def __init__(self, url: str, token: str | None, ssl_context: ssl.SSLContext | None = None,
                 what: str | None = None, tls: ClientTls | None = None) -> None:
        self.url, self.token, self.ssl_context, self.tls = url, token, ssl_context, tls
        self.what = what or url
        self._ws: websocket.WebSocketClientConnection | None = None
        self.hello: dict[str, Any] | None = None

    async def connect(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Open, authenticate and return the agent's `hello` message."""
        try:
            self._ws = await websocket.websocket_connect(
                httpclient.HTTPRequest(self.url, connect_timeout=timeout, request_timeout=timeout,
                                       ssl_options=self.ssl_context),
                max_message_size=256 * 1024 * 1024)
        except (OSError, httpclient.HTTPClientError) as exc:
            raise _transport_error(exc, self.what, self.tls) from None
        await self.send({"type": "auth", "token": self.token or ""})
        hello = await self.read()
        if hello is None or hello.get("type") != "hello":
            raise ProtocolError(f"expected hello, got {hello!r}")
        self.hello = hello
        return hello

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.write_message(protocol.encode(message))

    async def read(self) -> dict[str, Any] | None:
        """The next event, or None when the agent closed the socket normally."""
        text = await self.read_text()
        return None if text is None else json.loads(text)

    async def read_text(self) -> str | None:
        """The next event as the agent sent it (JSON text, for relays), or None at a normal
        close; an error close raises as for `read`."""
        assert self._ws is not None
        message = await self._ws.read_message()
        if message is None:
            code, reason = self._ws.close_code, self._ws.close_reason or ""
            if code == protocol.CLOSE_UNAUTHORIZED:
                raise AuthenticationError(reason or "token refused")
            if code == protocol.CLOSE_FORBIDDEN:
                raise PermissionDenied(reason or "forbidden")
            if code == protocol.CLOSE_TOO_MANY_SOCKETS:
                raise TooManySockets(reason or "too many sockets")
            if code not in (None, 1000, 1001, 1005):
                raise MarcoError(f"stream closed by agent ({code}): {reason}")
            return None
        return message if isinstance(message, str) else message.decode("utf-8", "replace")

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code if self._ws else None

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
