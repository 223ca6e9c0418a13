"""Marco as a user installs it: the built wheel (not the checkout, not editable) in a fresh
virtualenv per role, and the Ansible collection marco.fleet from the installed package.

- `[agent]` alone: `marco-agent` starts and serves /v1/health, and neither ansible-core nor
  python-pam is there;
- `[ansible]`: `ansible-galaxy collection install` the collection from the installed package,
  `ansible-doc` lists and documents every plugin from there, and the README's example playbook
  `deploy.yml` runs from a folder outside the checkout against the agent of the `[agent]` venv;
- the collection builds with `ansible-galaxy collection build`; ansible-lint passes on
  playbooks/ offline; the collection's version is marco's.

Bounded: the two venvs are made once for the module (pip from the package index, about 5 s each
with pip's cache, a minute without); the whole module takes about 30-60 s, 240 s at most.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import marco
from marco.tokens import TokenSigner
from tests.support.daemon import listening_port
from tests.support.paths import BIN, ROOT
from tests.support.users import UnixUser
from tests.support.waiting import wait_for

COLLECTION = ROOT / "ansible_plugins" / "ansible_collections" / "marco" / "fleet"
PLUGINS = {("connection", "marco.fleet.marco"), ("inventory", "marco.fleet.marco"),
           ("module", "marco.fleet.marco_deploy"), ("callback", "marco.fleet.marco_runs")}

pytestmark = pytest.mark.timeout(240)


def run(args: Sequence[str | Path], timeout: float = 180, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                         timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    return out


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No variable of this test run (PYTHONPATH, ANSIBLE_*, VIRTUAL_ENV) leaks into a venv."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", **extra}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """World-traversable (the agent runs file helpers with the venv's Python as the user)."""
    path = Path(tempfile.mkdtemp(prefix="marco-packaging-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel, built from a copy of only what pyproject.toml packages (no stale build/)."""
    source = workdir / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("marco", "agent", "controller", "ansible_plugins"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", workdir / "dist", source])
    (built,) = (workdir / "dist").glob("marco-*.whl")
    assert built.name.startswith(f"marco-{marco.__version__}-")
    return built


def venv(workdir: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv (no system site-packages) with the wheel and one role's extra."""
    path = workdir / f"venv-{extra}"
    run([sys.executable, "-m", "venv", path])
    run([path / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"{wheel}[{extra}]"], cwd=workdir, env=clean_env(workdir))
    return path


@pytest.fixture(scope="module")
def agent_venv(workdir: Path, wheel: Path) -> Path:
    return venv(workdir, wheel, "agent")


@pytest.fixture(scope="module")
def ansible_venv(workdir: Path, wheel: Path) -> Path:
    return venv(workdir, wheel, "ansible")


@pytest.fixture(scope="module")
def collections(ansible_venv: Path, workdir: Path) -> Path:
    """marco.fleet installed by ansible-galaxy from the installed package's folder."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    python = ansible_venv / "bin" / "python"
    folder = Path(run([python, "-m", "ansible_plugins"], cwd=workdir).stdout.strip())
    assert folder.is_relative_to(ansible_venv) and (folder / "galaxy.yml").is_file()
    path = workdir / "collections"
    run([ansible_venv / "bin" / "ansible-galaxy", "collection", "install", folder, "-p", path],
        cwd=workdir, env=clean_env(home))
    assert (path / "ansible_collections" / "marco" / "fleet" / "MANIFEST.json").is_file()
    return path


def start_agent(agent_venv: Path, workdir: Path,
                secret_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The packaged agent on any free port: it writes the port it got to its state dir."""
    home = Path(tempfile.mkdtemp(prefix="agent-", dir=workdir))
    os.chmod(home, 0o755)  # as world-traversable as `workdir`
    state, log_path = home / "state", home / "agent.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [agent_venv / "bin" / "marco-agent", "--dev", "--bind", "127.0.0.1", "--port", "0",
         "--secret-file", secret_file, "--state-dir", state, "--node-name", "packaged",
         "--no-announce"], cwd=workdir, env=clean_env(workdir), stdout=log,
        stderr=subprocess.STDOUT)

    def running() -> None:
        if process.poll() is not None:
            raise AssertionError(log_path.read_text())

    def reported() -> int | None:
        running()
        return listening_port(state, process.pid)

    port: int = wait_for(reported, timeout=30, what="the packaged agent's listening.json")

    def healthy() -> bool:
        running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as answer:
                return bool(json.load(answer))
        except OSError:
            return False

    wait_for(healthy, timeout=30, what="the packaged agent's /v1/health")
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def test_agent_extra_runs_the_agent_without_ansible(agent_venv: Path, workdir: Path,
                                                   secret_file: Path) -> None:
    python = agent_venv / "bin" / "python"
    installed = {line.split("==")[0].lower() for line in
                 run([python, "-m", "pip", "freeze", "--all"]).stdout.split()}
    assert {"marco", "tornado", "psutil", "zeroconf", "itsdangerous", "cryptography"} <= installed
    assert not installed & {"ansible-core", "python-pam", "jinja2", "pyyaml"}, installed
    missing = run([python, "-c", "import ansible"], check=False, cwd=workdir)
    assert missing.returncode != 0 and "No module named 'ansible'" in missing.stderr
    # The package, not the checkout (a venv without system site-packages, run outside ROOT).
    where = run([python, "-c", "import agent; print(agent.__file__)"], cwd=workdir).stdout
    assert where.startswith(str(agent_venv)), where
    assert "--node-name" in run([agent_venv / "bin" / "marco-agent", "--help"], cwd=workdir).stdout
    process, _ = start_agent(agent_venv, workdir, secret_file)
    stop(process)


def test_collection_from_the_installed_package_documents_every_plugin(
        ansible_venv: Path, collections: Path, workdir: Path) -> None:
    env = clean_env(workdir / "home", ANSIBLE_COLLECTIONS_PATH=str(collections))
    doc = ansible_venv / "bin" / "ansible-doc"
    listed = run([doc, "-l", "-t", "connection"], cwd=workdir, env=env).stdout
    assert re.search(r"^marco\.fleet\.marco\s", listed, re.M), listed
    installed = collections / "ansible_collections" / "marco" / "fleet"
    for kind, name in sorted(PLUGINS):
        out = run([doc, "-t", kind, name], cwd=workdir, env=env).stdout
        assert str(installed / "plugins") in out and "Marco" in out, out
    collection = run([doc, "-l", "marco.fleet"], cwd=workdir, env=env).stdout
    assert "marco.fleet.marco_deploy" in collection
    # The inventory plugin loads (its logic imported from the installed package) and says
    # what it lacks.
    source = workdir / "nothing.marco.yml"
    source.write_text("plugin: marco.fleet.marco\n")
    inventory = run([ansible_venv / "bin" / "ansible-inventory", "-i", source, "--list"],
                    check=False, cwd=workdir, env=env)
    assert "mdns_interfaces" in inventory.stderr, inventory.stderr


def test_example_playbook_runs_outside_the_checkout(
        agent_venv: Path, ansible_venv: Path, collections: Path, workdir: Path,
        secret_file: Path, signer: TokenSigner, alice: UnixUser) -> None:
    """deploy.yml (marco.fleet.marco_deploy through the marco.fleet.marco connection) from a
    folder of its own: the packaged collection against the packaged agent."""
    project = workdir / "project"
    (project / "files").mkdir(parents=True)
    shutil.copy(ROOT / "playbooks" / "deploy.yml", project)
    shutil.copy(ROOT / "playbooks" / "files" / "hello-build.sh", project / "files")
    process, port = start_agent(agent_venv, workdir, secret_file)
    try:
        (project / "hosts.ini").write_text(
            f"packaged ansible_connection=marco.fleet.marco ansible_host=127.0.0.1 "
            f"ansible_port={port} marco_tls=false\n")
        env = clean_env(workdir / "home", ANSIBLE_COLLECTIONS_PATH=str(collections),
                        MARCO_TOKEN=signer.issue(alice.name))
        out = run([ansible_venv / "bin" / "ansible-playbook", "-i", "hosts.ini", "deploy.yml",
                   "-e", "step_seconds=0"], cwd=project, env=env, check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        assert re.search(r"packaged\s+:\s+ok=3\s+changed=\d+\s+unreachable=0\s+failed=0",
                         out.stdout)
        assert "last line: done" in out.stdout
        built = Path(alice.home) / "marco-demo" / "packaged" / "hello-build.sh"
        assert built.stat().st_uid == alice.uid
    finally:
        stop(process)


def test_ansible_galaxy_builds_the_collection(tmp_path: Path) -> None:
    out = run([BIN / "ansible-galaxy", "collection", "build", COLLECTION, "--output-path",
               tmp_path], env=clean_env(tmp_path))
    (tarball,) = tmp_path.glob("marco-fleet-*.tar.gz")
    assert tarball.name == f"marco-fleet-{marco.__version__}.tar.gz", out.stdout
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {"MANIFEST.json", "meta/runtime.yml", "plugins/connection/marco.py",
            "plugins/inventory/marco.py", "plugins/action/marco_deploy.py",
            "plugins/modules/marco_deploy.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # ... and installs from the tarball.
    run([BIN / "ansible-galaxy", "collection", "install", tarball, "-p", tmp_path / "c"],
        env=clean_env(tmp_path))
    listed = run([BIN / "ansible-doc", "-l", "-t", "connection"],
                 env=clean_env(tmp_path, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "c"))).stdout
    assert "marco.fleet.marco" in listed


def test_one_version() -> None:
    galaxy = (COLLECTION / "galaxy.yml").read_text()
    assert re.search(rf"^version: {re.escape(marco.__version__)}$", galaxy, re.M), (
        "galaxy.yml's version must be marco.__version__")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_ansible_lint_passes_on_the_example_playbooks(tmp_path: Path) -> None:
    """Offline (playbooks/.ansible-lint): in a network namespace of its own when we may."""
    command = [str(BIN / "ansible-lint"), "--nocolor"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        command = ["unshare", "--net", *command]  # proves it needs no network
    out = run(command, cwd=ROOT / "playbooks", env=clean_env(tmp_path), check=False, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
