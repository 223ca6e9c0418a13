"""Log out everywhere: a user's older tokens are refused by the controller and every agent,
also agents that were down when it happened, and across agent restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from marco.errors import AuthenticationError, TokenRevoked
from marco.tokens import SERVICE_SALT, TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.controller_process import ControllerProcess
from tests.support.http import call, login_cookie
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


def one_node(start_agent: Callable[..., AgentProcess],
             start_controller: Callable[..., ControllerProcess],
             name: str) -> tuple[AgentProcess, ControllerProcess]:
    """An agent and a controller that knows it as a static node (no zeroconf)."""
    agent = start_agent(node_name=name)
    controller = start_controller(extra_args=["--no-discovery", "--node",
                                              f"{name}={agent.host}:{agent.port}"])
    return agent, controller


def wait_until_up(controller: ControllerProcess, token: str) -> None:
    wait_for(lambda: controller.get_json("/api/nodes", token)["nodes"][0]["alive"],
             what="node up")


def test_log_out_everywhere(start_agent, start_controller, signer: TokenSigner,
                            alice: UnixUser, bob: UnixUser, tmp_path: Path) -> None:
    up = start_agent(node_name="rv-up")
    down = start_agent(node_name="rv-down")
    nodes = [arg for a in (up, down) for arg in ("--node", f"{a.node_name}={a.host}:{a.port}")]
    controller = start_controller(extra_args=["--no-discovery", *nodes])
    old = signer.issue(alice.name)
    bobs = signer.issue(bob.name)
    wait_for(lambda: len(controller.get_json("/api/inventory", old)["_meta"]["hostvars"]) == 2,
             what="nodes up")
    down.stop()  # this one misses the revocation
    time.sleep(1.1)  # tokens carry whole seconds: the revocation is for tokens before this one

    status, body = call(controller, "POST", "/api/revoke", {}, old)
    assert status == 200 and body["user"] == alice.name
    assert body["nodes"]["rv-up"]["ok"] is True
    # Old tokens: refused by the agent (with a clear reason) and by the controller.
    with pytest.raises(TokenRevoked, match="log in again"):
        up.client(old).executions()
    status, _ = call(controller, "GET", "/api/nodes", token=old)
    assert status == 401
    # New logins work; other users are not touched.
    time.sleep(1.1)
    fresh = signer.issue(alice.name)
    assert up.client(fresh).run(["true"]).rc == 0
    assert up.client(bobs).run(["true"]).rc == 0

    # The agent that was down learns it when it comes back.
    back = down.restarted()
    try:
        def refused() -> bool:
            try:
                back.client(old).executions()
            except TokenRevoked:
                return True
            return False
        wait_for(refused, what="the returning agent to refuse the old token")
    finally:
        back.stop()
    # ... and keeps it across its own restart.
    again = down.restarted()
    try:
        with pytest.raises(TokenRevoked):
            again.client(old).executions()
    finally:
        again.stop()


def test_only_the_controller_can_push_revocations(start_agent, signer: TokenSigner,
                                                  alice: UnixUser) -> None:
    import json
    agent = start_agent()
    secret = signer._serializer.secret_keys
    forged = [signer.issue(alice.name),                              # a user token
              TokenSigner(b"z" * 40, salt=SERVICE_SALT).issue("controller"),  # another secret
              TokenSigner(secret, salt=SERVICE_SALT).issue("alice")]  # service salt, wrong name
    for token in forged:
        conn = agent.connection(timeout=10)
        conn.request("PUT", "/v1/revocations", body=json.dumps({"revocations": {alice.name: 4e9}}),
                     headers={"Authorization": f"Bearer {token}"})
        assert conn.getresponse().status == 401
        conn.close()
    # A real service token (any node holds the secret) from a certificate that is not the
    # controller's: refused too.
    conn = agent.connection(timeout=10)
    conn.request("PUT", "/v1/revocations", body=json.dumps({"revocations": {alice.name: 4e9}}),
                 headers={"Authorization": "Bearer "
                          + TokenSigner(secret, salt=SERVICE_SALT).issue("controller")})
    assert conn.getresponse().status == 403
    conn.close()
    assert agent.client(signer.issue(alice.name)).run(["true"]).rc == 0


def test_page_and_cli_log_out_everywhere(start_agent, start_controller, signer: TokenSigner,
                                         alice: UnixUser, tmp_path: Path) -> None:
    agent, controller = one_node(start_agent, start_controller, "rv-cli")
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "MARCO_CONTROLLER": controller.url}
    marco = str(Path(sys.executable).parent / "marco")
    login = subprocess.run([marco, "login", "--user", alice.name, "--password-stdin",
                            "--ca", str(controller.ca_file)],
                           input=alice.password + "\n", env=env, capture_output=True, text=True)
    assert login.returncode == 0, login.stderr
    stored = (home / ".config" / "marco" / "token").read_text().strip()
    cookie = login_cookie(controller, alice)
    time.sleep(1.1)
    out = subprocess.run([marco, "logout", "--everywhere"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr
    assert not (home / ".config" / "marco" / "token").exists()
    with pytest.raises(AuthenticationError):
        agent.client(stored).executions()
    conn = controller.connection(timeout=10)
    conn.request("GET", "/api/session", headers={"Cookie": cookie})
    assert conn.getresponse().status == 401  # the browser session ended too


def test_plain_logout_voids_that_token_only(start_agent, start_controller,
                                           signer: TokenSigner, alice: UnixUser,
                                           tmp_path: Path) -> None:
    """`marco logout` and the page's logout void the token they hold (on the controller and
    pushed to agents, kept across an agent restart); the user's other tokens keep working."""
    agent, controller = one_node(start_agent, start_controller, "lo-cli")
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "MARCO_CONTROLLER": controller.url,
           "MARCO_TLS_CA": str(controller.ca_file)}
    marco = str(Path(sys.executable).parent / "marco")
    login = subprocess.run([marco, "login", "--user", alice.name, "--password-stdin"],
                           input=alice.password + "\n", env=env, capture_output=True, text=True)
    assert login.returncode == 0, login.stderr
    stored = (home / ".config" / "marco" / "token").read_text().strip()
    time.sleep(1.1)  # tokens of one user issued in the same second are the same token
    other = signer.issue(alice.name)
    assert other != stored
    wait_until_up(controller, other)
    assert agent.client(stored).run(["true"]).rc == 0
    out = subprocess.run([marco, "logout"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "your token is void" in out.stdout, out.stdout + out.stderr
    assert not (home / ".config" / "marco" / "token").exists()
    assert not (home / ".config" / "marco" / "client.key").exists()
    with pytest.raises(TokenRevoked, match="logged out"):
        agent.client(stored).executions()
    status, _ = call(controller, "GET", "/api/nodes", token=stored)
    assert status == 401
    assert agent.client(other).run(["true"]).rc == 0  # only that token
    # The page's logout: that session's cookie stops working, the other token does not.
    time.sleep(1.1)  # a login in the second `other` was issued in would get that same token
    cookie = login_cookie(controller, alice)
    conn = controller.connection(timeout=10)
    xsrf = cookie.split("_xsrf=")[1]
    conn.request("POST", "/logout", body=f"_xsrf={xsrf}",
                 headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    assert conn.getresponse().status == 302
    conn = controller.connection(timeout=10)
    conn.request("GET", "/api/session", headers={"Cookie": cookie})
    assert conn.getresponse().status == 401
    # An agent restarted later still refuses the logged-out token (kept on disk).
    agent.stop()
    again = agent.restarted()
    try:
        with pytest.raises(TokenRevoked):
            again.client(stored).executions()
        assert again.client(other).run(["true"]).rc == 0
    finally:
        again.stop()


def test_revoke_cert_reaches_agents_through_the_controller(start_agent, start_controller,
                                                          signer: TokenSigner, alice: UnixUser,
                                                          pki, tmp_path: Path,
                                                          secret_file: Path) -> None:
    """`marco-controller revoke-cert NAME` beside a running controller: the controller pushes
    the new CRL to every agent, which refuses that certificate within seconds; nobody copies
    files by hand."""
    from marco.client import AgentClient
    from marco.errors import CertificateRefused
    from marco.tls import ClientTls

    agent, controller = one_node(start_agent, start_controller, "crl-push")
    bundle = pki.issue("stolen-laptop", "client", out_dir=tmp_path / "laptop")
    laptop = ClientTls(str(pki.ca_file), str(bundle.cert_file), str(bundle.key_file))
    token = signer.issue(alice.name)
    assert AgentClient(agent.host, agent.port, token, tls=laptop, node="crl-push").run(
        ["true"]).rc == 0
    wait_until_up(controller, token)
    out = subprocess.run([sys.executable, "-m", "controller", "--pki-dir", str(pki.dir),
                          "--secret-file", str(secret_file), "revoke-cert",
                          "stolen-laptop"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    def refused() -> bool:
        try:
            AgentClient(agent.host, agent.port, token, tls=laptop, node="crl-push").health()
        except CertificateRefused:
            return True
        return False

    wait_for(refused, timeout=20, what="the agent refusing the revoked certificate")
    assert "pushing the new CRL to 1 node" in controller.log()
    assert agent.client(token).run(["true"]).rc == 0  # other certificates still work


def test_another_spelling_of_a_logged_out_token_stays_refused(start_agent, start_controller,
                                                              signer: TokenSigner,
                                                              alice: UnixUser) -> None:
    """A logged-out token respelled (its last base64 characters changed to ones that decode the
    same) is refused by the controller's API and the agent's HTTP API and stream."""
    import asyncio

    from tests.support.tokens import equivalent_spellings
    agent, controller = one_node(start_agent, start_controller, "lo-spell")
    token = signer.issue(alice.name)
    wait_until_up(controller, token)
    status, body = call(controller, "POST", "/api/logout", {}, token)
    assert status == 200 and body["nodes"]["lo-spell"]["ok"] is True, body
    spellings = equivalent_spellings(token)
    assert spellings
    for spelling in [token, *spellings]:
        assert call(controller, "GET", "/api/session", token=spelling)[0] == 401, spelling
        status, _ = call(controller, "POST", "/api/run",
                         {"nodes": ["lo-spell"], "command": "true"}, spelling)
        assert status == 401, spelling
        with pytest.raises(AuthenticationError):
            agent.client(spelling).executions()

        async def stream(spelling: str = spelling) -> None:
            await agent.async_client(spelling).stream().connect()
        with pytest.raises(AuthenticationError):
            asyncio.run(stream())


def test_log_out_everywhere_voids_tokens_of_the_same_second(start_agent, start_controller,
                                                            signer: TokenSigner,
                                                            alice: UnixUser) -> None:
    """Tokens carry whole seconds: "log out everywhere" voids those issued in its own second
    (the caller's among them), and a login in that second still gets a working token."""
    agent, controller = one_node(start_agent, start_controller, "rv-same")
    probe = signer.issue(alice.name)
    wait_until_up(controller, probe)
    time.sleep(1.05 - time.time() % 1)  # just past a second boundary: the next steps share it
    token = signer.issue(alice.name)
    status, body = call(controller, "POST", "/api/revoke", {}, token)
    assert status == 200 and body["nodes"]["rv-same"]["ok"] is True, body
    assert call(controller, "GET", "/api/nodes", token=token)[0] == 401
    with pytest.raises(TokenRevoked):
        agent.client(token).executions()
    status, fresh = call(controller, "POST", "/api/token",
                         {"user": alice.name, "password": alice.password})
    assert status == 200
    assert agent.client(fresh["token"]).run(["true"]).rc == 0
    assert call(controller, "GET", "/api/nodes", token=fresh["token"])[0] == 200


def refusal(agent: AgentProcess, token: str) -> type[Exception] | None:
    """The class of the agent's refusal of `token`, None if it is accepted."""
    try:
        agent.client(token).executions()
    except AuthenticationError as error:
        return type(error)
    return None


def test_a_logged_out_tokens_entry_is_dropped_after_its_expiry(start_agent, start_controller,
                                                               secret_file: Path,
                                                               alice: UnixUser,
                                                               bob: UnixUser) -> None:
    """The deny lists keep a logged-out token only until it would have expired anyway; past
    that the token is refused as expired (the agent says so; the controller refuses it)."""
    # Imported here: the top of this file is shared with other work in progress.
    import json

    from marco.errors import TokenExpired
    from marco.revocations import token_digest
    from marco.tokens import load_secret

    short = ["--token-max-age", "3"]
    agent = start_agent(node_name="dl-expiry", extra_args=short)
    controller = start_controller(extra_args=["--no-discovery", "--node",
                                              f"dl-expiry={agent.host}:{agent.port}", *short])
    signer = TokenSigner(load_secret(secret_file), max_age=3)
    first = signer.issue(alice.name)
    wait_until_up(controller, first)
    status, body = call(controller, "POST", "/api/logout", {}, first)
    assert status == 200 and body["nodes"]["dl-expiry"]["ok"] is True, body
    args = controller.process.args
    assert isinstance(args, list)
    lists = [agent.state_dir / "denied-tokens.json",
             Path(args[args.index("--state-dir") + 1]) / "denied-tokens.json"]

    def listed() -> list[set[str]]:
        return [set(json.loads(path.read_text())) for path in lists]

    assert listed() == [{token_digest(first)}] * 2
    assert refusal(agent, first) is TokenRevoked
    wait_for(lambda: refusal(agent, first) is TokenExpired, timeout=15,
             what="the logged-out token to pass its own expiry")
    # The next change of the lists (another logout) drops the entry that outlived its token.
    second = signer.issue(bob.name)
    status, body = call(controller, "POST", "/api/logout", {}, second)
    assert status == 200 and body["nodes"]["dl-expiry"]["ok"] is True, body
    assert listed() == [{token_digest(second)}] * 2
    assert refusal(agent, first) is TokenExpired  # still refused: as expired
    status, _ = call(controller, "GET", "/api/nodes", token=first)
    assert status == 401  # the controller answers every refusal with "log in first"
