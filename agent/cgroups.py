"""Executions in cgroups v2: each in a cgroup of its own, killed whole, limited per user.

The tree the agent keeps under its own cgroup (its systemd unit with `Delegate=yes`):

    BASE/agent                     the agent itself (a leaf: BASE may enable controllers)
    BASE/executions/USER           pids.max, memory.max: one user's limits on this node
    BASE/executions/USER/ID        one execution; cgroup.kill stops all of it

BASE is the agent's own cgroup when the agent is alone in it (a systemd unit). Otherwise
(tests, a shell, the root cgroup of a machine without systemd) it is a private child
`marco-agent-PID`, so agents sharing a cgroup never touch each other's executions; one left by
a dead agent is killed and removed when the next agent starts.

A child joins its cgroup itself, after the switch to the user and before exec, by writing "0"
to a `cgroup.procs` the agent opened: the kernel checks the opener's credentials (Linux 5.16,
backported to 5.10 and 5.15). It is in its cgroup before it can fork, and the agent never
enters a user's cgroup (where the user's memory limit could OOM-kill it). `start` checks
once that the kernel allows it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marco.errors import IsolationUnavailable

from .users import UserIdentity

log = logging.getLogger(__name__)

PRIVATE_PREFIX = "marco-agent-"
NOBODY = 65534            # the probe child drops to this uid, like a real execution would
RETRY_REMOVE = 10.0       # seconds between attempts to remove cgroups that still hold processes
KILL_WAIT = 2.0           # seconds `close` waits for killed executions to be gone


def cgroup2_mount(mountinfo: str) -> tuple[Path, str] | None:
    """The cgroup2 mount point and the cgroup path it shows as its root, from mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1:]
        if tail and tail[0] == "cgroup2":
            return Path(_unescape(fields[4])), _unescape(fields[3])
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (the `0::` line of /proc/PID/cgroup)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].split(" (deleted)")[0]
    return None


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _populated(cgroup: Path) -> bool:
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def _members(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _kill(cgroup: Path) -> None:
    try:
        _write(cgroup / "cgroup.kill", "1")
    except FileNotFoundError:
        pass


def _remove_tree(cgroup: Path) -> bool:
    """rmdir a cgroup and its children, deepest first; False if some still hold processes."""
    removed = True
    try:
        children = [child for child in cgroup.iterdir() if child.is_dir()]
    except FileNotFoundError:
        return True
    for child in children:
        removed = _remove_tree(child) and removed
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        removed = False
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class CgroupBackend:
    """Per-execution cgroups under the agent's delegated cgroup v2."""

    mode = "cgroup"

    def __init__(self, max_pids_per_user: int = 0, max_memory_per_user: int = 0) -> None:
        self.max_pids = max_pids_per_user
        self.max_memory = max_memory_per_user
        self.mount = Path("/")
        self.own = Path("/")
        self.base = Path("/")
        self.controllers: set[str] = set()
        self._users: dict[str, Path] = {}
        self._executions: dict[str, Path] = {}
        self._leftovers: set[str] = set()   # finished executions whose cgroup still has processes
        self._root = "/"                    # the cgroup path the mount shows as its root
        self._retry: asyncio.TimerHandle | None = None

    @property
    def limits_pids(self) -> bool:
        """True when pids.max enforces the per-user pids limit (else RLIMIT_NPROC does)."""
        return "pids" in self.controllers

    @property
    def limits_memory(self) -> bool:
        return "memory" in self.controllers

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Find the agent's cgroup, build the tree, move the agent into its leaf, check that a
        child can join its cgroup; raises IsolationUnavailable with the reason otherwise."""
        try:
            self._locate()
            self._build()
            self._probe()
        except OSError as exc:
            self._undo()
            raise IsolationUnavailable(
                f"cannot manage cgroups under {self.own}: {exc.strerror or exc}") from None
        except IsolationUnavailable:
            self._undo()
            raise

    def _undo(self) -> None:
        """Back to where the agent was, without a private tree, after a failed start."""
        if self.base == self.own:
            return
        try:
            _write(self.own / "cgroup.procs", str(os.getpid()))
            _remove_tree(self.base)
        except OSError:
            pass

    def _locate(self) -> None:
        with open("/proc/self/mountinfo") as handle:
            mount = cgroup2_mount(handle.read())
        with open("/proc/self/cgroup") as handle:
            path = own_cgroup(handle.read())
        if mount is None or path is None:
            raise IsolationUnavailable("no cgroup v2 hierarchy is mounted")
        self.mount, root = mount
        self._root = root
        if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
            raise IsolationUnavailable(f"this process's cgroup {path} is outside the cgroup2 "
                                       f"mount at {self.mount}")
        relative = path[len(root):] if root != "/" else path
        self.own = self.mount / relative.lstrip("/")
        if os.getpid() not in _members(self.own):
            raise IsolationUnavailable(f"cannot find this process in {self.own}")

    def _build(self) -> None:
        alone = self.own != self.mount and _members(self.own) == [os.getpid()]
        self.base = self.own if alone else self.own / f"{PRIVATE_PREFIX}{os.getpid()}"
        if not alone:
            self._remove_dead_agents()
        (self.base / "agent").mkdir(parents=True, exist_ok=True)
        _write(self.base / "agent" / "cgroup.procs", str(os.getpid()))
        executions = self.base / "executions"
        if executions.is_dir():  # a previous agent of this unit died under its executions
            _kill(executions)
            self._wait_empty([executions])
            _remove_tree(executions)
        wanted = {name for name, limit in (("pids", self.max_pids),
                                            ("memory", self.max_memory)) if limit}
        self.controllers = self._enable(self.base, wanted)
        executions.mkdir(exist_ok=True)
        self.controllers = self._enable(executions, self.controllers)

    @staticmethod
    def _enable(cgroup: Path, wanted: set[str]) -> set[str]:
        """Enable the wanted controllers below `cgroup` where its parent offers them."""
        offered = set((cgroup / "cgroup.controllers").read_text().split())
        enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
        for name in sorted((wanted & offered) - enabled):
            try:
                _write(cgroup / "cgroup.subtree_control", f"+{name}")
                enabled.add(name)
            except OSError as exc:
                log.warning("cannot enable the %s controller in %s: %s", name, cgroup,
                            exc.strerror)
        return wanted & enabled

    def _remove_dead_agents(self) -> None:
        """Kill and remove private trees of agents that died (their pid is gone)."""
        for tree in self.own.glob(PRIVATE_PREFIX + "*"):
            pid = tree.name[len(PRIVATE_PREFIX):]
            if tree == self.base or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            log.info("removing %s, left by an agent that is gone", tree)
            _kill(tree)
            self._wait_empty([tree])
            _remove_tree(tree)

    @staticmethod
    def _wait_empty(cgroups: list[Path]) -> None:
        """After cgroup.kill (at start, before serving): wait, bounded, for the processes to
        be gone so the cgroups can be removed."""
        deadline = time.monotonic() + KILL_WAIT
        while any(_populated(c) for c in cgroups) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _probe(self) -> None:
        """Spawn `true` the way executions are spawned: the kernel must let it join."""
        probe = self.base / "probe"
        probe.mkdir(exist_ok=True)
        fd = os.open(probe / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        identity = ({"user": NOBODY, "group": NOBODY, "extra_groups": []}
                    if os.geteuid() == 0 else {})
        try:
            subprocess.run(["true"], preexec_fn=lambda: _join(fd), check=True,  # type: ignore[call-overload]
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, **identity)
        except (subprocess.SubprocessError, OSError):
            raise IsolationUnavailable("the kernel does not let a child join its cgroup after "
                                       "it dropped privileges (needs Linux 5.16, or 5.10/5.15 "
                                       "with the open-time credentials fix)") from None
        finally:
            os.close(fd)
            _remove_tree(probe)

    async def close(self) -> None:
        """Kill every execution's cgroup (agent shutdown) and remove the tree."""
        if self._retry is not None:
            self._retry.cancel()
        executions = self.base / "executions"
        _kill(executions)
        deadline = asyncio.get_running_loop().time() + KILL_WAIT
        while _populated(executions) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        _remove_tree(executions)
        self._executions.clear()
        self._leftovers.clear()
        if self.base != self.own:  # leave the private tree to the cgroup the agent came from
            try:
                _write(self.own / "cgroup.procs", str(os.getpid()))
                _remove_tree(self.base)
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.base, exc.strerror)

    # -- executions -------------------------------------------------------------------------

    @contextmanager
    def spawning(self, execution_id: str, user: UserIdentity) -> Iterator[int | None]:
        """A new cgroup for the execution and an fd of its cgroup.procs for the child."""
        cgroup = self._user(user.name) / execution_id
        cgroup.mkdir()
        try:
            fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            cgroup.rmdir()
            raise
        self._executions[execution_id] = cgroup
        try:
            yield fd
        except BaseException:
            self.finished(execution_id)
            raise
        finally:
            os.close(fd)

    def _user(self, name: str) -> Path:
        cgroup = self._users.get(name)
        if cgroup is None:
            cgroup = self.base / "executions" / name
            cgroup.mkdir(exist_ok=True)
            if self.limits_pids:
                _write(cgroup / "pids.max", str(self.max_pids))
            if self.limits_memory:
                _write(cgroup / "memory.max", str(self.max_memory))
            self._users[name] = cgroup
        return cgroup

    def started(self, execution_id: str, pid: int) -> None:
        """Nothing to record: the cgroup knows its processes."""

    def finished(self, execution_id: str) -> None:
        """The main process ended: remove the cgroup now, or once its leftovers are gone."""
        cgroup = self._executions.get(execution_id)
        if cgroup is None or self._try_remove(execution_id, cgroup):
            return
        self._leftovers.add(execution_id)
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_REMOVE, self._remove_left)

    def _try_remove(self, execution_id: str, cgroup: Path) -> bool:
        try:
            cgroup.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            log.warning("cannot remove %s: %s", cgroup, exc.strerror)
        del self._executions[execution_id]
        self._leftovers.discard(execution_id)
        return True

    def _remove_left(self) -> None:
        self._retry = None
        for execution_id in list(self._leftovers):
            self._try_remove(execution_id, self._executions[execution_id])
        if self._leftovers:
            self._retry = asyncio.get_running_loop().call_later(RETRY_REMOVE, self._remove_left)

    def alive(self, execution_id: str) -> bool:
        """True while any process of the execution (its own or one it left) runs."""
        cgroup = self._executions.get(execution_id)
        return cgroup is not None and _populated(cgroup)

    def signal(self, execution_id: str, signum: int) -> None:
        """SIGKILL: cgroup.kill, the whole cgroup at once; another signal: each member."""
        cgroup = self._executions.get(execution_id)
        if cgroup is None:
            return
        if signum == signal.SIGKILL:
            _kill(cgroup)
            return
        as_seen = os.path.join(self._root, str(cgroup.relative_to(self.mount)))
        for pid in _members(cgroup):
            _signal_member(pid, as_seen, signum)


def _join(procs_fd: int) -> None:
    """In the child, between fork and exec: enter the cgroup whose cgroup.procs is open."""
    os.write(procs_fd, b"0")


def _signal_member(pid: int, cgroup: str, signum: int) -> None:
    """Signal `pid` only if it still is in `cgroup` (a pidfd pins it against pid reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            if own_cgroup(handle.read()) == cgroup:
                signal.pidfd_send_signal(pidfd, signum)
    except (ProcessLookupError, FileNotFoundError):
        pass
    finally:
        os.close(pidfd)
