"""Without cgroups: the agent is a child subreaper and finds an execution's processes itself.

An execution's processes are those in its session while its main process runs, those whose
environment carries its `MARCO_EXECUTION_ID` (owned by its user: the variable is only a hint
the user controls), and the descendants of both. As subreaper the agent inherits the orphans
(a `setsid cmd &` whose shell exited) instead of init, and reaps them. A process that leaves
the session, clears its environment and loses its parent escapes; cgroups do not have that gap.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .users import UserIdentity

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
ZOMBIE_AGE = 1.0        # a zombie child still there this much later has no waiter: reap it
TRACKED_MAX = 65536     # finished executions remembered for stopping what they left behind


@dataclass(frozen=True)
class ProcessInfo:
    """The fields of /proc/PID/stat the search needs (`start` tells a reused pid apart)."""

    pid: int
    ppid: int
    session: int
    zombie: bool
    start: int
    uid: int


@dataclass
class _Tracked:
    uid: int
    pid: int | None = None   # the main process while it runs: its session is the execution's


def read_process(pid: int) -> ProcessInfo | None:
    """One process's stat line, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b")") + 2:].split()
    return ProcessInfo(pid, int(fields[1]), int(fields[3]), fields[0] == b"Z", int(fields[19]),
                       uid)


def all_processes() -> dict[int, ProcessInfo]:
    processes = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_process(int(name))
            if info is not None:
                processes[info.pid] = info
    return processes


def descendants(roots: set[int], processes: dict[int, ProcessInfo]) -> set[int]:
    """`roots` and everything below them in the process tree."""
    children: dict[int, list[int]] = {}
    for info in processes.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _marked(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return marker in b"\0" + handle.read()
    except OSError:
        return False


def send_signal(info: ProcessInfo, signum: int) -> None:
    """Signal the process `info` describes, never a later one that reused its pid."""
    try:
        pidfd = os.pidfd_open(info.pid)
    except OSError:
        return
    try:
        now = read_process(info.pid)
        if now is not None and now.start == info.start:
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


class SubreaperBackend:
    """Finds executions' processes by session, environment and tree; reaps orphans."""

    mode = "subreaper"
    limits_pids = False
    limits_memory = False

    def __init__(self) -> None:
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()
        self._zombies: set[int] = set()
        self._reap_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Become the subreaper of every descendant and reap the orphans that die."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self._child_exited)

    async def close(self) -> None:
        """Agent shutdown: kill whatever still runs below the agent, executions' orphans too."""
        asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        if self._reap_handle is not None:
            self._reap_handle.cancel()
        processes = all_processes()
        for pid in descendants({os.getpid()}, processes) - {os.getpid()}:
            send_signal(processes[pid], signal.SIGKILL)

    # -- executions -------------------------------------------------------------------------

    @contextmanager
    def spawning(self, execution_id: str, user: UserIdentity) -> Iterator[int | None]:
        self._tracked[execution_id] = _Tracked(user.uid)
        while len(self._tracked) > TRACKED_MAX:
            self._tracked.popitem(last=False)
        yield None

    def started(self, execution_id: str, pid: int) -> None:
        tracked = self._tracked.get(execution_id)
        if tracked is not None:
            tracked.pid = pid

    def finished(self, execution_id: str) -> None:
        """The main process is gone: its pid (hence its session id) may be reused later."""
        tracked = self._tracked.get(execution_id)
        if tracked is not None:
            tracked.pid = None

    def members(self, execution_id: str) -> list[ProcessInfo]:
        """The execution's live processes (main, children, orphans), from one /proc scan."""
        tracked = self._tracked.get(execution_id)
        if tracked is None:
            return []
        marker = f"\0MARCO_EXECUTION_ID={execution_id}\0".encode()
        processes = all_processes()
        roots = {info.pid for info in processes.values()
                 if (tracked.pid is not None and info.session == tracked.pid)
                 or (info.uid == tracked.uid and info.pid != os.getpid()
                     and _marked(info.pid, marker))}
        return [processes[pid] for pid in descendants(roots, processes)
                if not processes[pid].zombie]

    def alive(self, execution_id: str) -> bool:
        return bool(self.members(execution_id))

    def signal(self, execution_id: str, signum: int) -> None:
        for info in self.members(execution_id):
            send_signal(info, signum)

    # -- reaping ----------------------------------------------------------------------------

    def _child_exited(self) -> None:
        if self._reap_handle is None:
            self._reap_handle = asyncio.get_running_loop().call_later(ZOMBIE_AGE, self._reap)

    def _reap(self) -> None:
        """Reap zombie children nobody waits for: asyncio waits for the children it spawned
        and reaps them at once, so only orphans stay zombies from one look to the next."""
        self._reap_handle = None
        zombies = {pid for pid in _children() if (info := read_process(pid)) and info.zombie}
        for pid in zombies & self._zombies:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self._zombies = zombies - self._zombies
        if self._zombies:
            self._child_exited()


def _children() -> set[int]:
    """This process's children (orphans are adopted by one of its threads)."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as handle:
                found.update(int(pid) for pid in handle.read().split())
        except FileNotFoundError:
            pass
    return found
