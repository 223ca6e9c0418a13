"""A controller with two agents it has discovered by zeroconf on loopback."""

from __future__ import annotations

import pytest

from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


@pytest.fixture
def cluster(start_controller, start_agent, signer: TokenSigner, alice: UnixUser,
            unique_name) -> tuple[ControllerProcess, list[str]]:
    controller = start_controller()
    names = [unique_name("node"), unique_name("node")]
    for name in names:
        start_agent(node_name=name, announce=True, extra_args=["--groups", "lab"])
    token = signer.issue(alice.name)
    wait_for(lambda: set(names) <= set(controller.get_json("/api/inventory", token)["_meta"]["hostvars"]),
             what="both agents discovered")
    return controller, names
