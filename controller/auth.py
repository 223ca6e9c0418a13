"""Logins: passwords checked by PAM (in a thread, since PAM blocks), failures rate-limited.

A successful login yields the agents' token (`agent.tokens`); the web handlers put it in a signed
HttpOnly cookie, `POST /api/token` hands it to command-line tools.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import pam

from marco.errors import AuthenticationError, ConfigError, TooManyAttempts
from marco.shells import LoginShells

log = logging.getLogger(__name__)

#: PAM services that let root (or anyone already privileged) through without a password check.
UNSAFE_PAM_SERVICES = {"su", "su-l", "sudo", "sudo-i", "runuser", "runuser-l", "other"}


def check_pam_service(service: str) -> str:
    """Refuse services whose stack lets root through on any password."""
    if not service or "/" in service:
        raise ConfigError(f"invalid PAM service name {service!r}")
    if service in UNSAFE_PAM_SERVICES:
        raise ConfigError(f"PAM service {service!r} lets root in without a password check; "
                          "use 'login' or a service of your own")
    return service


class LoginLimiter(Protocol):
    """What the login needs of a limiter: this process's `LoginRateLimiter`, or one whose
    counts live in the database and so count across controllers (controller/shared_state.py)."""

    async def reserve(self, keys: Sequence[str]) -> Any:
        """Reserve an attempt for each key (its ticket), or raise TooManyAttempts."""

    async def release(self, ticket: Any, failed: bool) -> None:
        """Close the reserved attempts: record them as failures, or forget them."""

    async def forgive(self, user_key: str) -> None:
        """A right password: the key's failures are forgotten."""


class LoginRateLimiter:
    """At most `max_failures` failed logins per key (user, client address) per `window` s.

    Attempts still waiting for PAM count as failures until they succeed, so a burst of
    parallel guesses cannot slip past the limit; expired entries are swept out so the table
    stays small however many names are tried.
    """

    SWEEP_EVERY = 1024

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures, self.window = max_failures, window
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}
        self._since_sweep = 0

    def _recent(self, key: str, now: float) -> int:
        failures = self._failures.get(key)
        while failures and now - failures[0] > self.window:
            failures.popleft()
        if failures is not None and not failures:
            del self._failures[key]
            failures = None
        return len(failures or ()) + self._pending.get(key, 0)

    def begin(self, *keys: str) -> None:
        """Reserve an attempt for each key, or raise TooManyAttempts (nothing reserved)."""
        now = time.monotonic()
        for key in keys:
            if self._recent(key, now) >= self.max_failures:
                oldest = self._failures.get(key)
                wait = int(self.window - (now - oldest[0])) + 1 if oldest else int(self.window)
                raise TooManyAttempts(f"too many failed logins; try again in {wait} s")
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, *keys: str, failed: bool) -> None:
        """Close the attempts `begin` reserved: record them as failures, or forget them."""
        now = time.monotonic()
        for key in keys:
            left = self._pending.get(key, 1) - 1
            if left:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
            if failed:
                self._failures.setdefault(key, deque()).append(now)
        self._since_sweep += 1
        if self._since_sweep >= self.SWEEP_EVERY:
            self.sweep(now)

    def succeeded(self, user_key: str) -> None:
        self._failures.pop(user_key, None)

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in list(self._failures):
            self._recent(key, now)
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._failures)

    async def reserve(self, keys: Sequence[str]) -> tuple[str, ...]:
        self.begin(*keys)
        return tuple(keys)

    async def release(self, ticket: tuple[str, ...], failed: bool) -> None:
        self.end(*ticket, failed=failed)

    async def forgive(self, user_key: str) -> None:
        self.succeeded(user_key)


class PamAuthenticator:
    """Checks a user's password with PAM in worker threads, one PAM handle per attempt."""

    def __init__(self, service: str, limiter: LoginLimiter,
                 shells: LoginShells | None = None, workers: int = 4) -> None:
        self.service = check_pam_service(service)
        self.limiter = limiter
        self.shells = shells or LoginShells()
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
        ticket = await self.limiter.reserve(keys)
        ok = False
        try:
            ok, reason = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._check, username, password)
            if ok and not self._has_login_shell(username):
                # Answered like a wrong password: a distinct answer would tell whoever tries
                # that the password of this (closed) account is right.
                ok, reason = False, "the account has no login shell (see login_shells)"
        finally:
            await self.limiter.release(ticket, failed=not ok)
        if not ok:
            log.warning("failed login for %r from %s: %s", username, client, reason)
            raise AuthenticationError("wrong user name or password")
        await self.limiter.forgive(keys[0])
        log.info("login: %s from %s", username, client)
        return username

    def _has_login_shell(self, username: str) -> bool:
        try:
            return self.shells.permits(pwd.getpwnam(username).pw_shell)
        except KeyError:  # PAM knows the account, the name service does not: nothing to run as
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
