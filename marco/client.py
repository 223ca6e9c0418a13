"""Clients of the agent API: `AgentClient` (sync, kept-alive; for Ansible workers and the CLI)
and `AsyncAgentClient` (Tornado; for the controller), plus `AgentStream` for /v1/stream.

Both are thin transports under one request layer (`marco.agent_api`: what each call sends, how
its answer reads), so they have the same methods, defaults and timeouts. Both raise the typed
errors of `marco.errors`: an agent that cannot be reached raises `AgentUnreachable`, an error
answer raises the class the agent named (401 -> `AuthenticationError`/`TokenExpired`, 403 ->
`PermissionDenied`, 404, 409, ...).
"""

from __future__ import annotations

import http.client
import inspect
import json
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from tornado import httpclient, websocket
from tornado.httputil import HTTPHeaders, parse_response_start_line

from . import protocol
from .agent_api import (
    DEFAULT_TIMEOUT,
    NO_LIMIT,
    AgentRequests,
    Download,
    ExecutionResult,
    Request,
    base_url,
    describe,
    execution_body,
    parse_answer,
    raise_for_status,
)
from .errors import (
    AgentUnreachable,
    AuthenticationError,
    BadRequest,
    MarcoError,
    PermissionDenied,
    ProtocolError,
    TooManySockets,
)
from .tls import ClientTls, describe_tls_error

__all__ = ["DEFAULT_TIMEOUT", "AgentClient", "AgentStream", "AsyncAgentClient",
           "ExecutionResult", "base_url", "execution_body"]

T = TypeVar("T")
UPLOAD_CHUNK = 1024 * 1024
CONTINUE_WAIT = 2.0  # seconds to wait for `100 Continue` before sending a body anyway


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


def agent_socket_target(host: str, port: int, path: str, tls: ClientTls | None,
                        node: str | None = None) -> tuple[str, ssl.SSLContext | None, str]:
    """Where a WebSocket to an agent goes: its ws(s) URL for `path`, the TLS context that
    presents our certificate and accepts only one naming `node` (default: `host`), and how
    errors name the agent (shared by AgentStream's and TerminalClient's callers)."""
    node = node or host
    context = tls.context_for(node) if tls is not None else None
    url = base_url(host, port, tls is not None).replace("http", "ws", 1) + path
    return url, context, describe(host, port, node)


def transport_error(exc: BaseException, what: str,
                    tls: ClientTls | None = None) -> AgentUnreachable:
    """A failed connection (HTTP or WebSocket) as a typed error (see _transport_error)."""
    return _transport_error(exc, what, tls)


