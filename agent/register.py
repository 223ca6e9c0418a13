"""Registering with a controller mDNS does not reach (issue 15): `marco-agent --controller URL`.

The agent checks the controller's certificate against the cluster CA (and that it is the
controller's, OU=controller), asks it for a fresh challenge and registers with its node
certificate and a signature by its key (marco.registration); it renews every `register_every`
seconds, retries with a doubling wait while the controller cannot be reached (the agent serves
meanwhile), and deregisters when it stops. The controller lists it only after its own health
check with the secret proof. With several `--controller` URLs (controllers that do not share
their registrations), it registers with each on its own, with its own retries.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import random
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from marco.errors import (
    AgentUnreachable,
    ConfigError,
    MarcoError,
    ProtocolError,
    error_from_response,
)
from marco.registration import MAX_BODY, REGISTER_PATH, registration_message, sign_registration
from marco.tls import describe_tls_error

from .config import AgentConfig

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # seconds for one exchange with the controller (connect, challenge, register)
FIRST_RETRY = 1.0
JITTER = 0.2  # renewals and retries wait ±20 %: agents started together do not stay in step
WEB_CERT_HINT = ("; the controller's web port presents a certificate not from the cluster CA "
                 "(--web-cert?): registration needs the controller's own certificate there")

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the cluster's own
# certificate not naming the URL's host is no --web-cert case.
NAME_MISMATCH = (62, 64)


def jittered(seconds: float) -> float:
    """`seconds` give or take JITTER (not security: spreading agents' renewals in time)."""
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


def default_register_address(bind: str) -> str:
    """The address to register by default: the bind address when it is one IP (not a
    wildcard), else none (the controller takes the address the registration comes from)."""
    try:
        address = ipaddress.ip_address(bind)
    except ValueError:
        return ""
    return "" if address.is_unspecified else str(address)


def controller_address(url: str) -> tuple[str, int]:
    """Host and port of an `https://HOST[:PORT]` controller URL (ConfigError otherwise)."""
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        port = 0
    if parts.scheme != "https" or not parts.hostname or not port:
        raise ConfigError(f"--controller {url!r}: expected https://HOST:PORT (registration "
                          "needs TLS)")
    return parts.hostname, port


def is_controller_certificate(peer: Any) -> bool:
    """Whether a verified peer certificate (`getpeercert()`) is the controller's (OU): a node
    certificate that happens to name the controller's host must not pose as the controller."""
    fields = [pair for rdn in (peer or {}).get("subject", ()) for pair in rdn]
    return ("organizationalUnitName", "controller") in fields


class ControllerLink:
    """One challenge-and-registration exchange with the controller over HTTPS (blocking: run
    in a thread)."""

    def __init__(self, url: str, ca_file: str, crl_file: str) -> None:
        self.url = url.rstrip("/")
        self.host, self.port = controller_address(url)
        self.ca_file, self.crl_file = ca_file, crl_file

    def _context(self) -> ssl.SSLContext:
        """Trust the cluster CA only; its CRL applies when present (read per exchange: a
        renewed certificate or a new CRL needs no restart)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.crl_file and Path(self.crl_file).exists():
            context.load_verify_locations(cafile=self.crl_file)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    def exchange(self, sign: Any) -> dict[str, Any]:
        """GET a challenge, POST `sign(nonce)`; the controller's answer or a typed error."""
        what = f"the controller {self.url}"
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT,
                                                 context=self._context())
        try:
            connection.connect()
            if not is_controller_certificate(connection.sock.getpeercert()):
                raise AgentUnreachable(f"{what} presented a certificate of this cluster that "
                                       "is not the controller's (OU=controller)")
            nonce = self._ask(connection, "GET", None).get("nonce")
            return self._ask(connection, "POST", sign(str(nonce)))
        except (OSError, http.client.HTTPException) as exc:
            refused = describe_tls_error(exc, what)
            if (isinstance(exc, ssl.SSLCertVerificationError) and refused is not None
                    and exc.verify_code not in NAME_MISMATCH):
                raise type(refused)(refused.message + WEB_CERT_HINT) from None
            if refused is not None:
                raise refused from None
            raise AgentUnreachable(f"cannot reach {what}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        finally:
            connection.close()

    def _ask(self, connection: http.client.HTTPSConnection, method: str,
             body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, REGISTER_PATH, body=data,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read(MAX_BODY + 1)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = None
        if response.status != 200 or not isinstance(answer, dict):
            fields = answer if isinstance(answer, dict) else {}
            if response.status == 200:
                raise ProtocolError(f"{self.url}{REGISTER_PATH} did not answer JSON")
            raise error_from_response(response.status, fields.get("error"),
                                      str(fields.get("message", "")), fields.get("hint"))
        return answer


def check_register_settings(config: AgentConfig) -> None:
    """Refuse at start-up what registration cannot work with (ConfigError)."""
    if config.dev:
        raise ConfigError("--controller needs the node's certificate: not with --dev")
    for url in config.controller:
        controller_address(url)
    if len({url.rstrip("/") for url in config.controller}) != len(config.controller):
        raise ConfigError("--controller: the same controller is named twice")
    if config.register_address:
        try:
            ipaddress.ip_address(config.register_address)
        except ValueError:
            raise ConfigError(f"--register-address {config.register_address!r} must be an IP "
                              "address") from None


class Registrar:
    """Keeps this agent registered with each of its controllers while it serves."""

    def __init__(self, config: AgentConfig, port: int) -> None:
        check_register_settings(config)
        address = config.register_address or default_register_address(config.bind)
        self.registrations = [
            ControllerRegistration(ControllerLink(url, config.tls_ca, config.tls_crl),
                                   config, port, address) for url in config.controller]

    def start(self) -> None:
        for registration in self.registrations:
            registration.start()

    async def stop(self) -> None:
        """Deregister from every controller at once (each waits at most its own time)."""
        await asyncio.gather(*(registration.stop() for registration in self.registrations))


class ControllerRegistration:
    """Keeps this agent registered with one controller: its own renewals, retries and
    deregistration."""

    def __init__(self, link: ControllerLink, config: AgentConfig, port: int,
                 address: str) -> None:
        self.link = link
        self.node, self.port, self.address = config.node_name, port, address
        self.cert_file, self.key_file = Path(config.tls_cert), Path(config.tls_key)
        self.every, self.retry_max = config.register_every, config.register_retry_max
        self.registered = False
        self._last: tuple[Any, ...] | None = None  # the outcome logged last (log changes only)
        self._task: asyncio.Task[None] | None = None
        # The exchange under way in its thread: cancelling the task does not stop it, and a
        # renewal that lands after the deregistration would register the node again.
        self._exchange: asyncio.Future[dict[str, Any]] | None = None

    def _body(self, action: str, nonce: str) -> dict[str, Any]:
        """The signed registration (certificate and key read now: a renewed one applies)."""
        message = registration_message(action, self.node, self.port, self.address, nonce)
        return {"action": action, "node": self.node, "port": self.port,
                "address": self.address, "nonce": nonce,
                "certificate": self.cert_file.read_text(),
                "signature": sign_registration(self.key_file.read_bytes(), message)}

    def _send(self, action: str) -> dict[str, Any]:
        return self.link.exchange(lambda nonce: self._body(action, nonce))

    def start(self) -> None:
        log.info("registering node %s with %s every %g s", self.node, self.link.url, self.every)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = FIRST_RETRY
        while True:
            try:
                self._exchange = asyncio.ensure_future(asyncio.to_thread(self._send,
                                                                         "register"))
                answer = await asyncio.shield(self._exchange)
            except (MarcoError, OSError, ValueError) as error:
                message = error.message if isinstance(error, MarcoError) else str(error)
                wait = jittered(delay)
                log.warning("cannot register with %s: %s; trying again in %.1f s",
                            self.link.url, message, wait)
                self._last = None
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = FIRST_RETRY
            self.registered = True
            self._report(answer)
            await asyncio.sleep(jittered(self._interval(answer)))

    def _interval(self, answer: dict[str, Any]) -> float:
        """Renew every `register_every` s, and at least twice within the controller's TTL."""
        ttl = answer.get("ttl")
        if isinstance(ttl, (int, float)) and 0 < ttl / 2 < self.every:
            return float(ttl) / 2
        return self.every

    def _report(self, answer: dict[str, Any]) -> None:
        """One log line per change of outcome, not one per renewal."""
        outcome = (answer.get("listed"), answer.get("address"), answer.get("error"))
        if outcome == self._last:
            return
        self._last = outcome
        where = f"{answer.get('address')}:{self.port}"
        if answer.get("listed"):
            log.info("registered with %s: listed as %s at %s", self.link.url, self.node, where)
        else:
            log.warning("registered with %s but not listed at %s: %s", self.link.url, where,
                        answer.get("error"))

    async def stop(self) -> None:
        """Stop renewing and deregister (the controller drops the node at once; if it cannot
        be told, the registration ends after its TTL)."""
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        exchange = self._exchange
        if exchange is not None:
            await asyncio.wait([exchange], timeout=TIMEOUT * 2)
            if exchange.done() and not exchange.cancelled() and exchange.exception() is None:
                self.registered = True  # it registered just now
        if not self.registered:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self._send, "deregister"), TIMEOUT * 2)
        except (MarcoError, OSError, ValueError, TimeoutError) as error:
            message = error.message if isinstance(error, MarcoError) else str(error)
            log.warning("could not deregister from %s: %s (it drops this node after its TTL)",
                        self.link.url, message or type(error).__name__)
            return
        log.info("deregistered from %s", self.link.url)
