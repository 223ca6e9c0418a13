"""`marco_deploy`: upload a file to a folder on the node, then run a command there directly on
the agent, so its output streams line by line to the viewer while it runs. The result looks
like the `command` module's."""

from __future__ import annotations

import datetime
import os
import posixpath
import shlex
from typing import Any

from marco import modes
from marco.client import AgentClient
from marco.errors import BadRequest, Conflict


class DeployError(Exception):
    """A problem with the task's arguments or source file (the task fails with this text)."""


def parse_mode(mode: Any) -> int | None:
    """The task's `mode` (octal text or YAML's int), checked as the agent checks it."""
    try:
        return modes.parse_mode(mode)
    except BadRequest as error:
        raise DeployError(error.message) from None


def deploy(client: AgentClient, src_path: str | None, dest: str, overwrite: bool,
           mode: Any, command: str | None, chdir: str | None, creates: str | None,
           label: str, check_mode: bool = False, no_log: bool = False,
           tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Do the task; return the result dict (failed on rc != 0 like `command`). With `no_log`
    the command's output goes nowhere but the result (not the viewer, not the agent's spool)."""
    result: dict[str, Any] = {"changed": False}
    folder = dest or "~"
    if src_path:
        if not os.path.isfile(src_path):
            raise DeployError(f"src {src_path} is not a file")
        target = posixpath.join(folder, os.path.basename(src_path))
        result["dest"] = target
        if check_mode:
            result["changed"] = True  # would upload (the agent cannot compare contents yet)
        else:
            try:
                with open(src_path, "rb") as source:
                    uploaded = client.put_file(source, target, mode=parse_mode(mode),
                                               overwrite=overwrite,
                                               size=os.fstat(source.fileno()).st_size)
                result.update(changed=True, size=uploaded["size"], path=uploaded["path"])
            except Conflict:
                result["msg"] = f"{target} exists and overwrite is false: kept"
    if not command:
        return result
    workdir = chdir or folder
    if creates:
        probe = client.run(f"test -e {shlex.quote(creates)}", cwd=workdir,
                           label=f"{label} (creates?)", no_log=no_log, tags=tags)
        if probe.rc == 0:
            result.update(cmd=command, rc=0, stdout=f"skipped, since {creates} exists",
                          stderr="", stdout_lines=[f"skipped, since {creates} exists"],
                          stderr_lines=[])
            return result
    if check_mode:
        result.update(msg="command not run in check mode", cmd=command)
        return result
    start = datetime.datetime.now()
    run = client.run(command, cwd=workdir, label=label, no_log=no_log, tags=tags)
    end = datetime.datetime.now()
    stdout = run.stdout.decode("utf-8", "replace").rstrip("\n")
    stderr = run.stderr.decode("utf-8", "replace").rstrip("\n")
    rc = run.rc if run.rc is not None else -1
    result.update(changed=True, cmd=command, rc=rc, stdout=stdout, stderr=stderr,
                  stdout_lines=stdout.splitlines(), stderr_lines=stderr.splitlines(),
                  start=str(start), end=str(end), delta=str(end - start),
                  execution=run.id)
    if run.signal:
        result["signal"] = run.signal
    if rc != 0:
        result.update(failed=True, msg="non-zero return code")
    return result