class AgentClient:
    """Synchronous client on one kept-alive HTTP(S) connection (not thread-safe).

    With `tls`, the connection is mutual TLS and the agent's certificate must name `node`
    (the node name from the inventory; default: `host`). `binary=False` sends executions in
    the JSON form (base64 stdin and output) rather than the binary one; an agent that refuses
    the binary form gets JSON from then on."""

    def __init__(self, host: str, port: int = protocol.DEFAULT_PORT, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
                 node: str | None = None, binary: bool = True) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.tls, self.node, self.binary = tls, node or host, binary
        self.what = describe(host, port, self.node)
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- API (what each call sends and reads is in marco.agent_api) ---------------------------

    def health(self, challenge: str | None = None) -> dict[str, Any]:
        """Node facts; with `challenge`, the agent's proof that it holds the cluster secret."""
        return self._call(self._api.health(challenge))

    def executions(self, run: str | None = None) -> list[dict[str, Any]]:
        """The caller's executions; with `run`, only those tagged with that run."""
        return self._call(self._api.executions(run))

    def execution(self, execution_id: str) -> dict[str, Any]:
        return self._call(self._api.execution(execution_id))

    def output(self, execution_id: str, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        return self._call(self._api.output(execution_id, since, limit))

    def start(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
              env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
              no_log: bool = False, tags: dict[str, str] | None = None,
              runner: bool = True) -> str:
        """Start a command and return its execution id at once."""
        return self._call(self._api.start(command, stdin, cwd, env, label, timeout, no_log,
                                          tags, runner))

    def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
            env: dict[str, str] | None = None, label: str = "", timeout: float | None = None,
            wait_timeout: float | None = None, no_log: bool = False,
            tags: dict[str, str] | None = None, runner: bool = True) -> ExecutionResult:
        """Run a command to completion in one round trip and return rc, stdout, stderr."""
        return self._call(self._api.run(command, stdin, cwd, env, label, timeout, wait_timeout,
                                        no_log, tags, runner))

    def stop(self, execution_id: str) -> dict[str, Any]:
        return self._call(self._api.stop(execution_id))

    def status(self) -> dict[str, Any]:
        return self._call(self._api.status())

    def push_revocations(self, table: dict[str, float],
                         tokens: dict[str, float] | None = None) -> dict[str, Any]:
        """Controller only (this client's token must be a service token): per-user not-before
        times and logged-out tokens (SHA-256 digest -> expiry) the agent then enforces."""
        return self._call(self._api.push_revocations(table, tokens))

    def push_crl(self, pem: bytes) -> dict[str, Any]:
        """Controller only (service token): the cluster CA's current revocation list."""
        return self._call(self._api.push_crl(pem))

    def put_file(self, source: BinaryIO | Callable[[], bytes], path: str, mode: int | None = None,
                 overwrite: bool = True, size: int | None = None,
                 mkdir: bool = False) -> dict[str, Any]:
        """Stream `source` (a binary file, or a callable returning the next chunk and b"" at
        the end) to `path` on the node, never whole in memory; chunked without `size`.
        `mkdir`: make the file's directory first (AgentRequests.put_file)."""
        request = self._api.put_file(path, mode, overwrite, size, mkdir)
        response = self._upload(request, source)
        return parse_answer(request, response.status, self._read(response))

    def get_file(self, path: str, destination: BinaryIO) -> int:
        """Stream the node's file at `path` into `destination`; return the byte count."""
        response = self._send(self._api.get_file(path))
        download = Download(destination)
        download.start(response.status, response.headers.get("Content-Length"))
        try:
            while chunk := response.read(UPLOAD_CHUNK):
                download.feed(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return download.finish(self.what)

    # -- transport ----------------------------------------------------------------------------

    @property
    def _api(self) -> AgentRequests:
        return AgentRequests(self.token, self.timeout, self.binary)

    def _call(self, request: Request[T]) -> T:
        response = self._send(request)
        body = self._read(response)
        try:
            return parse_answer(request, response.status, body,
                                response.getheader("Content-Type"))
        except BadRequest:
            if request.fallback is None:
                raise
        answer = self._call(request.fallback())
        self.binary = False  # it took the JSON form after refusing the binary one: an old agent
        return answer

    def _request(self, method: str, path: str, json_body: Any = None) -> Any:
        """Any JSON call (tests send malformed ones with it)."""
        return self._call(self._api.call(method, path, json_body))

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
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
        if conn.sock is None:  # connect (and handshake) within the client's timeout
            conn.timeout = self.timeout
            conn.connect()
        conn.timeout = timeout
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        return conn

    def _unreachable(self, exc: BaseException) -> AgentUnreachable:
        self.close()
        return _transport_error(exc, self.what, self.tls)

    def _send(self, request: Request[Any]) -> http.client.HTTPResponse:
        """Send one request and return the response (its body still to be read)."""
        try:
            conn = self._connection(request.timeout)
            conn.request(request.method, request.path, body=request.body,
                         headers=request.headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _upload(self, request: Request[Any],
                source: BinaryIO | Callable[[], bytes]) -> http.client.HTTPResponse:
        """Send an upload's head, wait for `100 Continue` (an agent that refuses answers before
        any byte of the body moves), then stream the body."""
        read = source if callable(source) else (lambda: source.read(UPLOAD_CHUNK))
        chunked = "Content-Length" not in request.headers
        try:
            conn = self._connection(request.timeout)
            conn.putrequest(request.method, request.path)
            for key, value in request.headers.items():
                conn.putheader(key, value)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            early = self._early_answer(conn)
            if early is not None:  # refused before the body: the connection is not reusable
                self.close()
                raise_for_status(*early)
                raise ProtocolError(f"agent answered {early[0]} before the upload")
            while chunk := read():
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
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
        except TimeoutError:
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


class AsyncAgentClient:
    """Asynchronous client (Tornado's HTTP client) for the controller and async tools; the
    same methods as `AgentClient`, awaited; `tls`, `node` and `binary` as there."""

    def __init__(self, host: str, port: int = protocol.DEFAULT_PORT, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
                 node: str | None = None, binary: bool = True) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.node, self.tls, self.binary = node or host, tls, binary
        self.ssl_context = tls.context_for(self.node) if tls is not None else None
        self.base = base_url(host, port, tls is not None)
        self.what = describe(host, port, self.node)
        self._http = httpclient.AsyncHTTPClient()

    # -- API (what each call sends and reads is in marco.agent_api) ---------------------------

    async def health(self, challenge: str | None = None) -> dict[str, Any]:
        """Node facts; with `challenge`, the agent's proof that it holds the cluster secret."""
        return await self._call(self._api.health(challenge))

    async def executions(self, run: str | None = None) -> list[dict[str, Any]]:
        """The caller's executions; with `run`, only those tagged with that run."""
        return await self._call(self._api.executions(run))

    async def execution(self, execution_id: str) -> dict[str, Any]:
        return await self._call(self._api.execution(execution_id))

    async def output(self, execution_id: str, since: int = 0,
                     limit: int | None = None) -> dict[str, Any]:
        return await self._call(self._api.output(execution_id, since, limit))

    async def start(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                    env: dict[str, str] | None = None, label: str = "",
                    timeout: float | None = None, no_log: bool = False,
                    tags: dict[str, str] | None = None, runner: bool = True) -> str:
        """Start a command and return its execution id at once."""
        return await self._call(self._api.start(command, stdin, cwd, env, label, timeout, no_log,
                                                tags, runner))

    async def run(self, command: list[str] | str, stdin: bytes = b"", cwd: str | None = None,
                  env: dict[str, str] | None = None, label: str = "",
                  timeout: float | None = None, wait_timeout: float | None = None,
                  no_log: bool = False, tags: dict[str, str] | None = None,
                  runner: bool = True) -> ExecutionResult:
        """Run a command to completion in one round trip and return rc, stdout, stderr."""
        return await self._call(self._api.run(command, stdin, cwd, env, label, timeout,
                                              wait_timeout, no_log, tags, runner))

    async def stop(self, execution_id: str) -> dict[str, Any]:
        return await self._call(self._api.stop(execution_id))

    async def status(self) -> dict[str, Any]:
        return await self._call(self._api.status())

    async def push_revocations(self, table: dict[str, float],
                               tokens: dict[str, float] | None = None) -> dict[str, Any]:
        """Controller only (this client's token must be a service token): per-user not-before
        times and logged-out tokens (SHA-256 digest -> expiry) the agent then enforces."""
        return await self._call(self._api.push_revocations(table, tokens))

    async def push_crl(self, pem: bytes) -> dict[str, Any]:
        """Controller only (service token): the cluster CA's current revocation list."""
        return await self._call(self._api.push_crl(pem))

    async def put_file(self, source: BinaryIO | Callable[[], Any], path: str,
                       mode: int | None = None, overwrite: bool = True,
                       size: int | None = None, mkdir: bool = False) -> dict[str, Any]:
        """Stream `source` (a binary file, or a sync or async callable returning the next chunk
        and b"" at the end) to `path` on the node; chunked without `size`. `mkdir`: make the
        file's directory first (AgentRequests.put_file)."""
        request = self._api.put_file(path, mode, overwrite, size, mkdir)
        read = source if callable(source) else (lambda: source.read(UPLOAD_CHUNK))

        async def producer(write: Callable[[bytes], Any]) -> None:
            while True:
                chunk = read()
                if inspect.isawaitable(chunk):
                    chunk = await chunk
                if not chunk:
                    return
                await write(chunk)

        response = await self._fetch(request, body_producer=producer, expect_100_continue=True)
        return parse_answer(request, response.code, response.body or b"")

    async def get_file(self, path: str, destination: BinaryIO) -> int:
        """Stream the node's file at `path` into `destination`; return the byte count."""
        download = Download(destination)
        head: list[str] = []

        def header_line(line: str) -> None:
            if line.startswith("HTTP/"):
                head.clear()
            head.append(line)
            if not line.strip():  # the end of the head: the status says where the body goes
                download.start(parse_response_start_line(head[0].strip()).code,
                               HTTPHeaders.parse("".join(head[1:])).get("Content-Length"))

        response = await self._fetch(self._api.get_file(path), header_callback=header_line,
                                     streaming_callback=download.feed)
        if not download.status:  # no head seen (never with Tornado's HTTP/1 client)
            download.start(response.code, response.headers.get("Content-Length"))
        return download.finish(self.what)

    def stream(self) -> AgentStream:
        """A /v1/stream connection; `await stream.connect()` authenticates it."""
        return AgentStream(self.base.replace("http", "ws", 1) + "/v1/stream", self.token,
                           self.ssl_context, self.what, self.tls)

    # -- transport ----------------------------------------------------------------------------

    @property
    def _api(self) -> AgentRequests:
        return AgentRequests(self.token, self.timeout, self.binary)

    async def _call(self, request: Request[T]) -> T:
        response = await self._fetch(request)
        try:
            return parse_answer(request, response.code, response.body or b"",
                                response.headers.get("Content-Type"))
        except BadRequest:
            if request.fallback is None:
                raise
        answer = await self._call(request.fallback())
        self.binary = False  # it took the JSON form after refusing the binary one: an old agent
        return answer

    async def _fetch(self, request: Request[Any], **kwargs: Any) -> httpclient.HTTPResponse:
        """Send one request; every transport failure becomes its typed error here."""
        try:
            response = await self._http.fetch(
                self.base + request.path, method=request.method, body=request.body,
                headers=request.headers, connect_timeout=self.timeout,
                request_timeout=NO_LIMIT if request.streamed else request.timeout,
                raise_error=False, allow_nonstandard_methods=True,
                ssl_options=self.ssl_context, **kwargs)
        except MarcoError:
            raise  # a body producer gave up and says why
        except (OSError, httpclient.HTTPClientError) as exc:
            raise _transport_error(exc, self.what, self.tls) from None
        if response.code == 599:  # a failure answered rather than raised
            raise _transport_error(response.error or OSError("no answer"), self.what, self.tls)
        return response


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
