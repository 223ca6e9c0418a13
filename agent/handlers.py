"""HTTP handlers of the agent API (/v1): executions, output replay, files, status, health.

Handlers are thin: they authenticate, parse, call a service and translate typed errors into
JSON error answers at this boundary.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import tornado.web
from tornado.http1connection import HTTP1Connection

from marco import protocol
from marco.agent_api import EXECUTION_TYPE, HEAD_LENGTH, RESULT_TYPE, frame_head, media_type
from marco.chunks import Coalescer
from marco.errors import (
    AuthenticationError,
    BadRequest,
    Conflict,
    MarcoError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from marco.jsonapi import JsonApiMixin
from marco.tokens import bearer_token

from .context import AgentContext
from .executions import Execution, ExecutionRequest
from .files import FileReader, FileWriter, parse_mode, validate_path
from .users import UserIdentity

log = logging.getLogger(__name__)

MAX_REPLAY_LINES = 100_000
MAX_REPLAY_BYTES = 16 * 1024 * 1024
OVERFLOW_GRACE = 64 * 1024 * 1024  # bytes read and dropped past the limit, before hanging up
B64_CHUNK = 3 * 256 * 1024  # a multiple of 3, so chunks encode without padding in between
RAW_CHUNK = 1024 * 1024  # bytes of a binary ?wait=1 answer written between flushes
HEAD_SLACK = 64 * 1024  # a request head's keys, label, tags and flags past its command


class ApiHandler(JsonApiMixin, tornado.web.RequestHandler):
    """Base: bearer-token authentication and JSON errors."""

    ctx: AgentContext
    service_name = "agent"

    def initialize(self, ctx: AgentContext) -> None:
        self.ctx = ctx

    def authenticate(self) -> UserIdentity:
        token = bearer_token(self.request.headers.get("Authorization"))
        if token is None:
            raise AuthenticationError("missing 'Authorization: Bearer <token>' header")
        return self.ctx.authenticate(token, self.request.remote_ip or "?")

    def path_argument(self) -> str | None:
        """The raw `path` query argument: Tornado's getters would turn control characters
        such as NUL into spaces, silently naming another file; we refuse them instead."""
        values = self.request.query_arguments.get("path")
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path is not valid UTF-8") from None

    def int_argument(self, name: str, default: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(f"'{name}' must be an integer") from None

    def bool_argument(self, name: str, default: bool) -> bool:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes"}:
            return True
        if raw.lower() in {"0", "false", "no"}:
            return False
        raise BadRequest(f"'{name}' must be true or false")


class NotFoundHandler(ApiHandler):
    def prepare(self) -> None:
        self.write_json({"error": "not_found", "message": "no such endpoint"}, 404)


class HealthHandler(ApiHandler):
    """GET /v1/health: node name and version, no authentication."""

    def get(self) -> None:
        self.write_json(self.ctx.health(self.get_query_argument("challenge", None)))


@tornado.web.stream_request_body
class ExecutionsHandler(ApiHandler):
    """GET: the user's executions. POST: start one (201 at once, or the result with ?wait=1).

    A POST body is JSON (stdin in base64) or binary (EXECUTION_TYPE: head length, JSON head,
    raw stdin); a ?wait=1 caller that accepts RESULT_TYPE gets raw stdout and stderr after a
    JSON head, else JSON with base64. The body is read here, bounded before it is held: the
    body of a caller whose token fails, or whose declared length, then binary head length,
    is past the limits, is read and dropped and answered (401, 413) once read (a client sends
    its body before it reads the answer)."""

    waiting: Execution | None = None  # the ?wait=1 execution this caller waits for
    hung_up = False  # the caller closed its connection (possibly while its command started)
    failure: MarcoError | None = None  # found while the body arrived; answered after it
    binary = False
    user: UserIdentity | None = None  # a POST's caller, known before its body

    def prepare(self) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        if self.request.method != "POST":
            return
        try:
            self.user = self.authenticate()
        except MarcoError as error:
            self.failure = error
            return
        config = self.ctx.config
        self.binary = media_type(self.request.headers.get("Content-Type")) == EXECUTION_TYPE
        self.head_limit = 6 * config.max_command_bytes + HEAD_SLACK  # JSON escapes: 6 bytes
        stdin_room = (config.max_stdin_bytes if self.binary
                      else (config.max_stdin_bytes + 2) // 3 * 4)  # base64
        self.limit = HEAD_LENGTH.size + self.head_limit + stdin_room
        cast(HTTP1Connection, self.request.connection).set_max_body_size(
            self.limit + OVERFLOW_GRACE)
        try:
            self.declared = int(self.request.headers.get("Content-Length", "-1") or -1)
        except ValueError:
            self.declared = -1  # Tornado refuses such a request before it gets here
        if self.declared > self.limit:
            self.failure = PayloadTooLarge(f"the request body is {self.declared} bytes; this "
                                           f"node accepts at most {self.limit} (send large "
                                           "data as a file)")

    def data_received(self, chunk: bytes) -> None:
        if self.failure is not None or self.request.method != "POST":
            return  # dropped: the answer is an error whatever follows, or a GET reads no body
        before, self.received = self.received, self.received + len(chunk)
        if self.received > self.limit:  # chunked: no length given
            self.failure = PayloadTooLarge(f"the request body passed {self.limit} bytes, the "
                                           "most this node accepts (send large data as a file)")
            self.chunks = []
            return
        self.chunks.append(chunk)
        if self.binary and before < HEAD_LENGTH.size <= self.received:
            self.failure = self._check_head_length(b"".join(self.chunks)[:HEAD_LENGTH.size])
            if self.failure is not None:
                self.chunks = []

    def _check_head_length(self, prefix: bytes) -> MarcoError | None:
        """A binary body's head and stdin sizes, from its first 4 bytes and declared length."""
        (head,) = HEAD_LENGTH.unpack(prefix)
        if head > self.head_limit:
            return PayloadTooLarge(f"the request head takes {head} bytes; this node accepts at "
                                   f"most {self.head_limit}")
        stdin = self.declared - HEAD_LENGTH.size - head
        if stdin > self.ctx.config.max_stdin_bytes:
            return PayloadTooLarge(f"stdin takes {stdin} bytes; this node accepts at most "
                                   f"{self.ctx.config.max_stdin_bytes} (send large data as a "
                                   "file)")
        return None

    def get(self) -> None:
        user = self.authenticate()
        run = self.get_query_argument("run", None)  # only those tagged with this run
        self.write_json({"executions": [e.summary(short=True)
                                        for e in self.ctx.executions.of_user(user.name, run)]})

    async def post(self) -> None:
        if self.failure is not None:
            raise self.failure
        user = self.user
        assert user is not None
        body, self.chunks = b"".join(self.chunks), []
        config = self.ctx.config
        if self.binary:
            request = ExecutionRequest.from_frame(body, config.max_command_bytes,
                                                  config.max_stdin_bytes)
        else:
            try:
                data = protocol.decode(body or b"null")
            except ValueError:
                raise BadRequest("body is not valid JSON") from None
            request = ExecutionRequest.from_json(data, config.max_command_bytes,
                                                 config.max_stdin_bytes)
        del body  # stdin is the request's own copy: the body need not wait with it
        wait = self.bool_argument("wait", False)
        execution = await self.ctx.executions.start(user, request, capture=wait)
        if not wait:
            self.write_json({"id": execution.id, "pid": execution.pid}, 201)
            return
        try:
            assert execution.done is not None
            self.waiting = execution
            if self.hung_up:  # gone while the command started: nobody will take the result
                self.on_connection_close()
            await execution.done
            self.waiting = None
            if self._accepts_frames():
                await self._write_frame(execution)
            else:
                await self._write_result(execution)
        finally:
            self.waiting = None
            if execution.capture is not None:
                execution.capture.close()

    def on_connection_close(self) -> None:
        """A ?wait=1 caller that hangs up (an Ansible task `timeout:`, Ctrl-C) takes the
        result with it: stop the execution as a DELETE would, rather than let it run on. A
        hang-up while the command is still starting is remembered, and acted on once the start
        is over (the execution is listed, and can run, before then)."""
        self.hung_up = True
        if self.waiting is not None and self.waiting.running:
            self.ctx.executions.stop(self.waiting.user, self.waiting.id)

    def _accepts_frames(self) -> bool:
        accept = self.request.headers.get("Accept", "")
        return any(media_type(kind) == RESULT_TYPE for kind in accept.split(","))

    def _result_head(self, execution: Execution) -> dict[str, Any]:
        assert execution.capture is not None and self.user is not None
        capture = execution.capture
        # `user` and `home` let a client answer `echo ~` itself (docs/protocol.md).
        return {"id": execution.id, "rc": execution.rc, "signal": execution.signal,
                "user": self.user.name, "home": self.user.home,
                "duration": execution.duration, "timed_out": execution.timed_out,
                "stopped": execution.stopped, "stdout_truncated": capture.truncated[1],
                "stderr_truncated": capture.truncated[2], "via": execution.via,
                "runner_note": execution.runner_note}

    async def _write_frame(self, execution: Execution) -> None:
        """Stream the binary answer (RESULT_TYPE): head length, JSON head with the output
        sizes, raw stdout, raw stderr, read from the capture a chunk at a time."""
        assert execution.capture is not None
        capture = execution.capture
        head = frame_head({**self._result_head(execution),
                           "stdout_size": capture.sizes[1], "stderr_size": capture.sizes[2]})
        self.set_header("Content-Type", RESULT_TYPE)
        self.set_header("Content-Length", str(len(head) + capture.sizes[1] + capture.sizes[2]))
        self.write(head)
        for fd in (1, 2):
            stream, left = capture.streams[fd], capture.sizes[fd]
            stream.seek(0)
            while left > 0:
                chunk = stream.read(min(left, RAW_CHUNK))
                if not chunk:
                    raise RuntimeError("the capture is shorter than its size")
                left -= len(chunk)
                self.write(chunk)
                if left > 0:
                    await self.flush()
        self.finish()

    async def _write_result(self, execution: Execution) -> None:
        """Stream {"id","rc","signal","duration",...,"stdout","stderr"} with base64 bodies."""
        assert execution.capture is not None
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self._result_head(execution))[:-1])
        for key, fd in (("stdout", 1), ("stderr", 2)):
            stream = execution.capture.streams[fd]
            stream.seek(0)
            self.write(f',"{key}":"')
            while chunk := stream.read(B64_CHUNK):
                self.write(base64.b64encode(chunk))
                if len(chunk) == B64_CHUNK:
                    await self.flush()
            self.write('"')
        self.finish("}")


