"""Shared by the tests of one module (they only read it or act as their own users: nobody logs
out everywhere here): a controller with two agents it has discovered by zeroconf on loopback
(`cluster`), one with a single agent (`one_agent`), and chromium (`browser`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.browser import launch
from tests.support.controller_process import ControllerProcess
from tests.support.daemon import stop_all
from tests.support.names import unique_node_name
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def cluster(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
            alice: UnixUser, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[ControllerProcess, list[str]]]:
    workdir = tmp_path_factory.mktemp("cluster")
    names = [unique_node_name("node"), unique_node_name("node")]
    daemons: list[AgentProcess | ControllerProcess] = []
    try:
        controller = ControllerProcess(secret_file, workdir, pam_service=pam_service, pki=pki)
        daemons.append(controller)
        for name in names:
            daemons.append(AgentProcess(secret_file, workdir / name / "state", node_name=name,
                                        announce=True, extra_args=["--groups", "lab"], pki=pki))
        token = signer.issue(alice.name)
        wait_for(lambda: set(names) <= set(controller.inventory_hosts(token)),
                 what="both agents discovered")
        yield controller, names
    finally:
        stop_all(daemons)


@pytest.fixture(scope="module")
def one_agent(secret_file: Path, pki: TestPki, pam_service: str, signer: TokenSigner,
              alice: UnixUser, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[tuple[ControllerProcess, AgentProcess]]:
    """A controller and one agent it discovers (the agent itself is given: a test may start
    executions on it directly, tagged as the marco connection plugin tags them)."""
    workdir = tmp_path_factory.mktemp("one-agent")
    daemons: list[AgentProcess | ControllerProcess] = []
    try:
        controller = ControllerProcess(secret_file, workdir, pam_service=pam_service, pki=pki)
        daemons.append(controller)
        name = unique_node_name("node")
        agent = AgentProcess(secret_file, workdir / name / "state", node_name=name,
                             announce=True, pki=pki)
        daemons.append(agent)
        token = signer.issue(alice.name)
        wait_for(lambda: agent.node_name in controller.inventory_hosts(token),
                 what="the agent discovered")
        yield controller, agent
    finally:
        stop_all(daemons)


@pytest.fixture(scope="module")
def browser(pki: TestPki) -> Iterator[Any]:
    """Chromium (Debian's, through Playwright) that trusts the test controller's certificate,
    one per module of the web tests."""
    with sync_playwright() as playwright:
        chromium = launch(playwright, trust=pki.controller_cert)
        yield chromium
        chromium.close()
