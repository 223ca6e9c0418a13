#!/usr/bin/python
# A test module (tests/e2e/test_runner_parity.py): changes everything a module can change in its
# own process (module_utils globals, environment, cwd, sys.path, signal handlers, excepthook,
# warnings, threads, atexit). The next task's marco_probe must see none of it; the atexit file,
# written after the 2 s thread ended, proves this process shut down like a real interpreter.
from __future__ import annotations

import atexit
import os
import random
import signal
import sys
import threading
import time
import uuid

import ansible.module_utils.basic as basic
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common import warnings as common_warnings


def at_exit(atexit_file, thread_file):
    """Runs at interpreter shutdown, after the non-daemon thread was joined."""
    ended = "thread done" if os.path.exists(thread_file) else "thread still running"
    with open(atexit_file, "w") as handle:
        handle.write("atexit ran, " + ended)


def slow(thread_file):
    time.sleep(2)
    with open(thread_file, "w") as handle:
        handle.write("done")


def leave_changes(marker_dir):
    original = basic.AnsibleModule.exit_json

    def exit_json(self, **kwargs):
        return original(self, **kwargs)

    exit_json.marco_patched = True
    basic.AnsibleModule.exit_json = exit_json
    basic.marco_leak = "module A was here"
    common_warnings.warn("left behind by module A")
    os.environ["MARCO_LEAK"] = "1"
    os.chdir(marker_dir)
    sys.path.insert(0, "/marco-leak")
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    sys.excepthook = lambda *args: None
    threading.Thread(target=time.sleep, args=(3600,), name="marco-daemon", daemon=True).start()
    thread_file = os.path.join(marker_dir, "thread.txt")
    threading.Thread(target=slow, args=(thread_file,), name="marco-slow").start()
    atexit.register(at_exit, os.path.join(marker_dir, "atexit.txt"), thread_file)


def main():
    module = AnsibleModule(argument_spec={"marker_dir": {"type": "path", "required": True}})
    leave_changes(module.params["marker_dir"])
    module.exit_json(changed=True, random=random.random(), uuid=uuid.uuid4().hex)


if __name__ == "__main__":
    main()
