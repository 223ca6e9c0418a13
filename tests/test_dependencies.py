"""The dependency direction of ARCHITECTURE.md, checked on the source (ast), not by convention.

ansible_plugins -> controller, agent;  controller -> agent's public modules;  agent -> stdlib and
third-party only. Only ansible_plugins imports ansible; only agent/announce.py and
controller/discovery.py import zeroconf. Importing a package does no work (no sockets, threads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT_PUBLIC = {"agent", "agent.protocol", "agent.tokens", "agent.client", "agent.errors",
                "agent.settings", "agent.jsonapi", "agent.serving", "agent.revocations",
                "agent.tls", "agent.chunks", "agent.atomic", "agent.shells"}
ZEROCONF_USERS = {"agent/announce.py", "controller/discovery.py"}


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by one file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


def test_agent_imports_nothing_of_controller_or_plugins() -> None:
    files = sources("agent")
    assert files, "agent package not found"
    for path in files:
        bad = {n for n in imports_of(path) if top(n) in {"controller", "ansible_plugins", "ansible"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_controller_uses_only_the_agents_public_modules() -> None:
    for path in sources("controller"):
        names = imports_of(path)
        bad = {n for n in names if top(n) in {"ansible_plugins", "ansible"}}
        private = {n for n in names if top(n) == "agent" and n.count(".") >= 1
                   and (ROOT / "agent" / f"{n.split('.')[1]}.py").exists()
                   and ".".join(n.split(".")[:2]) not in AGENT_PUBLIC}
        assert not bad and not private, f"{path.relative_to(ROOT)} imports {sorted(bad | private)}"


def test_only_announce_and_discovery_import_zeroconf() -> None:
    for package in ("agent", "controller", "ansible_plugins"):
        for path in sources(package):
            if any(top(n) == "zeroconf" for n in imports_of(path)):
                assert str(path.relative_to(ROOT)) in ZEROCONF_USERS, path


def test_the_dependency_checker_sees_violations(tmp_path: Path) -> None:
    """The checker itself must catch a bad import, or the tests above prove nothing."""
    fake = ROOT / "agent" / "_dependency_probe.py"
    fake.write_text("from controller import app\nfrom ..controller import x\n")
    try:
        assert {"controller", "controller.app"} <= imports_of(fake)
        fake.write_text("from agent.executions import ExecutionManager\n")
        names = imports_of(fake)
        assert "agent.executions" in names and "agent.executions" not in AGENT_PUBLIC
    finally:
        fake.unlink()


def test_importing_does_no_work() -> None:
    """Importing every agent module opens no socket, file or thread."""
    modules = [f"agent.{p.stem}" for p in sources("agent") if p.stem != "__init__"]
    probe = (
        "import os, threading, sys\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        f"for name in {modules!r}: __import__(name)\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "print(len(after - before), threading.active_count())\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["0", "1"], f"new fds, threads after import: {out}"
