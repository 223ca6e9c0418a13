"""The controller's services, built once from its config and shared by every handler."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from marco.errors import ConfigError, TryAgain
from marco.health import HealthMonitor
from marco.nodes import NodeRegistry, parse_static_node
from marco.revocations import DeniedTokens, Revocations
from marco.shells import LoginShells
from marco.tls import ClientTls, ServerTlsFiles
from marco.tokens import SERVICE_MAX_AGE, SERVICE_SALT, SecretKeys, TokenSigner

from .archive import RunKeeper
from .auth import PamAuthenticator
from .collector import CollectLimits
from .config import ControllerConfig
from .connector import AgentConnector
from .pki import ClusterPki
from .registration import Challenges, NodeCertificates, Registrations
from .revoke import RevocationPusher
from .run_output import ReadLimits
from .run_search import SearchSlots
from .run_signals import RunSignals
from .runstore import RunLimits, RunStoreThread, run_database
from .shared_state import SharedLimits, SharedState, is_postgres, shared_state
from .user_slots import UserSlots


def run_limits(config: ControllerConfig) -> RunLimits:
    """The runs store's bounds from the controller's settings."""
    return RunLimits(retention_days=config.runs_retention_days,
                     max_bytes=config.runs_max_bytes,
                     max_running_per_user=config.runs_max_running_per_user,
                     max_per_user=config.runs_max_per_user,
                     max_bytes_per_user=config.runs_max_bytes_per_user)


def collect_limits(config: ControllerConfig) -> CollectLimits:
    """The output collector's bounds from the controller's settings."""
    return CollectLimits(per_user=config.runs_collect_per_user,
                         queue_per_user=config.runs_collect_queue_per_user,
                         finals_per_user=config.runs_collect_finals_per_user,
                         retry=config.runs_collect_retry,
                         retry_max=config.runs_collect_retry_max,
                         give_up=config.runs_collect_give_up,
                         page_lines=config.runs_collect_page_lines)


def read_limits(config: ControllerConfig) -> ReadLimits:
    """The read side's bounds (a run's executions and output) from the controller's settings."""
    return ReadLimits(agent_timeout=config.runs_read_agent_timeout,
                      agents_at_once=config.runs_read_agents_at_once,
                      listings_per_user=config.runs_read_listings_per_user,
                      output_lines=config.runs_output_page_lines)


def registrations(config: ControllerConfig, secret: SecretKeys, registry: NodeRegistry,
                  health: HealthMonitor, pki: ClusterPki | None) -> Registrations | None:
    """The table of agents registering themselves, unless turned off or in --dev mode (no CA
    to check their certificates)."""
    if pki is None or not config.registration:
        return None
    return Registrations(registry, health.probe, NodeCertificates(pki.ca_file, pki.crl_file),
                         Challenges(secret[-1], most=4 * config.registration_max),
                         config.registration_ttl, config.registration_max)


def shared_limits(config: ControllerConfig) -> SharedLimits:
    """The shared state's settings (two controllers on one database: shared_state.py)."""
    return SharedLimits(poll=config.shared_poll, listen=config.shared_listen,
                        timeout=config.shared_timeout, max_failures=config.login_max_failures,
                        window=config.login_lockout,
                        clock_margin=config.shared_clock_margin)


