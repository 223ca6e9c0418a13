"""Marco errors -> Ansible errors, by cause, at the plugin boundary."""

from __future__ import annotations

from ansible.errors import (AnsibleAuthenticationFailure, AnsibleConnectionFailure, AnsibleError,
                            AnsibleFileNotFound)

from marco.errors import (AgentUnreachable, AuthenticationError, MarcoError, NotFound,
                          ShuttingDown, TokenExpired)

LOGIN_HINT = "run `marco login` (or set MARCO_TOKEN / marco_token)"


def to_ansible(error: MarcoError, host: str, action: str) -> AnsibleError:
    """The Ansible exception that tells the user what went wrong and what to do."""
    where = f"Marco agent {host}"
    if isinstance(error, (AgentUnreachable, ShuttingDown)):
        return AnsibleConnectionFailure(f"{where} is unreachable ({action}): {error.message}")
    if isinstance(error, TokenExpired):
        return AnsibleAuthenticationFailure(f"{where}: your Marco token has expired; {LOGIN_HINT}")
    if isinstance(error, AuthenticationError):
        if "marco login" in error.message:  # no token found at all: the message says what to do
            return AnsibleAuthenticationFailure(f"{where}: {error.message}")
        return AnsibleAuthenticationFailure(f"{where} refused the token ({error.message}); {LOGIN_HINT}")
    if isinstance(error, NotFound):
        return AnsibleFileNotFound(f"{where}: {error.message}")
    return AnsibleError(f"{where} ({action}): {error.message}")
