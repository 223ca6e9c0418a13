"""Who an execution or file operation runs as: the token's Unix user, resolved on this node."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any

from marco.errors import PermissionDenied
from marco.shells import LoginShells

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class UserIdentity:
    """A Unix account: uid, primary gid, supplementary groups, home and shell."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def clean_environment(self) -> dict[str, str]:
        """The environment an execution starts from: nothing of the agent's leaks in."""
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
            "PATH": ROOT_PATH if self.uid == 0 else DEFAULT_PATH,
        }

    def expand(self, path: str) -> str:
        """Expand `~`/`~/x` to this user's home and make relative paths home-relative."""
        if path == "~" or path.startswith("~/"):
            path = self.home + path[1:]
        elif path.startswith("~"):
            raise PermissionDenied("paths under another user's home (~name) are not expanded")
        if not os.path.isabs(path):
            path = os.path.join(self.home, path)
        return path


class UserResolver:
    """Maps a token's username to the identity this agent may act as.

    A root agent may act as any local account with a login shell; an agent running as a normal
    user may act only as that user (it could not switch identity anyway), so everyone else
    gets 403.
    """

    def __init__(self, agent_uid: int | None = None, shells: LoginShells | None = None) -> None:
        self.agent_uid = os.geteuid() if agent_uid is None else agent_uid
        self.shells = shells or LoginShells()

    @property
    def can_switch_user(self) -> bool:
        return self.agent_uid == 0

    def resolve(self, username: str) -> UserIdentity:
        try:
            entry = pwd.getpwnam(username)
        except KeyError:
            raise PermissionDenied(f"user {username!r} does not exist on this node") from None
        if not self.can_switch_user and entry.pw_uid != self.agent_uid:
            raise PermissionDenied(
                f"this agent runs as uid {self.agent_uid} and serves only its own user")
        self.shells.check(entry.pw_name, entry.pw_shell)
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return UserIdentity(entry.pw_name, entry.pw_uid, entry.pw_gid, groups,
                            entry.pw_dir or "/", entry.pw_shell)

    def popen_identity(self, user: UserIdentity) -> dict[str, Any]:
        """Keyword arguments for Popen that make the child run as `user`.

        `user=` alone would keep gid 0 and root's supplementary groups, so all three are set.
        A non-root agent already is the user and cannot call setgroups: nothing to pass.
        """
        if not self.can_switch_user:
            return {}
        return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
