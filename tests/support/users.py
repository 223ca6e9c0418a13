"""Real Unix accounts for tests (useradd + chpasswd; needs root, as in CI)."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class UnixUser:
    name: str
    password: str
    uid: int
    gid: int
    home: str


def require_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("these tests create real Unix users and switch identities: run them "
                           "as root (CI does), e.g. with the README's test command")


def remove_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)
    subprocess.run(["userdel", "--remove", "--force", name], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def create_user(name: str, groups: list[str] | None = None) -> UnixUser:
    """Create `name` afresh with a home directory, a random password and extra groups."""
    require_root()
    remove_user(name)
    for group in groups or []:
        subprocess.run(["groupadd", "--force", group], check=True)
    command = ["useradd", "--create-home", "--shell", "/bin/bash"]
    if groups:
        command += ["--groups", ",".join(groups)]
    subprocess.run(command + [name], check=True)
    password = secrets.token_urlsafe(12)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    os.chmod(pwd.getpwnam(name).pw_dir, 0o750)  # homes private, as on a shared node
    entry = pwd.getpwnam(name)
    return UnixUser(name, password, entry.pw_uid, entry.pw_gid, entry.pw_dir)
