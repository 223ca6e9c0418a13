"""The module runner ("zygote"): a Python process of ONE user that keeps Ansible's module_utils
imported and forks a fresh child per task, which then runs the task's AnsiballZ payload as a
cold `python3` reading it from stdin would.

The agent (agent/runners.py) starts it as `INTERP -c SOURCE [FD]`, as the user, with a clean
environment, in its own session; FD (default 3) is its end of an AF_UNIX SOCK_SEQPACKET
socketpair. It runs on the TARGET interpreter: standard library only, Python 3.8 syntax and
APIs, nothing of Marco imported. One JSON object per packet (at most 64 KiB), fds by SCM_RIGHTS
from the agent only (a runner that sends one is killed):

    r->a {"op":"hello","pid":N,"python":"3.11.2"}
    a->r {"op":"preload","profile":"legacy"}  [memfd holding the zip]   (profile optional)
    r->a {"op":"preloaded","ms":F,"entries":{member:[crc,size]}} or {"op":"preload_failed",
         "error":S}; after preload_failed the runner quits (its state is unknown)
    a->r {"op":"run","id":S,"cwd":S,"env":{S:S},"nproc":N?}  [stdin_r, stdout_w, stderr_w,
         procs_fd?]
    r->a {"op":"started","id":S,"pid":N}
    r->a {"op":"declined","id":S,"reason":S}  no child: the task runs cold, and this runner
         quits once its running tasks end (the python site changed since it started)
    r->a {"op":"exited","id":S,"status":RAW_WAIT_STATUS}
    a->r {"op":"helper","id":S,"argv":[S],"source":S}  [stdin, stdout, stderr]: fork a child
         that runs SOURCE as `python3 -I -S -c SOURCE ARGV...` would (the agent's file
         helper); answered by started/exited like a run, in the same id space
    a->r {"op":"signal","id":S,"signal":N}   (killpg of the task's session, as the user)
    a->r {"op":"quit"} or EOF: no new tasks; exit once every child is reaped

A malformed message ends the runner (the agent then treats it as dead). The serve loop never
blocks on a child: poll(2) on the socket and on a SIGCHLD wakeup pipe, waitpid(WNOHANG).

In a child `_serve()` RETURNS the payload's code and a fresh `__main__` namespace, and this
source's top level execs it, so the real interpreter shutdown ends the task: SystemExit codes,
a traceback and status 1 for an uncaught exception, death by SIGINT for a KeyboardInterrupt,
atexit handlers, non-daemon threads joined, stdio flushed.
"""

from __future__ import annotations

import array
import gc
import importlib
import importlib.machinery
import io
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile
from typing import Any

MAX_MESSAGE = 64 * 1024          # bytes of JSON in one packet, both ways
MAX_FDS = 8                      # room for more fds than any message carries (to see excess)
MAX_ZIP = 64 * 1024 * 1024       # a preload zip larger than this is refused
MAX_ID = 256                     # characters of a task id
MAX_ARGS = 16                    # arguments of a helper
LOG_PREFIX = "marco-runner: "
PROFILE_MODULES = ("ansible.module_utils._internal._json._profiles._module_%s_m2c",
                   "ansible.module_utils._internal._json._profiles._module_%s_c2m")
LOADER_MODULE = "ansible.module_utils._internal._ansiballz._loader"
SETUP_FAILED = 126               # the task's child could not join its cgroup, or set up
CWD_FAILED = 125                 # ... could not enter its directory (as `env -C`)
CUSTOMIZE = ("sitecustomize", "usercustomize")  # modules `site` imports at start


class ProtocolError(Exception):
    """The agent sent something this runner does not accept."""


