#!/usr/bin/python
# A test module (tests/e2e/test_runner_parity.py): reports what a module sees of its process
# (environment, cwd, argv, signals, threads, module_utils globals, fds, limits), read before
# AnsibleModule() so nothing of its own start-up hides a change left by an earlier task.
from __future__ import annotations

import atexit
import locale
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import uuid

import ansible.module_utils.basic as basic
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common import warnings as common_warnings

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGCHLD", "SIGUSR1", "SIGUSR2",
           "SIGALRM", "SIGXFSZ")
LIMITS = ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_AS")


def handler_name(handler):
    """A handler as text: SIG_DFL / SIG_IGN / default_int_handler / a function's name."""
    if isinstance(handler, signal.Handlers):
        return handler.name
    return getattr(handler, "__name__", repr(handler))


def read_file(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as handle:
        return handle.read()


def seen_now():
    umask = os.umask(0o022)
    os.umask(umask)
    return {
        "module_util_global": hasattr(basic, "marco_leak"),
        "exit_json_patched": bool(getattr(basic.AnsibleModule.exit_json, "marco_patched", False)),
        "warnings": list(common_warnings.get_warning_messages()),
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "orig_argv": list(getattr(sys, "orig_argv", [])),
        "executable": sys.executable,
        "path_leak": any("marco-leak" in entry for entry in sys.path),
        "signals": {name: handler_name(signal.getsignal(getattr(signal, name))) for name in SIGNALS},
        "excepthook_default": sys.excepthook is sys.__excepthook__,
        "threads": sorted(thread.name for thread in threading.enumerate()),
        "atexit_callbacks": atexit._ncallbacks(),
        "stdout_encoding": sys.stdout.encoding,
        "stderr_encoding": sys.stderr.encoding,
        "filesystem_encoding": sys.getfilesystemencoding(),
        "preferred_encoding": locale.getpreferredencoding(False),
        "tempdir": tempfile.gettempdir(),
        "umask": umask,
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "groups": sorted(os.getgroups()),
        "limits": {name: list(resource.getrlimit(getattr(resource, name))) for name in LIMITS},
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "random": random.random(),
        "uuid": uuid.uuid4().hex,
    }


def main():
    seen = seen_now()
    module = AnsibleModule(argument_spec={"atexit_file": {"type": "str", "default": ""}},
                           supports_check_mode=True)
    seen["atexit_file"] = read_file(module.params["atexit_file"])
    module.exit_json(changed=False, seen=seen)


if __name__ == "__main__":
    main()
