"""Marco errors -> Ansible errors, by type and by the error's `hint`, at the plugin boundary."""

from __future__ import annotations

from ansible.errors import (
    AnsibleAuthenticationFailure,
    AnsibleConnectionFailure,
    AnsibleError,
    AnsibleFileNotFound,
)

from marco.errors import (
    AgentUnreachable,
    AuthenticationError,
    MarcoError,
    NotFound,
    ShuttingDown,
    TokenExpired,
)

LOGIN_HINT = "run `marco login` (or set MARCO_TOKEN / marco_token)"


def to_ansible(error: MarcoError, host: str, action: str) -> AnsibleError:
    """The Ansible exception that tells the user what went wrong and what to do: an expired
    token the Ansible way to log in again, another refusal its own hint if it has one."""
    where = f"Marco agent {host}"
    if isinstance(error, (AgentUnreachable, ShuttingDown)):
        return AnsibleConnectionFailure(f"{where} is unreachable ({action}): {error}")
    if isinstance(error, TokenExpired):
        return AnsibleAuthenticationFailure(f"{where}: your Marco token has expired; {LOGIN_HINT}")
    if isinstance(error, AuthenticationError):
        if error.hint:  # found locally (no token, no certificate) or refused with advice
            return AnsibleAuthenticationFailure(f"{where}: {error}")
        return AnsibleAuthenticationFailure(f"{where} refused the token ({error.message}); "
                                            f"{LOGIN_HINT}")
    if isinstance(error, NotFound):
        return AnsibleFileNotFound(f"{where}: {error}")
    return AnsibleError(f"{where} ({action}): {error}")
