"""Login with real PAM against real Unix users: right, wrong, rate-limited, unsafe services."""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.auth import LoginRateLimiter, PamAuthenticator, TooManyAttempts, check_pam_service
from marco.errors import AuthenticationError, ConfigError
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
