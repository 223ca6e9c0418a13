"""Fixtures: a cluster secret, real Unix users (alice, bob), real agent processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadGroupScheduling

from marco.tokens import TokenSigner, create_secret, load_secret
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.names import unique_node_name
from tests.support.pki import TestPki
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.run import RunNames, sweep_leftovers, this_run
from tests.support.users import UnixUser, create_user, remove_user, require_root

PAM_TEST_STACK = ("# Marco tests only: pam_unix without the delay on failure, removed after the run.\n"
                  "auth required pam_unix.so nodelay\naccount required pam_unix.so\n")


@pytest.fixture(scope="session")
def run() -> RunNames:
    """The names this run gives machine-global things (users, PAM service, namespaces, ...);
    as root, first removes what runs that died left behind."""
    if os.geteuid() == 0:
        sweep_leftovers()
    return this_run()


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret"
    create_secret(path)
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory, run: RunNames) -> TestPki:
    """The cluster CA every test agent and controller uses (mutual TLS by default); the
    controller's certificate names the run's namespace bridges, where netns tests reach it."""
    return TestPki(tmp_path_factory.mktemp("pki") / "pki", controller_names=run.gateways())


@pytest.fixture(scope="session")
def signer(secret_file: Path) -> TokenSigner:
    return TokenSigner(load_secret(secret_file))


@pytest.fixture(scope="session")
def alice(run: RunNames) -> Iterator[UnixUser]:
    groups = [run.user("g1"), run.user("g2")]
    user = create_user(run.user("alice"), groups=groups)
    yield user
    remove_user(user.name)
    for group in groups:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@pytest.fixture(scope="session")
def bob(run: RunNames) -> Iterator[UnixUser]:
    user = create_user(run.user("bob"))
    yield user
    remove_user(user.name)


@pytest.fixture
def start_agent(secret_file: Path, tmp_path: Path,
                pki: TestPki) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: start real agent processes (mutual TLS unless `pki=None`, which means --dev);
    all are stopped together (SIGTERM) at the end of the test."""
    started: list[AgentProcess] = []

    def start(node_name: str = "test-node", **kwargs: object) -> AgentProcess:
        kwargs.setdefault("pki", pki)
        state = tmp_path / f"state-{node_name}-{len(started)}"
        agent = AgentProcess(secret_file, state, node_name=node_name, **kwargs)  # type: ignore[arg-type]
        started.append(agent)
        return agent

    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def shared_agent(secret_file: Path, tmp_path_factory: pytest.TempPathFactory,
                 alice: UnixUser, bob: UnixUser, pki: TestPki) -> Iterator[AgentProcess]:
    """One root agent for the many tests that need nothing special of it."""
    os.chmod(tmp_path_factory.getbasetemp(), 0o755)
    agent = AgentProcess(secret_file, tmp_path_factory.mktemp("shared") / "state",
                         node_name="shared", pki=pki)
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def pam_service(run: RunNames) -> Iterator[str]:
    """A test-only PAM service: real pam_unix password checks, no 2-3 s delay on failure."""
    require_root()
    path = Path("/etc/pam.d") / run.pam_service
    path.write_text(PAM_TEST_STACK)
    yield run.pam_service
    path.unlink(missing_ok=True)


@pytest.fixture
def start_controller(secret_file: Path, tmp_path: Path, pam_service: str,
                     pki: TestPki) -> Iterator[Callable[..., ControllerProcess]]:
    """Factory: real controller processes (the run's test PAM service, HTTPS and mutual TLS to
    agents unless `pki=None`), stopped after the test."""
    started: list[ControllerProcess] = []

    def start(**kwargs: object) -> ControllerProcess:
        kwargs.setdefault("pam_service", pam_service)
        kwargs.setdefault("pki", pki)
        controller = ControllerProcess(secret_file, tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(controller)
        return controller

    yield start
    stop_all(started)


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Node names unique across tests and concurrent runs (they share the loopback's mDNS)."""
    return unique_node_name


# Fixtures that need root (real users, PAM, daemons running as root), build network namespaces,
# or drive a browser; and the places whose tests are slow on purpose.
ROOT_FIXTURES = {"alice", "bob", "carol", "start_agent", "shared_agent", "start_controller",
                 "pam_service", "crowd", "path_sandbox", "cluster", "fleet", "network", "fuzz_agent"}
NETNS_FIXTURES = {"fleet", "network"}
SLOW_PLACES = ("tests/load/", "tests/e2e/", "tests/test_packaging.py", "tests/agent/test_fuzz.py")
# Places whose tests share an expensive module or session fixture (the e2e fleet, the packaging
# venvs, the browser): under pytest-xdist (`--dist loadgroup`) each runs on one worker. A path
# matches its first place: the thirty-agent test goes before the rest of tests/e2e/ (no fleet).
ONE_WORKER_PLACES = ("tests/e2e/test_many_agents.py", "tests/e2e/", "tests/test_packaging.py",
                     "tests/controller/test_web.py",
                     "tests/controller/test_main_page.py",
                     "tests/controller/test_terminal_page.py",  # three agents and a browser
                     "tests/controller/test_many_nodes_page.py",  # 1,000 simulated agents
                     "tests/controller/test_runs_web.py", "tests/load/")


# First: pytest-xdist's worker reads the xdist_group marks in its own modifyitems hook, called
# before this conftest's otherwise (registered after it), and would find no mark to group by.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it needs, so subsets can be chosen with -m, and keep tests that
    share an expensive fixture on one pytest-xdist worker."""
    root = Path(__file__).resolve().parents[1]
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        place = item.path.resolve().relative_to(root).as_posix()
        if place.startswith("tests/unit/"):
            item.add_marker(pytest.mark.unit)
        if fixtures & ROOT_FIXTURES:
            item.add_marker(pytest.mark.root)
        if fixtures & NETNS_FIXTURES:
            item.add_marker(pytest.mark.netns)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)
        if place.startswith(SLOW_PLACES):
            item.add_marker(pytest.mark.slow)
        for shared in ONE_WORKER_PLACES:
            if place.startswith(shared):
                item.add_marker(pytest.mark.xdist_group(shared))


class PlaceGroupScheduling(LoadGroupScheduling):
    """`--dist loadgroup` keeping each of ONE_WORKER_PLACES on one worker, told by the test's
    path: xdist's own grouping renames each test (`item._nodeid`), which pytest 9.2 ignores
    (pytest-xdist#1386), so the groups were spread over workers (two e2e fleets whose nodes
    e2e1..3 answered each other's mDNS goodbyes)."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return next((place for place in ONE_WORKER_PLACES if path.startswith(place)),
                    super()._split_scope(nodeid))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadGroupScheduling | None:
    """Our scheduler under `--dist loadgroup`; xdist's for any other mode."""
    return PlaceGroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None