class _SysPathView(list):
    """A preloaded package's `__path__`, recomputed from `sys.path` at each use (what
    `pkgutil.extend_path` would give now): a task's own zip, which its wrapper puts on
    `sys.path`, then supplies the module_utils the preload did not import."""

    def __init__(self, sub: str) -> None:
        super().__init__()
        self.sub = sub
        self.sys = sys  # a task's __main__ dict (this module's globals) has no `sys`

    def _now(self) -> list[str]:
        return [entry + "/" + self.sub for entry in self.sys.path
                if isinstance(entry, str) and entry.endswith(".zip")]

    def __iter__(self) -> Any:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __getitem__(self, index: Any) -> Any:
        return self._now()[index]

    def __contains__(self, item: object) -> bool:
        return item in self._now()

    def __repr__(self) -> str:
        return f"_SysPathView({self._now()!r})"


def log(text: str) -> None:
    """One line on the runner's stderr (the agent logs it at debug)."""
    try:
        sys.stderr.write(LOG_PREFIX + text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _text(value: object, what: str, limit: int = MAX_MESSAGE) -> str:
    """A string that can become a path, an environment entry or an id (no NUL, encodable)."""
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise ProtocolError("bad " + what)
    try:
        os.fsencode(value)
    except UnicodeError:
        raise ProtocolError("bad " + what) from None
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError("bad " + what)
    return value


def _environment(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ProtocolError("bad env")
    env = {}
    for name, text in value.items():
        name = _text(name, "env name")
        if not name or "=" in name:
            raise ProtocolError("bad env name")
        env[name] = _text(text, "env value")
    return env


class Task:
    """One run request: what its child needs, checked before forking."""

    def __init__(self, message: dict[str, Any], fds: list[int]) -> None:
        if len(fds) not in (3, 4):
            raise ProtocolError(f"run needs 3 or 4 fds, got {len(fds)}")
        self.id = _text(message.get("id"), "id", MAX_ID)
        self.cwd = _text(message.get("cwd"), "cwd", 4096)
        self.env = _environment(message.get("env"))
        nproc = message.get("nproc")
        self.nproc = 0 if nproc is None else _int(nproc, "nproc", 0, 2 ** 31)
        self.stdio = fds[:3]
        self.procs_fd = fds[3] if len(fds) == 4 else None
        self.fds = fds
        self.pid = 0


class Helper:
    """One helper request: a `-c` script (the agent's file helper) and its arguments, run in
    a child with the task's three fds, from `/`, with the runner's clean environment."""

    def __init__(self, message: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 3:
            raise ProtocolError(f"helper needs 3 fds, got {len(fds)}")
        self.id = _text(message.get("id"), "id", MAX_ID)
        argv = message.get("argv")
        if not isinstance(argv, list) or len(argv) > MAX_ARGS:
            raise ProtocolError("bad argv")
        self.argv = [_text(arg, "argv", 4096) for arg in argv]
        self.source = _text(message.get("source"), "source")
        self.stdio = fds
        self.fds = fds
        self.pid = 0


class Zygote:
    """The runner's state: the agent's socket, the preload, the running children."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.tasks: dict[int, Task | Helper] = {}  # by child pid
        self.ids: dict[str, int] = {}          # task id -> child pid
        self.preloaded = False
        self.tmpdir: str | None = None
        self.warm_zip: str | None = None       # the preload's zip: written once, never changed
        self.quitting = False
        self.cold_path = list(sys.path)        # a cold `python3 < script` has the same
        self.site_state = _site_state()        # ... as long as what `site` read is the same
        self.coerced = os.environ.get("LC_CTYPE")  # started without LC_*: from coercion
        self.wakeup_r, self.wakeup_w = os.pipe()
        self.poller = select.poll()

    # -- the loop -------------------------------------------------------------------------

    def serve(self) -> Task | Helper | None:
        """Answer the agent until EOF, quit or a malformed message (None), or return the
        Task in a forked child."""
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        signal.signal(signal.SIGCHLD, _on_sigchld)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.poller.register(self.wakeup_r, select.POLLIN)
        self.send({"op": "hello", "pid": self.pid, "python": _version()})
        while not (self.quitting and not self.tasks):
            for fd, _ in self.poller.poll():
                if fd == self.wakeup_r:
                    self.drain_wakeup()
                    self.reap()
                else:
                    task = self.receive()
                    if task is not None:
                        return task
                    if self.quitting:  # no more requests: the socket is read no more
                        self.poller.unregister(self.sock.fileno())
        return None

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self) -> None:
        """Report every child that has ended; never waits for one that has not."""
        while self.tasks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.tasks.pop(pid, None)
            if task is not None:
                self.ids.pop(task.id, None)
                self.send({"op": "exited", "id": task.id, "status": status})

    def receive(self) -> Task | Helper | None:
        """Read one message and act on it; a Task only in a forked child."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        except (ConnectionResetError, BrokenPipeError):
            data, ancdata, flags = b"", [], 0
        fds = _received_fds(ancdata)
        if not data and not fds:
            self.agent_gone()
            return None
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ProtocolError("message too large")
            message = _decode(data)
            return self.dispatch(message, fds)
        except ProtocolError as exc:
            _close(fds)
            log(f"malformed message from the agent ({exc}): quitting")
            self.exit(2)
        return None

    def dispatch(self, message: dict[str, Any], fds: list[int]) -> Task | Helper | None:
        op = message.get("op")
        if op == "run":
            return self.run(Task(message, fds))
        if op == "helper":
            return self.fork(Helper(message, fds))
        if op == "preload":
            self.preload(message, fds)
        elif op == "signal" and not fds:
            self.signal(message)
        elif op == "quit" and not fds:
            self.quitting = True
        else:
            raise ProtocolError(f"unexpected op {op!r} with {len(fds)} fds")
        return None

    def agent_gone(self) -> None:
        """EOF: the agent is gone or done. Children go on (the agent's isolation bounds them);
        they are reaped before this runner exits, so none is left a zombie of it."""
        if self.tasks:
            log(f"the agent closed the socket: waiting for {len(self.tasks)} task(s)")
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        self.exit(0)

    def exit(self, code: int) -> None:
        self.cleanup()
        raise SystemExit(code)

    def cleanup(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            self.sock.sendmsg([data], ancdata)
        except (BrokenPipeError, ConnectionResetError):
            self.agent_gone()

    # -- ops --------------------------------------------------------------------------------

    def signal(self, message: dict[str, Any]) -> None:
        """Signal a task's session (its child is the session leader once it has called
        setsid; before that, the child itself). An ended or unknown task: nothing to do."""
        task_id = _text(message.get("id"), "id", MAX_ID)
        signum = _int(message.get("signal"), "signal", 1, 64)
        pid = self.ids.get(task_id)
        if pid is None:
            return
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        except OSError:
            pass

    def preload(self, message: dict[str, Any], fds: list[int]) -> None:
        """Import the payload zip's loader and JSON profile, then answer preloaded (or
        preload_failed and quit: a half-imported state must not reach any task)."""
        if len(fds) != 1:
            raise ProtocolError(f"preload needs 1 fd, got {len(fds)}")
        profile = message.get("profile", "legacy")
        if not isinstance(profile, str) or not profile.isidentifier() or len(profile) > 64:
            raise ProtocolError("bad profile")
        if self.preloaded or self.tasks:
            raise ProtocolError("preload after preload or run")
        started = time.perf_counter()
        try:
            try:
                entries = self.import_zip(_read_memfd(fds[0]), profile)
            finally:
                _close(fds)
        except Exception as exc:  # whatever the user's site or the zip does
            log(f"preload failed: {type(exc).__name__}: {exc}")
            self.send({"op": "preload_failed",
                       "error": (f"{type(exc).__name__}: {exc}")[:1000]})
            self.quitting = True
            return
        self.preloaded = True
        ms = round((time.perf_counter() - started) * 1000, 1)
        answer = {"op": "preloaded", "ms": ms, "entries": entries}
        if len(json.dumps(answer)) > MAX_MESSAGE:
            self.send({"op": "preload_failed", "error": "too many preloaded modules"})
            self.quitting = True
            return
        self.send(answer)

    def import_zip(self, data: bytes, profile: str) -> dict[str, list[int]]:
        """Put the zip on sys.path and import what every task of this payload imports first.
        Returns the preloaded members as {name: [crc, size]}."""
        self.tmpdir = tempfile.mkdtemp(prefix=f"marco-runner-{self.pid}-", dir=_tmp_root())
        path = os.path.join(self.tmpdir, "warm.zip")
        self.warm_zip = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
        # The cwd ('' on sys.path) is the user's home here, not a task's: no module from it.
        sys.path[:] = [path] + [p for p in sys.path if p not in ("", ".")]
        try:
            importlib.import_module(LOADER_MODULE)
            for name in PROFILE_MODULES:
                importlib.import_module(name % profile)
        finally:
            sys.path[:] = self.cold_path
        _check_preload_state()
        entries: dict[str, list[int]] = {}
        for name, module in list(sys.modules.items()):
            where = getattr(module, "__file__", None)
            if not isinstance(where, str) or not where.startswith(path + "/"):
                continue
            info = members.get(where[len(path) + 1:])
            if info is not None:
                entries[info.filename] = [info.CRC, info.file_size]
            if hasattr(module, "__path__"):
                module.__path__ = _SysPathView(name.replace(".", "/"))
        gc.collect()
        gc.freeze()
        return entries

    def run(self, task: Task) -> Task | Helper | None:
        """Fork the task's child. The parent reports it started and forgets its fds; the
        child gets the Task back (returned up to the top level). Declined if a cold
        interpreter would now start with another `sys.path` or site than this runner's."""
        if task.id in self.ids:
            raise ProtocolError(f"task id {task.id!r} is running")
        if _site_state() != self.site_state:
            _close(task.fds)
            log(f"the python site changed since this runner started: task {task.id} declined")
            self.send({"op": "declined", "id": task.id, "reason": "python site changed"})
            self.quitting = True
            return None
        return self.fork(task)

    def fork(self, task: Task | Helper) -> Task | Helper | None:
        """Fork the child of a task or helper: the child gets it back; the parent reports
        `started` (or `exited` alone if the fork failed) and closes its copies of the fds."""
        if task.id in self.ids:
            raise ProtocolError(f"task id {task.id!r} is running")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            # No child: `exited` alone tells the agent the task never started (it runs it
            # the cold way), so nothing is written to the task's pipes; only this runner's
            # copies of their fds are closed.
            _close(task.fds)
            log(f"cannot fork for task {task.id}: {exc.strerror}")
            self.send({"op": "exited", "id": task.id, "status": SETUP_FAILED << 8})
            return None
        if pid == 0:
            self.in_child()
            return task
        _close(task.fds)
        task.pid = pid
        self.tasks[pid] = task
        self.ids[task.id] = pid
        self.send({"op": "started", "id": task.id, "pid": pid})
        return None

    def in_child(self) -> None:
        """First thing in a child: drop the loop's wiring (nothing here may close a task's fd
        later) and undo what the loop changed."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.sock.close()
        _close([self.wakeup_r, self.wakeup_w])
        self.tasks.clear()
        self.ids.clear()
        self.tmpdir = None  # the runner's, removed by the runner only


def _version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def _on_sigchld(signum: int, frame: object) -> None:
    """A Python handler, so that SIGCHLD writes to the wakeup fd; the loop reaps."""


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # Unicode and JSON errors are ValueErrors
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("not an object with an op")
    return message


def _read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > MAX_ZIP:
        raise ValueError(f"the zip has {size} bytes, more than {MAX_ZIP}")
    parts = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _tmp_root() -> str:
    """Where the warm zip goes, without `tempfile.gettempdir()`: it caches its answer, and a
    task's TMPDIR must decide a task's own temporary files."""
    root = os.environ.get("TMPDIR")
    return root if root and os.path.isdir(root) else "/tmp"


def _check_preload_state() -> None:
    """A preload must leave nothing a fork cannot copy or a task must not inherit. (An atexit
    handler a module registers on import, as `logging` does, is one a cold import registers
    too: it stays.)"""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        raise RuntimeError("the preload started a thread")
    tempfile.tempdir = None  # were it computed, from the runner's environment


def _site_dirs() -> list[str]:
    """The directories `site` looked in at start: the user site (whether it existed then or
    not) and the site-packages."""
    site = sys.modules.get("site")
    if site is None:  # -S: no site, nothing of it to change
        return []
    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    if getattr(site, "ENABLE_USER_SITE", False):
        dirs.insert(0, site.getusersitepackages())
    return dirs


def _site_state() -> list[Any]:
    """What decides a cold interpreter's `sys.path` and site hooks, as it is now: for each
    site directory whether it exists, and its `.pth` files and site/user customize modules
    with their mtimes and sizes. (A package added to a directory already on `sys.path` needs
    no new runner: the import system sees it, its caches invalidated in each child.)"""
    state: list[Any] = []
    for where in _site_dirs():
        try:
            names = sorted(name for name in os.listdir(where)
                           if name.endswith(".pth") or name.startswith(CUSTOMIZE))
        except OSError:
            state.append((where, None))
            continue
        entries: list[Any] = []
        for name in names:
            try:
                info = os.stat(os.path.join(where, name))
                entries.append((name, info.st_mtime_ns, info.st_size))
            except OSError:
                entries.append((name, None, None))
        state.append((where, entries))
    return state


# -- the child ----------------------------------------------------------------------------


def _child_setup(zygote: Zygote, task: Task) -> tuple[Any, dict[str, Any]]:
    """Make this fork a cold `python3 < script` of the task; returns the payload's code and
    the fresh `__main__` namespace. Ends the child itself (os._exit) on a setup failure."""
    if task.procs_fd is not None:
        try:
            os.write(task.procs_fd, b"0")
        except OSError as exc:
            _child_fail(task, "marco-agent: cannot join the execution's cgroup: "
                        + str(exc.strerror), SETUP_FAILED)
    os.setsid()
    if task.nproc:
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (task.nproc, task.nproc))
        except (OSError, ValueError) as exc:
            _child_fail(task, f"marco-agent: cannot limit the user's processes: {exc}",
                        SETUP_FAILED)
    _stdio_onto_012(task.stdio)
    os.closerange(3, _max_fd())
    _cold_signals()
    try:
        os.chdir(task.cwd)
    except OSError as exc:
        reason = exc.strerror or "error"
        text = f"marco-agent: cannot change directory to {task.cwd!r}: {reason}\n"
        os.write(2, text.encode("utf-8", "replace"))
        os._exit(CWD_FAILED)
    env = dict(task.env)
    if zygote.coerced is not None and not ({"LC_ALL", "LC_CTYPE", "LANG"} & set(env)):
        env["LC_CTYPE"] = zygote.coerced  # what C-locale coercion adds to a cold interpreter
    os.environ.clear()
    os.environ.update(env)
    if hasattr(time, "tzset"):
        time.tzset()  # a cold interpreter reads TZ at start
    sys.argv[:] = [""]
    if hasattr(sys, "orig_argv"):
        sys.orig_argv = sys.orig_argv[:1]
    sys.path[:] = zygote.cold_path
    _invalidate_caches(zygote.warm_zip)  # what was installed since the runner's imports: seen
    _fresh_stdio()
    payload = _read_all(0)
    try:
        code = compile(payload, "<stdin>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        # A cold interpreter prints a parse error without a traceback and exits 1.
        kind, value, _ = sys.exc_info()
        if value is not None:
            value.__traceback__ = None
        sys.excepthook(kind, value, None)  # type: ignore[arg-type]
        sys.stderr.flush()
        os._exit(1)
    return code, _cold_main_namespace()


def _helper_setup(zygote: Zygote, helper: Helper) -> tuple[Any, dict[str, Any]]:
    """Make this fork what `python3 -I -S -c SOURCE ARGV...` started by the agent as the user
    would be (session, stdio, no other fd, cwd `/`, signals, `sys.argv`); returns the code
    and a fresh `__main__` namespace. The environment is the runner's: the user's clean one,
    as the agent gives the cold helper."""
    os.setsid()
    _stdio_onto_012(helper.stdio)
    os.closerange(3, _max_fd())
    _cold_signals()
    os.chdir("/")
    sys.argv[:] = ["-c"] + helper.argv
    if hasattr(sys, "orig_argv"):
        sys.orig_argv = sys.orig_argv[:1] + ["-I", "-S", "-c", helper.source] + helper.argv
    sys.path[:] = zygote.cold_path
    _fresh_stdio()
    code = compile(helper.source, "<string>", "exec", dont_inherit=True)
    namespace = _cold_main_namespace()
    for name in ("__file__", "__cached__"):  # `-c` names no file
        namespace.pop(name, None)
    return code, namespace


def _invalidate_caches(warm_zip: str | None) -> None:
    """`importlib.invalidate_caches()` but for the finders of the runner's own zip: Python
    3.11's zipimporter re-reads its archive's whole directory on invalidation (one read per
    preloaded package, ~5 ms per task), and that zip never changes after the preload."""
    for finder in sys.meta_path:
        if finder is not importlib.machinery.PathFinder and hasattr(finder, "invalidate_caches"):
            finder.invalidate_caches()
    for name, entry in list(sys.path_importer_cache.items()):
        if entry is None or not os.path.isabs(name):
            # What PathFinder.invalidate_caches drops: relative entries depend on the cwd.
            del sys.path_importer_cache[name]
        elif warm_zip is not None and (name == warm_zip or name.startswith(warm_zip + "/")):
            continue
        elif hasattr(entry, "invalidate_caches"):
            entry.invalidate_caches()
    namespace_path = getattr(importlib.machinery.PathFinder.find_spec, "__globals__", {}).get(
        "_NamespacePath")
    if namespace_path is not None:
        namespace_path._epoch += 1  # as PathFinder.invalidate_caches does (bpo-45703)


def _child_fail(task: Task, text: str, code: int) -> None:
    try:
        os.write(task.stdio[2], (text + "\n").encode("utf-8", "replace"))
    finally:
        os._exit(code)


def _stdio_onto_012(fds: list[int]) -> None:
    """dup2 the task's three fds onto 0, 1, 2 (moved above 2 first: any of them may be a
    low number)."""
    high = [_dup_above(fd, 3) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target)


def _dup_above(fd: int, low: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD, low)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (OSError, ValueError):
        return 65536


def _cold_signals() -> None:
    """Signal dispositions as a cold interpreter has them after start-up."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _fresh_stdio() -> None:
    """New sys.std* objects over the task's fds, made as the interpreter makes them at start
    (the runner's were made for its own fds: /dev/null's seekability, a tty's buffering)."""
    streams: list[io.TextIOWrapper | None] = []
    for fd, old in ((0, sys.__stdin__), (1, sys.__stdout__), (2, sys.__stderr__)):
        if old is None:
            streams.append(None)
            continue
        buffer: Any = open(fd, "rb" if fd == 0 else "wb", -1, closefd=False)
        isatty = buffer.raw.isatty()
        line_buffering = isatty or (fd == 2 and sys.version_info >= (3, 9))
        stream = io.TextIOWrapper(buffer, encoding=old.encoding, errors=old.errors,
                                  newline="\n", line_buffering=line_buffering)
        stream.mode = "r" if fd == 0 else "w"  # type: ignore[misc]
        streams.append(stream)
    sys.stdin = sys.__stdin__ = streams[0]  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = streams[1]  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = streams[2]  # type: ignore[misc]


def _read_all(fd: int) -> bytes:
    """The script, as a cold `python3` reads it: stdin to EOF."""
    parts: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def _cold_main_namespace() -> dict[str, Any]:
    """`__main__`'s dict emptied of the runner's names and filled as a cold interpreter fills
    it for a script read from stdin (in its order)."""
    namespace = sys.modules["__main__"].__dict__
    loader = namespace.get("__loader__")
    builtins = namespace["__builtins__"]
    namespace.clear()
    namespace.update({"__name__": "__main__", "__doc__": None, "__package__": None,
                      "__loader__": loader, "__spec__": None, "__annotations__": {},
                      "__builtins__": builtins, "__file__": "<stdin>", "__cached__": None})
    return namespace


def _task_runner(code: Any, namespace: dict[str, Any]) -> Any:
    """What a child calls to run its task and end: never returns. Self-contained (imports
    inside, no global name), since the child's globals are the task's `__main__` namespace.

    The task ends as a cold interpreter's would, in the same order: an uncaught exception's
    traceback (without this frame), non-daemon threads joined, atexit handlers, the task's own
    objects finalized (its namespace and the modules it imported, then a collection: files it
    left open are flushed and closed), stdio flushed (a failure: status 120), the SystemExit
    status, and death by SIGINT after a KeyboardInterrupt. What it skips is tearing down the
    modules the runner preloaded: that touches every one of their objects, which copies the
    runner's pages into the child (~9,000 page faults, ~25 ms per task)."""
    import sys
    preloaded = set(sys.modules)

    def run() -> None:
        import os
        import signal
        import sys
        interrupted = False
        try:
            try:
                exec(code, namespace)
            finally:
                # A cold interpreter names its script only while it runs.
                namespace.pop("__file__", None), namespace.pop("__cached__", None)
            status = 0
        except SystemExit as exc:
            status = 0
            if exc.code is None:
                pass
            elif isinstance(exc.code, int):
                status = exc.code
            else:
                try:
                    print(exc.code, file=sys.stderr)
                except Exception:
                    pass
                status = 1
        except BaseException:
            kind, value, trace = sys.exc_info()
            interrupted = isinstance(value, KeyboardInterrupt)
            if value is not None and trace is not None:
                # The traceback a cold interpreter prints starts at the script: not here.
                value.__traceback__ = trace.tb_next
            try:
                sys.excepthook(kind, value, value.__traceback__ if value else None)  # type: ignore[arg-type]
            except Exception:
                pass
            del kind, value, trace
            status = 1
        threading = sys.modules.get("threading")
        if threading is not None:
            try:
                threading._shutdown()
            except BaseException:
                pass
        import atexit
        atexit._run_exitfuncs()
        namespace.clear()
        for name in [name for name in sys.modules if name not in preloaded]:
            sys.modules.pop(name, None)
        import gc
        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                status = 120
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            status = 128 + signal.SIGINT
        os._exit(status & 0xFF)

    return run


def _serve() -> Any:
    """The runner's life; returns only in a forked child, with the task to run."""
    fd = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    sock = socket.socket(fileno=fd)
    zygote = Zygote(sock)
    try:
        os.chdir(os.environ.get("HOME") or "/")
    except OSError:
        pass
    try:
        task = zygote.serve()
    except BaseException:
        if os.getpid() == zygote.pid:
            zygote.cleanup()
        raise
    if task is None:
        zygote.exit(0)
        raise AssertionError("unreachable")
    try:
        if isinstance(task, Helper):
            return _task_runner(*_helper_setup(zygote, task))
        return _task_runner(*_child_setup(zygote, task))
    except BaseException as exc:  # never back into the runner's code from a child
        try:
            text = f"marco-agent: the module runner could not start the task: {exc!r}\n"
            os.write(2, text.encode("utf-8", "replace"))
        finally:
            os._exit(SETUP_FAILED)


if __name__ == "__main__":
    _serve()()  # binds no name: the task's namespace is this module's
