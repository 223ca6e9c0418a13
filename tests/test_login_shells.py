"""Accounts without a login shell (nologin, false, or a shell not in /etc/shells) get nothing
from Marco: no login at the controller, no execution on an agent; the `login_shells` setting
admits other shells. Real users, real PAM, real agent and controller processes."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest

from marco.errors import PermissionDenied
from marco.tokens import TokenSigner
from tests.support.http import call
from tests.support.run import RunNames, this_run
from tests.support.users import UnixUser, create_user, remove_user

ODD_SHELL = str(this_run().local_bin("shell"))  # not in /etc/shells


@pytest.fixture
def carol(run: RunNames) -> Iterator[UnixUser]:
    user = create_user(run.user("carol"))
    yield user
    remove_user(user.name)


def set_shell(user: UnixUser, shell: str) -> None:
    subprocess.run(["usermod", "--shell", shell, user.name], check=True)


@pytest.mark.parametrize("shell", ["/usr/sbin/nologin", "/bin/false",
                                   pytest.param(ODD_SHELL, id="not-in-etc-shells"), "/bin/rbash"])
def test_no_login_shell_no_login_and_no_execution(start_agent, start_controller,
                                                  signer: TokenSigner, carol: UnixUser,
                                                  shell: str) -> None:
    agent = start_agent(node_name="nologin")
    controller = start_controller(extra_args=["--no-discovery"])
    token = signer.issue(carol.name)
    assert agent.client(token).run(["true"]).rc == 0  # a login shell: served
    set_shell(carol, shell)
    status, body = call(controller, "POST", "/api/token",
                        {"user": carol.name, "password": carol.password})
    # Like a wrong password (no oracle for the password of a closed account); the log says why.
    assert status == 401 and body["message"] == "wrong user name or password", body
    assert "no login shell" in controller.log()
    with pytest.raises(PermissionDenied, match="no login shell"):
        agent.client(token).run(["true"])

    async def stream() -> None:
        await agent.async_client(token).stream().connect()
    with pytest.raises(PermissionDenied, match="no login shell"):
        asyncio.run(stream())


def test_login_shells_setting_admits_a_shell(start_agent, start_controller,
                                             signer: TokenSigner, carol: UnixUser) -> None:
    set_shell(carol, ODD_SHELL)
    agent = start_agent(node_name="oddshell", extra_args=["--login-shells", ODD_SHELL])
    controller = start_controller(extra_args=["--no-discovery", "--login-shells", ODD_SHELL])
    status, body = call(controller, "POST", "/api/token",
                        {"user": carol.name, "password": carol.password})
    assert status == 200, body
    # Executions run argv directly (or /bin/sh -c), never the account's shell.
    assert agent.client(body["token"]).run(["id", "-un"]).stdout.strip() == carol.name.encode()
    # nologin and false stay refused whatever the list says.
    set_shell(carol, "/usr/sbin/nologin")
    nologin = start_agent(node_name="nologin2", extra_args=["--login-shells", "/usr/sbin/nologin"])
    with pytest.raises(PermissionDenied, match="no login shell"):
        nologin.client(body["token"]).run(["true"])
