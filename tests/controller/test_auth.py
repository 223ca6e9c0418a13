"""Login with real PAM against real Unix users: right, wrong, rate-limited, unsafe services."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from typing import Any

import pytest

from controller.auth import LoginRateLimiter, PamAuthenticator, TooManyAttempts, check_pam_service
from marco.errors import AuthenticationError, ConfigError
from marco.tokens import TokenSigner
from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser


def login(auth: PamAuthenticator, user: str, password: str, client: str = "10.0.0.1") -> str:
    return asyncio.run(auth.login(user, password, client))


def test_right_password_logs_in(pam_service: str, alice: UnixUser) -> None:
    auth = PamAuthenticator(pam_service, LoginRateLimiter(5, 60))
    assert login(auth, alice.name, alice.password) == alice.name


def test_wrong_password_and_unknown_user_are_refused_alike(pam_service: str,
                                                           alice: UnixUser) -> None:
    auth = PamAuthenticator(pam_service, LoginRateLimiter(50, 60))
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        login(auth, alice.name, "not-" + alice.password)
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        login(auth, "marcotest-nobody", "whatever")
    with pytest.raises(AuthenticationError, match="required"):
        login(auth, alice.name, "")


def test_failures_are_rate_limited_per_user_and_per_address(pam_service: str, alice: UnixUser,
                                                            bob: UnixUser) -> None:
    auth = PamAuthenticator(pam_service, LoginRateLimiter(3, 60))
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            login(auth, alice.name, "bad", client="10.0.0.7")
    # Locked: even the right password waits, from any address.
    with pytest.raises(TooManyAttempts, match="try again in"):
        login(auth, alice.name, alice.password, client="10.0.0.8")
    # The guessing address is locked out for other users too.
    with pytest.raises(TooManyAttempts):
        login(auth, bob.name, bob.password, client="10.0.0.7")
    assert login(auth, bob.name, bob.password, client="10.0.0.9") == bob.name


def test_lockout_expires(pam_service: str, alice: UnixUser) -> None:
    auth = PamAuthenticator(pam_service, LoginRateLimiter(1, 0.5))
    with pytest.raises(AuthenticationError):
        login(auth, alice.name, "bad")
    with pytest.raises(TooManyAttempts):
        login(auth, alice.name, alice.password)
    time.sleep(0.6)
    assert login(auth, alice.name, alice.password) == alice.name


@pytest.mark.parametrize("service", ["su", "sudo", "runuser", "other", "", "../login"])
def test_unsafe_pam_services_are_refused(service: str) -> None:
    with pytest.raises(ConfigError):
        check_pam_service(service)


def test_the_default_login_service_works(alice: UnixUser) -> None:
    """The configured default, `login`, with its stock Debian stack (as deployed)."""
    auth = PamAuthenticator("login", LoginRateLimiter(5, 60))
    assert login(auth, alice.name, alice.password) == alice.name


def test_parallel_guesses_cannot_slip_past_the_limit(pam_service: str, alice: UnixUser) -> None:
    auth = PamAuthenticator(pam_service, LoginRateLimiter(3, 60))

    async def burst() -> list[str]:
        attempts = [auth.login(alice.name, f"guess-{i}", "10.0.0.50") for i in range(20)]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        return [type(o).__name__ for o in outcomes]

    outcomes = asyncio.run(burst())
    assert outcomes.count("AuthenticationError") == 3  # only 3 reached PAM
    assert outcomes.count("TooManyAttempts") == 17


def test_the_limiter_forgets_expired_entries() -> None:
    limiter = LoginRateLimiter(5, 0.01)
    for i in range(3000):
        limiter.begin(f"user:u{i}")
        limiter.end(f"user:u{i}", failed=True)
    time.sleep(0.02)
    limiter.sweep()
    assert len(limiter) == 0


def test_a_right_password_clears_the_users_failures(pam_service: str, alice: UnixUser) -> None:
    """A success forgets the user's earlier failures (not the address's): two wrong passwords
    with a success between them, each from its own address, lock nothing at a limit of 2."""
    auth = PamAuthenticator(pam_service, LoginRateLimiter(2, 60))
    with pytest.raises(AuthenticationError):
        login(auth, alice.name, "bad", client="10.0.1.1")
    assert login(auth, alice.name, alice.password, client="10.0.1.2") == alice.name
    with pytest.raises(AuthenticationError):
        login(auth, alice.name, "bad", client="10.0.1.3")
    assert login(auth, alice.name, alice.password, client="10.0.1.4") == alice.name


def token_call(controller: ControllerProcess, user: str, password: str,
               source: str = "127.0.0.1") -> tuple[int, Any]:
    """POST /api/token from `source`: every 127/8 address reaches the loopback controller,
    so each one is a client address of its own."""
    conn = http.client.HTTPSConnection(controller.host, controller.port, timeout=30,
                                       context=controller.ssl_context, source_address=(source, 0))
    conn.request("POST", "/api/token", body=json.dumps({"user": user, "password": password}))
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return response.status, body


def test_lockout_over_http_is_per_user_and_per_address(start_controller, alice: UnixUser,
                                                       bob: UnixUser, signer: TokenSigner) -> None:
    """The controller's own settings (2 failures, 300 s): then 429 with how long to wait, for
    the user from any address and for the address with any user; another user from another
    address still logs in."""
    controller = start_controller(extra_args=["--no-discovery", "--login-max-failures", "2",
                                              "--login-lockout", "300"])
    for _ in range(2):
        status, body = token_call(controller, alice.name, "not-" + alice.password)
        assert (status, body["error"]) == (401, "unauthenticated"), body
    status, body = token_call(controller, alice.name, alice.password)
    assert (status, body["error"]) == (429, "too_many_attempts"), body
    wait = re.fullmatch(r"too many failed logins; try again in (\d+) s", body["message"])
    assert wait is not None and 0 < int(wait.group(1)) <= 300, body
    assert token_call(controller, alice.name, alice.password, source="127.0.0.2")[0] == 429
    assert token_call(controller, bob.name, bob.password)[0] == 429
    status, body = token_call(controller, bob.name, bob.password, source="127.0.0.3")
    assert status == 200 and signer.verify(body["token"]) == bob.name