class ExecutionHandler(ApiHandler):
    """GET: one execution's state. DELETE: stop it (SIGTERM, then SIGKILL after a grace)."""

    def get(self, execution_id: str) -> None:
        user = self.authenticate()
        self.write_json(self.ctx.executions.get(user.name, execution_id).summary())

    def delete(self, execution_id: str) -> None:
        user = self.authenticate()
        self.write_json(self.ctx.executions.stop(user.name, execution_id).summary(short=True), 202)


class OutputHandler(ApiHandler):
    """GET /v1/executions/{id}/output?since=SEQ&limit=N: replay stored output events."""

    def get(self, execution_id: str) -> None:
        user = self.authenticate()
        since = self.int_argument("since", 0)
        limit = min(max(self.int_argument("limit", MAX_REPLAY_LINES), 1), MAX_REPLAY_LINES)
        execution, events = self.ctx.executions.read_output(user.name, execution_id, since, limit,
                                                            MAX_REPLAY_BYTES)
        next_seq = events[-1]["seq"] + len(events[-1]["lines"]) if events else since
        self.write_json({"execution": execution.summary(short=True), "events": events,
                         "next": next_seq,
                         "truncated_seq": execution.spool.truncated_seq})


def is_controller(peer: Any) -> bool:
    """Whether a peer certificate (as `getpeercert()` gives it) is the controller's: issued by
    the cluster CA (the handshake checked that) with OU=controller."""
    if not isinstance(peer, dict):
        return False
    fields = [pair for rdn in peer.get("subject", ()) for pair in rdn]
    return ("organizationalUnitName", "controller") in fields


