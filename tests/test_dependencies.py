"""The dependency rule of ARCHITECTURE.md, checked on the source (ast), not by convention.

marco (the shared library) <- agent, marco <- controller, marco <- ansible_plugins; marco imports
none of the three; agent and controller never import each other; only ansible_plugins imports
ansible; only marco/discovery.py and agent/announce.py import zeroconf. Importing a package does
no work (no sockets, threads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("marco", "agent", "controller", "ansible_plugins")
# What each package may import of the project's own packages.
ALLOWED = {
    "marco": set(),
    "agent": {"marco"},
    "controller": {"marco"},
    "ansible_plugins": {"marco"},
}
ZEROCONF_USERS = {"agent/announce.py", "marco/discovery.py"}
ANSIBLE_USERS = {"ansible_plugins"}


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute module names imported by one file (relative imports resolved from `root`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
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


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_the_rule_allows(package: str) -> None:
    files = sources(package)
    assert files, f"{package} package not found"
    for path in files:
        own = {top(n) for n in imports_of(path)} & set(PACKAGES)
        bad = own - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_ansible_side_imports_ansible() -> None:
    for package in PACKAGES:
        for path in sources(package):
            if any(top(n) == "ansible" for n in imports_of(path)):
                assert package in ANSIBLE_USERS, path


def test_only_announce_and_discovery_import_zeroconf() -> None:
    for package in PACKAGES:
        for path in sources(package):
            if any(top(n) == "zeroconf" for n in imports_of(path)):
                assert str(path.relative_to(ROOT)) in ZEROCONF_USERS, path


def test_the_dependency_checker_sees_violations(tmp_path: Path) -> None:
    """The checker itself must catch a bad import, or the tests above prove nothing."""
    fake = tmp_path / "marco" / "_dependency_probe.py"
    fake.parent.mkdir()
    fake.write_text("from agent import executions\nfrom ..controller import x\n")
    names = imports_of(fake, root=tmp_path)
    assert {"agent", "agent.executions", "controller", "controller.x"} <= names
    assert {top(n) for n in names} & set(PACKAGES) - ALLOWED["marco"] - {"marco"}


@pytest.mark.parametrize("package", ["marco", "agent", "controller"])
def test_importing_does_no_work(package: str) -> None:
    """Importing every module opens no socket, file or thread."""
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sources(package)
               if p.stem not in {"__init__", "__main__"}]
    probe = (
        "import os, threading, sys\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        f"for name in {modules!r}: __import__(name)\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "print(len(after - before), threading.active_count())\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["0", "1"], f"new fds, threads after import: {out}"
