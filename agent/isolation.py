"""Keeping each execution's processes together, so a stop reaches all of them, and limiting
what one user's executions may take from the node.

Two mechanisms, chosen once at start and logged: a cgroup v2 per execution (agent.cgroups)
where the agent's cgroup is delegated and writable, else the agent as child subreaper
(agent.subreaper). Per-user limits: `pids.max` and `memory.max` on the user's cgroup where
those controllers are available. Otherwise the pids limit is RLIMIT_NPROC (the kernel counts
all of the user's processes and threads on the node against it): set on the agent itself, which
as root of the initial user namespace is exempt, so every child inherits it at no cost per
spawn; in another user namespace root is not exempt, so each child sets it after its switch to
the user. The memory limit then is not enforced.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from marco.errors import ConfigError, IsolationUnavailable

from .cgroups import CgroupBackend
from .subreaper import SubreaperBackend
from .users import UserIdentity

log = logging.getLogger(__name__)

CGROUP_MODES = ("auto", "on", "off")


class Backend(Protocol):
    """What CgroupBackend and SubreaperBackend both do."""

    mode: str

    @property
    def limits_pids(self) -> bool: ...

    @property
    def limits_memory(self) -> bool: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...

    def spawning(self, execution_id: str,
                 user: UserIdentity) -> AbstractContextManager[int | None]: ...

    def started(self, execution_id: str, pid: int) -> None: ...

    def finished(self, execution_id: str) -> None: ...

    def alive(self, execution_id: str) -> bool: ...

    def signal(self, execution_id: str, signum: int) -> None: ...


@dataclass(frozen=True)
class IsolationSettings:
    """`cgroups`: auto (use them when possible), on (refuse to start without), off."""

    cgroups: str = "auto"
    max_pids_per_user: int = 4096
    max_memory_per_user: int = 0

    def __post_init__(self) -> None:
        if self.cgroups not in CGROUP_MODES:
            raise ConfigError(f"cgroups must be one of {', '.join(CGROUP_MODES)}, "
                              f"not {self.cgroups!r}")
        if self.max_pids_per_user < 0 or self.max_memory_per_user < 0:
            raise ConfigError("max_pids_per_user and max_memory_per_user must be >= 0 "
                              "(0: no limit)")


def _in_initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _child_setup(procs_fd: int | None, nproc: int) -> None:
    """Runs in the child between fork and exec, already as the user: join the execution's
    cgroup (the fd was opened by the agent), then cap the user's processes."""
    if procs_fd is not None:
        os.write(procs_fd, b"0")
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def popen_setup(procs_fd: int | None, nproc: int) -> dict[str, Any]:
    """Popen arguments that make a child do what `Isolation.spawning_fds` asks."""
    if nproc:
        return {"preexec_fn": functools.partial(_child_setup, procs_fd, nproc)}
    if procs_fd is not None:  # a builtin: no Python frame in the child
        return {"preexec_fn": functools.partial(os.write, procs_fd, b"0")}
    return {}  # no code between fork and exec: the cheapest spawn


class Isolation:
    """The executions' side of process containment: spawn, signal, clean up."""

    def __init__(self, settings: IsolationSettings | None = None,
                 switches_users: bool | None = None) -> None:
        self.settings = settings or IsolationSettings()
        self.switches_users = os.geteuid() == 0 if switches_users is None else switches_users
        self.backend: Backend = SubreaperBackend()
        self.nproc = 0          # RLIMIT_NPROC of users' processes when no pids.max limits them
        self._child_nproc = 0   # ... when each child must set it itself

    @property
    def mode(self) -> str:
        return self.backend.mode

    def start(self) -> None:
        """Pick the mechanism (cgroups unless off or impossible) and log which one runs."""
        settings = self.settings
        if settings.cgroups != "off":
            cgroups = CgroupBackend(settings.max_pids_per_user, settings.max_memory_per_user)
            try:
                cgroups.start()
                self.backend = cgroups
            except IsolationUnavailable as error:
                if settings.cgroups == "on":
                    raise
                log.info("no cgroups for executions (%s)", error.message)
        if self.backend.mode == "subreaper":
            self.backend.start()
        limited = self.switches_users and settings.max_pids_per_user > 0
        self.nproc = settings.max_pids_per_user if limited and not self.backend.limits_pids else 0
        if self.nproc and _in_initial_user_namespace():
            resource.setrlimit(resource.RLIMIT_NPROC, (self.nproc, self.nproc))
        else:
            self._child_nproc = self.nproc
        pids = (f"pids.max {settings.max_pids_per_user}" if self.backend.limits_pids
                else f"RLIMIT_NPROC {self.nproc}" if self.nproc else "none")
        memory = (f"memory.max {settings.max_memory_per_user}" if self.backend.limits_memory
                  else "none")
        if settings.max_memory_per_user and not self.backend.limits_memory:
            log.warning("max_memory_per_user is set but not enforced: it needs the cgroup v2 "
                        "memory controller delegated to the agent")
        where = getattr(self.backend, "base", None)
        log.info("executions are isolated by %s%s; per-user limits: pids %s, memory %s",
                 "cgroup v2" if self.mode == "cgroup" else "child subreaper (no cgroups)",
                 f" under {where}" if where else "", pids, memory)

    async def close(self) -> None:
        await self.backend.close()

    @contextmanager
    def spawning(self, execution_id: str, user: UserIdentity) -> Iterator[dict[str, Any]]:
        """Extra Popen arguments for the execution's child; cleans up if the spawn fails."""
        with self.spawning_fds(execution_id, user) as (procs_fd, nproc):
            yield popen_setup(procs_fd, nproc)

    @contextmanager
    def spawning_fds(self, execution_id: str,
                     user: UserIdentity) -> Iterator[tuple[int | None, int]]:
        """What a child of the execution must do itself, already as the user: write b"0" to
        `procs_fd` (join the execution's cgroup; None: no cgroup) and set RLIMIT_NPROC to
        `nproc` (0: nothing to set). For a child the agent does not fork itself (a module
        runner's); cleans up if the spawn fails."""
        with self.backend.spawning(execution_id, user) as procs_fd:
            yield procs_fd, self._child_nproc if user.uid != 0 else 0

    def started(self, execution_id: str, pid: int) -> None:
        self.backend.started(execution_id, pid)

    def finished(self, execution_id: str) -> None:
        self.backend.finished(execution_id)

    def alive(self, execution_id: str) -> bool:
        """True while the execution has processes, its main one or ones it left behind."""
        return self.backend.alive(execution_id)

    def signal(self, execution_id: str, signum: int) -> None:
        """Signal every process of the execution (SIGKILL via cgroup.kill with cgroups)."""
        self.backend.signal(execution_id, signum)