class ControllerOnlyHandler(ApiHandler):
    """Endpoints only the controller may call: its service token and its certificate."""

    def _service(self) -> None:
        self.ctx.verify_service(bearer_token(self.request.headers.get("Authorization")))
        if self.ctx.crl is not None and not is_controller(self.request.get_ssl_certificate()):
            # Every node holds the secret that signs service tokens; only the controller holds
            # the controller's certificate.
            raise PermissionDenied("only the controller's certificate may change revocations")


class RevocationsHandler(ControllerOnlyHandler):
    """PUT /v1/revocations {"revocations": {user: epoch}, "tokens": {sha256: until}} from the
    controller (service token): tokens of those users issued before that time, and the single
    tokens named by digest (plain logouts), are refused from now on, sockets included.
    GET answers both tables (service token too)."""

    def get(self) -> None:
        self._service()
        self.write_json({"revocations": self.ctx.revocations.table(),
                         "tokens": self.ctx.denied.table()})

    def put(self) -> None:
        self._service()
        try:
            body = protocol.decode(self.request.body or b"null")
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("expected {\"revocations\": ..., \"tokens\": ...}")
        moved = self.ctx.revocations.update(body.get("revocations", {}))
        denied = self.ctx.denied.update(body.get("tokens", {}))
        if denied:
            self.ctx.audit.record("tokens.denied", None, count=len(denied),
                                  client=self.request.remote_ip)
            for socket in self.ctx.hub.all_sockets():
                revoke = getattr(socket, "revoke", None)
                if revoke is not None:
                    revoke()
        runners = self.ctx.executions.runners
        for user in moved:
            self.ctx.audit.record("tokens.revoked", user,
                                  not_before=self.ctx.revocations.not_before(user),
                                  client=self.request.remote_ip)
            if runners is not None:  # they quit in the background: the PUT does not wait
                runners.retire_user(user)
            for socket in self.ctx.hub.sockets(user):
                revoke = getattr(socket, "revoke", None)
                if revoke is not None:
                    revoke()
        if moved or denied:  # terminals end as the sockets close (docs/terminals.md)
            self.ctx.terminals.check_tokens(self.ctx.verify)
        self.write_json({"updated": moved, "denied": len(denied)})


