"""Real pipelined AnsiballZ payloads, built in this process by ansible-core as a controller
builds them (module_common.modify_module), and payloads with one zip member changed."""

from __future__ import annotations

import base64
import functools
import io
import json
import zipfile
from typing import Any

MARKER = b'\nif __name__ == "__main__":\n    _ansiballz_main(\n'
PIPELINED = "/bin/sh -c '/usr/bin/python3 && sleep 0'"


@functools.cache
def _plugin_loader() -> None:
    """ansible-core's collection finder, configured once per process (it warns after)."""
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader()


@functools.cache
def _built(module: str, args_json: str, interpreter: str) -> bytes:
    from ansible.executor.module_common import modify_module
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import module_loader
    from ansible.template import Templar

    _plugin_loader()
    path = module_loader.find_plugin(module)
    assert path, f"ansible-core has no module {module!r}"
    built = modify_module(module_name=module, module_path=path,
                          module_args=json.loads(args_json),
                          templar=Templar(loader=DataLoader()),
                          task_vars={"ansible_python_interpreter": interpreter},
                          module_compression="ZIP_DEFLATED")
    return built.b_module_data


def module_payload(module: str, args: dict[str, Any],
                   interpreter: str = "/usr/bin/python3") -> bytes:
    """The payload ansible-playbook pipes to `INTERPRETER` for `module` with `args`."""
    return _built(module, json.dumps(args, sort_keys=True), interpreter)


def _zip_span(payload: bytes) -> tuple[int, int]:
    start = payload.index(b"zip_data='", payload.rindex(MARKER)) + len(b"zip_data='")
    return start, payload.index(b"'", start)


def replace_member(payload: bytes, name: str, change: bytes) -> bytes:
    """`payload` whose zip member `name` has `change` appended (a new CRC and size), as a
    different ansible-core's would."""
    start, end = _zip_span(payload)
    old = zipfile.ZipFile(io.BytesIO(base64.b64decode(payload[start:end])))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info, data + change if info.filename == name else data)
    return payload[:start] + base64.b64encode(out.getvalue()) + payload[end:]
