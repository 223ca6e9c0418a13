"""Typed errors of the agent and its clients, one class per cause.

Each error knows its HTTP status so the agent's handlers translate them at the boundary, and the
client maps statuses back to the same classes. Callers (controller, Ansible plugins) translate
them again into their own vocabulary (e.g. AgentUnreachable -> AnsibleConnectionFailure).
"""

from __future__ import annotations


class MarcoError(Exception):
    """Base of every Marco error; `status` is the HTTP status it maps to."""

    status = 500
    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()


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


class TooManySockets(MarcoError):
    """Too many sockets of this user are open on this node."""

    status = 429
    code = "too_many_sockets"


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
    """The agent cannot be reached (connection refused, reset or timed out)."""

    status = 503
    code = "unreachable"


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


_BY_STATUS: dict[int, type[MarcoError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound,
    409: Conflict, 413: PayloadTooLarge, 429: TooManyExecutions, 507: InsufficientStorage,
}
_BY_CODE: dict[str, type[MarcoError]] = {
    cls.code: cls for cls in (BadRequest, AuthenticationError, TokenExpired, TokenRevoked,
                              PermissionDenied,
                              NotFound, Conflict, PayloadTooLarge, ShuttingDown,
                              TooManyExecutions, TooManySockets, InsufficientStorage,
                              DiskBudgetExhausted, TryAgain)
}


def error_from_response(status: int, code: str | None, message: str) -> MarcoError:
    """Rebuild the typed error an agent answered with (used by the client)."""
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or ProtocolError
    return cls(message or f"agent answered HTTP {status}")
