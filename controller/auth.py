"""Logins: passwords checked by PAM (in a thread, since PAM blocks), failures rate-limited.

A successful login yields the agents' token (`agent.tokens`); the web handlers put it in a signed
HttpOnly cookie, `POST /api/token` hands it to command-line tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import pam

from agent.errors import AuthenticationError, ConfigError, MarcoError

log = logging.getLogger(__name__)

#: PAM services that let root (or anyone already privileged) through without a password check.
UNSAFE_PAM_SERVICES = {"su", "su-l", "sudo", "sudo-i", "runuser", "runuser-l", "other"}


class TooManyAttempts(MarcoError):
    """Too many failed logins: wait and try again."""

    status = 429
    code = "too_many_attempts"


def check_pam_service(service: str) -> str:
    """Refuse services whose stack lets root through on any password."""
    if not service or "/" in service:
        raise ConfigError(f"invalid PAM service name {service!r}")
    if service in UNSAFE_PAM_SERVICES:
        raise ConfigError(f"PAM service {service!r} lets root in without a password check; "
                          "use 'login' or a service of your own")
    return service


class LoginRateLimiter:
    """At most `max_failures` failed logins per key (user, client address) per `window` s."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures, self.window = max_failures, window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and now - failures[0] > self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return deque()
        return failures

    def check(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            recent = self._recent(key, now)
            if len(recent) >= self.max_failures:
                wait = int(self.window - (now - recent[0])) + 1
                raise TooManyAttempts(f"too many failed logins; try again in {wait} s")

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user_key: str) -> None:
        self._failures.pop(user_key, None)


class PamAuthenticator:
    """Checks a user's password with PAM in worker threads, one PAM handle per attempt."""

    def __init__(self, service: str, limiter: LoginRateLimiter, workers: int = 4) -> None:
        self.service = check_pam_service(service)
        self.limiter = limiter
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pam")

    def _check(self, username: str, password: str) -> tuple[bool, str]:
        authenticator = pam.PamAuthenticator()
        ok = authenticator.authenticate(username, password, service=self.service)
        return bool(ok), str(authenticator.reason)

    async def login(self, username: str, password: str, client: str) -> str:
        """Return the username when the password is right; raise a clear error otherwise."""
        if not username or not password or len(username) > 256 or len(password) > 4096 \
                or "\0" in username + password:
            raise AuthenticationError("user name and password are required")
        keys = (f"user:{username}", f"addr:{client}")
        self.limiter.check(*keys)
        ok, reason = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._check, username, password)
        if not ok:
            self.limiter.failed(*keys)
            log.warning("failed login for %r from %s: %s", username, client, reason)
            raise AuthenticationError("wrong user name or password")
        self.limiter.succeeded(keys[0])
        log.info("login: %s from %s", username, client)
        return username

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
