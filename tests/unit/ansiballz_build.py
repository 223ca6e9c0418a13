"""Builds real AnsiballZ payloads and the shell strings ansible-core 2.19 sends with them.

Run as a script by tests/unit/test_ansiballz.py (`python ansiballz_build.py OUTDIR`), so the
collection loader ansible installs into the importing process stays out of pytest's. Writes
OUTDIR/NAME.payload for each payload and OUTDIR/shells.json (NAME -> shell string), each shell
string made the way `ActionBase._low_level_execute_command` makes it: the sh shell plugin's
`env_prefix` and `build_module_command`, the become plugin, `&& sleep 0` and `/bin/sh -c`.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

MODULES = ("command", "copy", "file", "stat", "setup")
PYTHON = "/usr/bin/python3"
TMP = "/root/.ansible/tmp/ansible-tmp-1764512345.67-4242-99"
ENVIRONMENT = {"FOO": "a b", "QUOTE": "it's", "EMPTY": "", "N": "1", "PATH": "/usr/bin:/bin"}
COVERAGE = {"config": "/nonexistent/coveragerc", "output": "/nonexistent/coverage"}
SHELL_MODULE = "#!/bin/sh\necho '{\"changed\": false}'\n"


class Builder:
    """ansible-core's own module builder and shell and become plugins."""

    def __init__(self, out: Path) -> None:
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import init_plugin_loader, shell_loader
        from ansible.template import Templar

        init_plugin_loader([])
        self.out = out
        self.templar = Templar(loader=DataLoader(), variables={})
        self.shell = shell_loader.get("sh")
        self.shell.set_options()

    def payload(self, name: str, module: str, args: dict[str, Any],
                task_vars: dict[str, Any] | None = None, path: str | None = None) -> str:
        """Builds one payload as the action plugin does, writes it, returns its shebang."""
        from ansible.executor.module_common import modify_module
        from ansible.plugins.loader import module_loader

        variables = {"ansible_python_interpreter": PYTHON, **(task_vars or {})}
        module_path = path or module_loader.find_plugin_with_context(module).plugin_resolved_path
        internals = {"_ansible_check_mode": False, "_ansible_no_log": False,
                     "_ansible_debug": False, "_ansible_verbosity": 3,
                     "_ansible_module_name": module, "_ansible_tmpdir": None}
        built = modify_module(module_name=module, module_path=module_path,
                              module_args={**args, **internals}, templar=self.templar,
                              task_vars=variables, module_compression="ZIP_DEFLATED")
        (self.out / f"{name}.payload").write_bytes(built.b_module_data)
        return built.shebang or ""

    def shell_string(self, shebang: str, env: dict[str, str] | None = None, cmd: str = "",
                     become: str | None = None, chdir: str | None = None) -> str:
        """The shell string of `_low_level_execute_command` for a module command."""
        command = self.shell.build_module_command(self.shell.env_prefix(**(env or {})),
                                                  shebang, cmd)
        return self.low_level(command, become, chdir)

    def low_level(self, command: str, become: str | None = None,
                  chdir: str | None = None) -> str:
        from ansible.plugins.loader import become_loader

        if chdir:
            command = self.shell.append_command(f"cd {chdir}", command)
        if become:
            plugin = become_loader.get(become)
            plugin.set_options(direct={"become_user": "nobody"})
            command = plugin.build_become_command(command, self.shell)
        command = self.shell.append_command(command, "sleep 0")
        return "/bin/sh -c " + shlex.quote(command)


def build(out: Path) -> None:
    builder = Builder(out)
    args = {"_raw_params": "echo hi", "path": "/tmp", "src": "/tmp/x", "dest": "/tmp/y"}
    shebang = ""
    for module in MODULES:
        shebang = builder.payload(module, module, args if module != "setup" else {})
    builder.payload("coverage", "command", args,
                    task_vars={"_ansible_ansiballz_coverage_config": COVERAGE})
    env_shebang = builder.payload("env_python", "command", args,
                                  task_vars={"ansible_python_interpreter": "/usr/bin/env python3"})
    args_shebang = builder.payload("python_args", "command", args,
                                   task_vars={"ansible_python_interpreter": f"{PYTHON} -X dev"})
    script = out / "marco_sh_module"
    script.write_text(SHELL_MODULE)
    non_python = builder.payload("non_python", "marco_sh_module", {}, path=str(script))
    module_file = f"{TMP}/AnsiballZ_command.py"
    async_command = " ".join([PYTHON, f"{TMP}/AnsiballZ_async_wrapper.py", "j424242", "45",
                              module_file, "_"])
    shells = {
        "pipelined": builder.shell_string(shebang),
        "environment": builder.shell_string(shebang, ENVIRONMENT),
        "sudo": builder.shell_string(shebang, become="sudo"),
        "su": builder.shell_string(shebang, become="su"),
        "pipelining_off": builder.shell_string(shebang, cmd=module_file),
        "async": builder.low_level(async_command),
        "env_python": builder.shell_string(env_shebang),
        "python_args": builder.shell_string(args_shebang),
        "non_python": builder.shell_string(non_python),
        "chdir": builder.shell_string(shebang, chdir="/tmp"),
        "pythonpath": builder.shell_string(shebang, {"FOO": "1", "PYTHONPATH": "/tmp/lib"}),
        "ld_preload": builder.shell_string(shebang, {"LD_PRELOAD": "/tmp/x.so"}),
        "lang": builder.shell_string(shebang, {"LANG": "C"}),
        "lc_all": builder.shell_string(shebang, {"LC_ALL": "C.UTF-8"}),
        "tz": builder.shell_string(shebang, {"TZ": "Europe/Paris"}),
        "home": builder.shell_string(shebang, {"HOME": "/tmp"}),
        "raw": builder.low_level("echo hi"),
    }
    (out / "shells.json").write_text(json.dumps(shells, indent=1))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
