"""Marco's one exception ladder: every error any part raises or answers, one class per cause.

Each class has its HTTP `status` and its wire `code`; a handler answers an error as
`{"error": code, "message": ..., "hint": ...}` (`to_body`), and a client rebuilds the same class
from that answer (`error_from_response`). Every subclass registers its code when it is defined,
so no code goes on the wire that a client cannot map back. Callers decide by type and by the
structured fields, never by message text; they translate into their own vocabulary at their
boundary (e.g. AgentUnreachable -> AnsibleConnectionFailure).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

_BY_CODE: dict[str, type[MarcoError]] = {}


class MarcoError(Exception):
    """Internal error."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str = "", hint: str | None = None) -> None:
        """`message` says what went wrong, `hint` (if any) what the user can do about it."""
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.hint = hint or None
        super().__init__(f"{self.message}; {self.hint}" if self.hint else self.message)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} needs a wire code of its own")
        if cls.code in _BY_CODE:
            raise TypeError(f"{cls.__name__}: code {cls.code!r} is {_BY_CODE[cls.code].__name__}'s")
        _BY_CODE[cls.code] = cls


_BY_CODE[MarcoError.code] = MarcoError


class BadRequest(MarcoError):
    """The request is malformed."""

    status = 400
    code = "bad_request"


class AuthenticationError(MarcoError):
    """The token is missing, forged, tampered with or expired."""

    status = 401
    code = "unauthenticated"


class TokenExpired(AuthenticationError):
    """The token has expired; log in again."""

    code = "token_expired"


class TokenRevoked(AuthenticationError):
    """The token was revoked (its user logged out everywhere); log in again."""

    code = "token_revoked"


class PermissionDenied(MarcoError):
    """The user may not do this."""

    status = 403
    code = "forbidden"


class NotFound(MarcoError):
    """No such execution or file."""

    status = 404
    code = "not_found"


class Conflict(MarcoError):
    """The target already exists."""

    status = 409
    code = "conflict"


class PayloadTooLarge(MarcoError):
    """The request body is larger than allowed."""

    status = 413
    code = "too_large"


class TooManyExecutions(MarcoError):
    """Too many executions of this user are running."""

    status = 429
    code = "too_many_executions"


class TooManyRuns(MarcoError):
    """Too many runs running for this user (the controller's runs_max_running_per_user)."""

    status = 429
    code = "too_many_runs"


class TooManyDownloads(MarcoError):
    """Too many output downloads of this user at once (the controller's
    runs_downloads_per_user)."""

    status = 429
    code = "too_many_downloads"


class TooManySearches(MarcoError):
    """Too many output searches of this user at once (the controller's runs_search_per_user)."""

    status = 429
    code = "too_many_searches"


class UsageError(MarcoError):
    """A mistake in a command line itself: bad arguments, an unknown node, a malformed id."""

    status = 400
    code = "usage"


class TooManySockets(MarcoError):
    """Too many sockets of this user are open on this node."""

    status = 429
    code = "too_many_sockets"


class TooManyAttempts(MarcoError):
    """Too many failed logins: wait and try again."""

    status = 429
    code = "too_many_attempts"


class InsufficientStorage(MarcoError):
    """No space left on the node's disk."""

    status = 507
    code = "no_space"


class DiskBudgetExhausted(InsufficientStorage):
    """This user's disk budget on this node is used up."""

    code = "disk_budget"


class TryAgain(MarcoError):
    """The service cannot answer this now; try again in a moment."""

    status = 503
    code = "try_again"


class ShuttingDown(MarcoError):
    """The agent is shutting down."""

    status = 503
    code = "shutting_down"


class AgentUnreachable(MarcoError):
    """The agent (or the controller) cannot be reached (refused, reset or timed out)."""

    status = 503
    code = "unreachable"


class CertificateRefused(AgentUnreachable):
    """The TLS handshake failed: a certificate was missing, foreign, expired or revoked."""

    code = "certificate"


class MuxUnavailable(AgentUnreachable):
    """The user's marco-mux cannot be reached or refused the connection (then the Ansible
    connection talks to the agent directly)."""

    code = "mux_unavailable"


class UploadAborted(MarcoError):
    """The upload was abandoned (the browser left, or the agent stopped taking data)."""

    status = 504
    code = "stalled"


class ProtocolError(MarcoError):
    """The agent answered something this client does not understand."""

    status = 502
    code = "protocol"


class ConfigError(MarcoError):
    """The configuration (or the secret file) is unusable."""

    code = "config"


class IsolationUnavailable(ConfigError):
    """Executions cannot get cgroups of their own on this node (the reason says why)."""

    code = "isolation_unavailable"


# An answer without a known code (an older or foreign server, a proxy): the class by status.
_BY_STATUS: dict[int, type[MarcoError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound,
    409: Conflict, 413: PayloadTooLarge, 429: TooManyExecutions, 507: InsufficientStorage,
}


def to_body(error: MarcoError) -> dict[str, str]:
    """The JSON body of an error answer (`hint` only when there is one)."""
    body = {"error": error.code, "message": error.message}
    if error.hint:
        body["hint"] = error.hint
    return body


def error_class(status: int, code: str | None = None) -> type[MarcoError]:
    """The class an answer names by `code`, else the one its status implies."""
    return _BY_CODE.get(code or "") or _BY_STATUS.get(status) or ProtocolError


def error_from_response(status: int, code: str | None, message: str,
                        hint: str | None = None) -> MarcoError:
    """Rebuild the typed error a server answered with (used by the clients)."""
    return error_class(status, code)(message or f"answered HTTP {status}", hint)


def error_from_answer(status: int, body: bytes) -> MarcoError:
    """The typed error an error answer's JSON body names (a body that is not ours: by status)."""
    try:
        data = json.loads(body)
        code, message, hint = data.get("error"), data.get("message", ""), data.get("hint")
    except (ValueError, AttributeError):
        code, message, hint = None, body[:200].decode("utf-8", "replace"), None
    return error_from_response(status, code if isinstance(code, str) else None, str(message),
                               hint if isinstance(hint, str) else None)


def wire_errors() -> dict[str, type[MarcoError]]:
    """Every registered code and its class (for tests and docs)."""
    return dict(_BY_CODE)
