"""Ansible's remote tmp steps without a shell on the node (issue 14).

A `copy` or `template` task asks the node for `echo ~`, then a `mkdir` of its remote tmp, then
uploads into it, runs the module and removes the tmp: three shell executions besides the
module. This connection knows two of them better than a shell would:

- `echo ~` (and `echo ~USER` for the token's own user) prints the home the agent named in this
  task's previous answer (every `?wait=1` answer carries `user` and `home`), so it is answered
  here without a round trip.
- The tmp's `mkdir` is deferred: its answer (`BASEFILE=PATH`) is given here, and the directory is
  made by the first upload into it (`PUT /v1/files?mkdir=true`, which makes it exactly as the
  shell command would: umask 77, `mkdir -p` of the base, `mkdir` of the tmp). A command, its
  stdin, an upload or a download that names the tmp (its random, fresh BASEFILE) first runs the
  real deferred command; one that does not name it cannot address it, so it goes first (the
  `stat` module a `copy` task runs before its upload). Removing a tmp never made needs nothing.

Only commands this connection's own shell plugin generated, with arguments a shell would not
transform (plain absolute paths), are taken: the shell's methods are wrapped to remember each
command they return, and `exec_command` must receive exactly that text, as
`_low_level_execute_command` wraps it (`EXE -c '... && sleep 0'`). Anything else runs as before.
"""

from __future__ import annotations

import os
import re
import shlex
import typing as t
from dataclasses import dataclass

PLAIN_PATH = re.compile(r"/[A-Za-z0-9_.+@%,:=/-]*")  # nothing sh's echo or "`...`" transforms
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
HOME_OF = re.compile(r"~([A-Za-z0-9_.-]*)")        # `echo ~` or `echo ~NAME`
SLEEP_SUFFIX = " && sleep 0"                       # what _low_level_execute_command appends

Answer = tuple[int, bytes, bytes]


@dataclass(frozen=True)
class _Home:
    name: str  # "" for the caller's own `~`


@dataclass(frozen=True)
class _Mkdtemp:
    basefile: str
    path: str


@dataclass(frozen=True)
class _Remove:
    path: str


@dataclass
class _Pending:
    """A tmp whose `mkdir` was answered here and has not run on the node yet."""

    basefile: str
    path: str
    command: str  # the real command, exactly as exec_command received it
    made: bool = False


class RemoteTmp:
    """Answers a connection's home and tmp commands without a shell where it safely can."""

    def __init__(self, shell: t.Any, enabled: bool = True) -> None:
        self.enabled = enabled
        self.user = ""   # from the agent's last answer in this task
        self.home = ""
        self.pending: _Pending | None = None
        self._steps: dict[str, _Home | _Mkdtemp | _Remove] = {}
        self._wrap(shell)

    # -- remembering what the shell plugin generated -----------------------------------------

    def _wrap(self, shell: t.Any) -> None:
        """Wrap the shell plugin's public builders (2.19's `_mkdtemp2` and `_expand_user2` call
        them through the instance) so each generated command is remembered with its meaning."""
        expand_user, mkdtemp, remove = shell.expand_user, shell.mkdtemp, shell.remove

        def expand_user_recorded(user_home_path: str, username: str = "") -> str:
            command = expand_user(user_home_path, username=username)
            match = HOME_OF.fullmatch(user_home_path + (username if user_home_path == "~" else ""))
            if match is not None and command == "echo " + match.group(0):
                self._steps[command] = _Home(match.group(1))
            return str(command)

        def mkdtemp_recorded(basefile: str | None = None, system: bool = False,
                             mode: int = 0o700, tmpdir: str | None = None) -> str:
            command = mkdtemp(basefile=basefile, system=system, mode=mode, tmpdir=tmpdir)
            if (basefile and tmpdir and not system and mode == 0o700
                    and PLAIN_NAME.fullmatch(basefile) and _plain(tmpdir)):
                path = shell.join_path(tmpdir, basefile)
                self._steps[command] = _Mkdtemp(basefile, path)
            return str(command)

        def remove_recorded(path: str, recurse: bool = False) -> str:
            command = remove(path, recurse=recurse)
            if recurse and _plain(path):
                self._steps[command] = _Remove(path)
            return str(command)

        shell.expand_user = expand_user_recorded
        shell.mkdtemp = mkdtemp_recorded
        shell.remove = remove_recorded

    def _step(self, cmd: str) -> _Home | _Mkdtemp | _Remove | None:
        """The remembered step `cmd` is, as _low_level_execute_command wrapped it, if any."""
        inner = cmd
        try:
            parts = shlex.split(cmd)
        except ValueError:
            return None
        if len(parts) == 3 and parts[1] == "-c" and os.path.isabs(parts[0]):
            inner = parts[2]
        inner = inner.removesuffix(SLEEP_SUFFIX)
        return self._steps.get(inner)

    # -- answering ----------------------------------------------------------------------------

    def learn(self, user: str, home: str) -> None:
        """The agent's answer named the user and home (older agents name neither)."""
        if user and home:
            self.user, self.home = user, home

    def answer(self, cmd: str, in_data: bytes | None, becoming: bool) -> tuple[Answer, str] | None:
        """(rc, stdout, stderr) and a -vvv note for `cmd` without the node, or None: run it.
        Only once the agent named the user's home: that also says it knows `mkdir=true`."""
        if not self.enabled or not self.home or in_data or becoming:
            return None
        step = self._step(cmd)
        if isinstance(step, _Home) and step.name in ("", self.user):
            return (0, self.home.encode() + b"\n", b""), f"echo ~ is {self.home} (agent)"
        if isinstance(step, _Mkdtemp) and (self.pending is None or self.pending.made):
            self.pending = _Pending(step.basefile, step.path, cmd)
            return ((0, f"{step.basefile}={step.path}\n".encode(), b""),
                    f"tmp {step.path} deferred to the first upload into it")
        if isinstance(step, _Remove) and self.pending is not None \
                and self._is_pending(step.path):
            pending, self.pending = self.pending, None
            if not pending.made:
                return (0, b"", b""), "tmp never made: nothing to remove"
        return None

    def upload_makes_tmp(self, out_path: str) -> bool:
        """Whether an upload to `out_path` should make the deferred tmp (`mkdir=true`): true
        once, for the first file put directly into it. The tmp counts as made from then on,
        even if the upload fails (the real removal then runs)."""
        pending = self.pending
        if pending is None or pending.made or not self._is_pending(os.path.dirname(out_path)):
            return False
        pending.made = True
        return True

    def deferred_command(self, text: str, data: bytes | None = None) -> str | None:
        """The real `mkdir` command to run first when a command (`text`, stdin `data`) or a
        file path names the deferred tmp; once: the tmp counts as made after it was handed out."""
        pending = self.pending
        if pending is None or pending.made:
            return None
        if pending.basefile not in text and (not data or pending.basefile.encode() not in data):
            return None
        pending.made = True
        return pending.command

    def _is_pending(self, path: str) -> bool:
        return self.pending is not None \
            and path.rstrip("/") == self.pending.path.rstrip("/")


def _plain(path: str) -> bool:
    """An absolute path sh leaves as it is (no `$`, quotes, spaces, `~`, globs, `..`)."""
    return bool(PLAIN_PATH.fullmatch(path)) and ".." not in path.split("/")
