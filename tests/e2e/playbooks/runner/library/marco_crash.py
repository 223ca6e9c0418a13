#!/usr/bin/python
# A test module (tests/e2e/test_runner_parity.py): ends the ways a module can end badly.
from __future__ import annotations

import os
import sys

from ansible.module_utils.basic import AnsibleModule

HOW = ("fail_json", "raise", "segfault", "exit3", "sys_exit", "no_json")


def main():
    module = AnsibleModule(argument_spec={"how": {"type": "str", "required": True, "choices": HOW}})
    how = module.params["how"]
    if how == "fail_json":
        module.fail_json(msg="refused: ünïcode 'quoted'", detail={"code": 42})
    if how == "raise":
        raise RuntimeError("boom from the module: ünï")
    if how == "segfault":
        import ctypes
        sys.stdout.flush()
        ctypes.string_at(0)
    if how == "exit3":
        sys.stdout.write("partial output, no JSON\n")
        sys.stdout.flush()
        os._exit(3)
    if how == "sys_exit":
        sys.exit("bye from the module: ünï")
    print("this is not JSON")


if __name__ == "__main__":
    main()