@dataclass
class ControllerContext:
    """Everything a handler needs; no module-level state."""

    config: ControllerConfig
    signer: TokenSigner
    authenticator: PamAuthenticator
    registry: NodeRegistry
    health: HealthMonitor
    cookie_secret: dict[int, str]
    revocations: Revocations
    denied: DeniedTokens
    shared: SharedState  # revocations and failed logins: files, or a database shared
    pusher: RevocationPusher
    connector: AgentConnector
    pki: ClusterPki | None          # None in development mode
    web_tls: ServerTlsFiles | None  # None in development mode
    runs: RunKeeper
    listings: UserSlots  # a user's listings asking agents at once (run_output.py)
    downloads: UserSlots  # a user's output downloads at once (runs.py)
    searches: SearchSlots  # output searches at once, of a user and in all (run_search.py)
    registrations: Registrations | None  # agents registering themselves; None: not accepted

    @classmethod
    def build(cls, config: ControllerConfig, secret: SecretKeys) -> ControllerContext:
        registry = NodeRegistry()
        for spec in config.node:
            registry.upsert(parse_static_node(spec))
        # The cookie key is derived from the cluster secret for this one purpose.
        # One cookie key per secret (versions 0..n-1): the newest signs, older cookies still
        # verify, so rotating the secret does not log browser sessions out.
        cookie_secret = {version: hmac.new(key, b"marco-controller-cookie",
                                           hashlib.sha256).hexdigest()
                         for version, key in enumerate(secret)}
        # What other controllers on the same database write too: read before any request.
        shared = shared_state(config.database, Path(config.state_dir), shared_limits(config))
        shared.open()
        revocations, denied = shared.revocations, shared.denied
        pki, web_tls, agent_tls = None, None, None
        if not config.dev:
            pki = ClusterPki(config.pki_dir)
            if not pki.exists():
                raise ConfigError(f"no cluster CA in {config.pki_dir}: run `marco-controller "
                                  "init` (or start with --dev for a loopback-only trial)")
            agent_tls = ClientTls(str(pki.ca_file), str(pki.controller_cert),
                                  str(pki.controller_key), str(pki.crl_file))
            web_tls = ServerTlsFiles(config.web_cert or str(pki.controller_cert),
                                     config.web_key or str(pki.controller_key),
                                     str(pki.ca_file), require_client_cert=False)
        connector = AgentConnector(agent_tls)
        signer = TokenSigner(secret, config.token_max_age)
        pusher = RevocationPusher(revocations, registry,
                                  TokenSigner(secret, SERVICE_MAX_AGE, salt=SERVICE_SALT),
                                  connector, crl_file=pki.crl_file if pki else None,
                                  denied=denied, signer=signer, shared=shared)
        state_dir = Path(config.state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the runs file opens now
        store = RunStoreThread(run_database(config.database, state_dir), run_limits(config),
                               statement_timeout=config.runs_statement_timeout,
                               max_waiting=config.runs_store_queue)
        signals = RunSignals(config.runs_max_waiting_per_user)
        shared.attach_runs(signals)  # a run recorded here wakes its followers on the others
        runs = RunKeeper(store, connector, registry, stale_after=config.token_max_age,
                         collect=collect_limits(config), signals=signals,
                         shared=is_postgres(config.database))
        health = HealthMonitor(registry, config.health_interval, keys=secret, tls=agent_tls,
                               failures=config.health_failures,
                               connection_max_age=config.health_connection_max_age,
                               at_once=config.health_checks_at_once)
        return cls(config=config, signer=signer, denied=denied, runs=runs,
                   authenticator=PamAuthenticator(config.pam_service, shared.limiter,
                                                  LoginShells(config.login_shells)),
                   registry=registry, health=health,
                   registrations=registrations(config, secret, registry, health, pki),
                   cookie_secret=cookie_secret, revocations=revocations, pusher=pusher,
                   shared=shared,
                   connector=connector, pki=pki, web_tls=web_tls,
                   listings=UserSlots(config.runs_read_listings_per_user),
                   downloads=UserSlots(config.runs_downloads_per_user),
                   searches=SearchSlots(config.runs_search_per_user,
                                        config.runs_search_at_once))

    async def issue_token(self, user: str) -> str:
        """A new token for `user` after a PAM login. Tokens carry whole seconds and "log out
        everywhere" voids every token of its own second, so a login in that second waits for
        the next one rather than get a token that is void already."""
        cutoff = self.revocations.not_before(user)
        # The cutoff is at most 1 s (and a shared database's lead) ahead; a clock step back
        deadline = time.monotonic() + 2 + self.shared.lead()
        while cutoff is not None and int(time.time()) < cutoff:  # ends here, not in a hang
            if time.monotonic() > deadline:
                raise TryAgain("the clock went back past a logout; try again in a moment")
            await asyncio.sleep(min(cutoff - time.time(), 0.1) + 0.001)
        return self.signer.issue(user)
