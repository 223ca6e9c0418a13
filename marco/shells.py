"""Login shells: which accounts may use Marco at all (shared by the agent and the controller)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import PermissionDenied
from .settings import Option

SHELLS_FILE = "/etc/shells"
DEFAULT_SHELL = "/bin/sh"  # an empty shell field means this (passwd(5)), as for login and sshd
NO_LOGIN_SHELLS = frozenset({"nologin", "false"})  # by basename, whatever /etc/shells says
# Shells that restrict what their account may run: /etc/shells often lists them, but Marco
# runs argv or /bin/sh -c, not the account's shell, so they count only when listed explicitly.
RESTRICTED_SHELLS = frozenset({"rbash", "git-shell", "rssh", "scponly", "tmux", "screen",
                               "lshell", "rksh"})


class LoginShells:
    """Which accounts may use Marco at all: those whose shell is a login shell.

    Marco gives whoever logs in a shell on every node, so an account an admin closed with
    `/usr/sbin/nologin` or `/bin/false`, or confined to `rbash` or `git-shell`, must not get one
    through Marco either. A login shell is one listed in `allowed` when the admin set that
    list, else one listed in /etc/shells (read once at start) that is not a restricted shell;
    `nologin` and `false` never are. An empty shell field means /bin/sh.
    """

    def __init__(self, allowed: Sequence[str] = (), shells_file: str = SHELLS_FILE) -> None:
        self.explicit = bool(allowed)
        self.allowed = frozenset(allowed) if allowed else _read_shells(Path(shells_file))

    def permits(self, shell: str) -> bool:
        shell = shell or DEFAULT_SHELL
        name = os.path.basename(shell)
        if name in NO_LOGIN_SHELLS:
            return False
        if self.explicit:
            return self.allowed is not None and shell in self.allowed
        return name not in RESTRICTED_SHELLS and (self.allowed is None or shell in self.allowed)

    def check(self, username: str, shell: str) -> None:
        """Raise PermissionDenied (with the reason) unless `shell` is a login shell."""
        if not self.permits(shell):
            raise PermissionDenied(
                f"account {username!r} has no login shell ({shell or 'none'}), so it may not "
                "use Marco; an admin can allow that shell with the login_shells setting")


def login_shells_option() -> Option:
    """The `login_shells` setting, the same for the agent and the controller."""
    return Option("login_shells", [], "shells that count as login shells: accounts with another "
                  "shell are refused (default: those listed in /etc/shells but restricted ones "
                  "such as rbash or git-shell; never nologin or false)", repeatable=True,
                  metavar="PATH")


def _read_shells(path: Path) -> frozenset[str] | None:
    """The shells /etc/shells lists, or None (any but the refused ones) without one."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return frozenset(line.strip() for line in lines
                     if line.strip() and not line.lstrip().startswith("#"))