class CrlHandler(ControllerOnlyHandler):
    """PUT /v1/crl (the CA's CRL, PEM) from the controller (service token): installed when the
    cluster CA signed it and it is not older than ours; TLS reloads at once."""

    def get(self) -> None:
        raise NotFound("PUT only")

    def put(self) -> None:
        self._service()
        if self.ctx.crl is None:
            raise Conflict("this agent runs without TLS (--dev): it has no CRL")
        changed = self.ctx.crl.accept(self.request.body or b"")
        if changed:
            self.ctx.audit.record("crl.updated", None, client=self.request.remote_ip)
            if self.ctx.on_tls_change is not None:
                self.ctx.on_tls_change()
        self.write_json({"updated": changed})


class StatusHandler(ApiHandler):
    """GET /v1/status: one psutil snapshot of the node, and the caller's module runners."""

    async def get(self) -> None:
        user = self.authenticate()
        snapshot = await self.ctx.status.current()
        runners = self.ctx.executions.runners
        # The caller's own module runners only: another user's are none of their business.
        mine = [r for r in runners.status() if r["user"] == user.name] if runners else []
        self.write_json({**snapshot, "runners": mine})


_Opened = TypeVar("_Opened", FileWriter, FileReader)


@tornado.web.stream_request_body
class FilesHandler(ApiHandler):
    """PUT /v1/files?path=P&mode=0644&overwrite=true[&mkdir=true] streams the body into place,
    as the user (`mkdir`: the file's directory is made first, as Ansible makes its remote tmp).

    GET /v1/files?path=P streams a file back. Both run the file helper with the user's identity.
    """

    writer: FileWriter | None = None
    reader: FileReader | None = None
    failure: MarcoError | None = None
    client_gone = False
    opening: asyncio.Future[Any] | None = None

    async def _open(self, start: Awaitable[_Opened]) -> _Opened | None:
        """The started helper, or None if the client left meanwhile: leaving cancels the
        start, which kills the helper and closes the agent's ends of its pipes."""
        self.opening = asyncio.ensure_future(start)
        try:
            return await self.opening
        except asyncio.CancelledError:
            if self.client_gone and self.opening.cancelled():
                return None
            raise

    async def prepare(self) -> None:
        if self.request.method != "PUT":
            return
        limit = self.ctx.config.max_upload_bytes
        # Past Tornado's own limit the connection is dropped; up to it, an over-limit chunked
        # body is read and dropped so the client gets a clear 413.
        cast(HTTP1Connection, self.request.connection).set_max_body_size(limit + OVERFLOW_GRACE)
        self.received = 0
        self.blocks = Coalescer()  # 1 MiB writes into the helper's pipe, whatever TLS hands us
        try:
            declared = int(self.request.headers.get("Content-Length", "0") or 0)
            if declared > limit:
                raise PayloadTooLarge(f"the upload is {declared} bytes; this node accepts at "
                                      f"most {limit}")
            user = self.authenticate()
            self.current_user = user.name
            path = validate_path(user, self.path_argument())
            mode = parse_mode(self.get_query_argument("mode", None))
            overwrite = self.bool_argument("overwrite", True)
            mkdir = self.bool_argument("mkdir", False)
            self.writer = await self._open(
                self.ctx.files.open_writer(user, path, mode, overwrite, mkdir))
            if self.writer is None:  # the client left while the helper was starting
                self.failure = MarcoError("the client left before the upload started")
        except MarcoError as error:
            # Answer now, before the body moves (clients that sent `Expect: 100-continue` never
            # send it); Tornado then closes the connection, which write_error announces.
            self.failure = error
            self.send_error(error.status, exc_info=(type(error), error, None))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if self.request.method == "PUT":  # the body was not read: this connection is done
            self.set_header("Connection", "close")
        super().write_error(status_code, **kwargs)

    async def data_received(self, chunk: bytes) -> None:
        if self.writer is not None and self.failure is None:
            self.received += len(chunk)
            try:
                if self.received > self.ctx.config.max_upload_bytes:  # chunked: no length given
                    self.writer.abort()
                    raise PayloadTooLarge(f"the upload passed {self.ctx.config.max_upload_bytes}"
                                          " bytes, the most this node accepts; nothing was written")
                block = self.blocks.add(chunk)
                if block:
                    await self.writer.write(block)
            except MarcoError as error:
                # Answered once the body has been read (and dropped): Tornado hangs up on a
                # request answered early, and the client would see a reset, not the reason.
                self.failure = error

    async def put(self) -> None:
        if self.failure is not None:
            if not self._finished:
                raise self.failure
            return
        assert self.writer is not None
        rest = self.blocks.flush()
        if rest:
            try:
                await self.writer.write(rest)
            except MarcoError:
                self.writer.abort()
                raise
        result = await self.writer.commit()
        writer_via, self.writer = self.writer.via, None
        self.ctx.audit.record("file.write", self.current_user, path=result.get("path"),
                              size=result.get("size"), mode=result.get("mode"),
                              client=self.request.remote_ip)
        self.write_json({**result, "via": writer_via}, 201)

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        if self.writer is not None:
            self.writer.abort()
        if self.reader is not None:
            self.reader.abort()

    async def get(self) -> None:
        user = self.authenticate()
        path = validate_path(user, self.path_argument())
        self.reader = await self._open(self.ctx.files.open_reader(user, path))
        reader = self.reader
        if reader is None:  # the client left while the helper was starting
            return
        self.ctx.audit.record("file.read", user.name, path=path, size=reader.size,
                              client=self.request.remote_ip)
        if self.client_gone:
            reader.abort()
            return
        try:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(reader.size))
            self.set_header("X-Marco-Mode", reader.mode)
            self.set_header("X-Marco-Via", reader.via)
            async for chunk in reader.chunks():
                self.write(chunk)
                await self.flush()
            self.finish()
        finally:
            reader.abort()
