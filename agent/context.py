"""The agent's services, built once from its config and shared by every handler."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from marco import __version__, protocol
from marco.errors import AuthenticationError, MarcoError
from marco.revocations import DeniedTokens, Revocations
from marco.tokens import (
    SERVICE_MAX_AGE,
    SERVICE_SALT,
    SecretKeys,
    TokenSigner,
    health_proof,
)

from .audit import AuditLog
from .config import AgentConfig
from .crl import CrlStore
from .executions import ExecutionManager
from .files import FileService
from .hub import StreamHub
from .isolation import Isolation, IsolationSettings
from .runners import RunnerPool, RunnerSettings
from .status import StatusPublisher, StatusSampler
from .terminal import TerminalManager, TerminalSettings
from .users import LoginShells, UserIdentity, UserResolver


def terminal_settings(config: AgentConfig) -> TerminalSettings:
    return TerminalSettings(
        enabled=config.terminals, max_per_user=config.terminal_max_per_user,
        idle_timeout=config.terminal_idle_timeout, detach_grace=config.terminal_detach_grace,
        buffer_bytes=config.terminal_buffer_bytes,
        scrollback_bytes=config.terminal_scrollback_bytes,
        input_max_bytes=config.terminal_input_max_bytes)


@dataclass
class AgentContext:
    """Everything a request handler needs; no module-level state anywhere."""

    config: AgentConfig
    signer: TokenSigner
    resolver: UserResolver
    hub: StreamHub
    executions: ExecutionManager
    files: FileService
    status: StatusPublisher
    audit: AuditLog
    secret: SecretKeys
    revocations: Revocations
    service_signer: TokenSigner
    denied: DeniedTokens
    terminals: TerminalManager
    crl: CrlStore | None = None                       # None in --dev mode (no TLS)
    on_tls_change: Callable[[], object] | None = None  # set by the server: reload TLS now

    @classmethod
    def build(cls, config: AgentConfig, secret: SecretKeys) -> AgentContext:
        resolver = UserResolver(shells=LoginShells(config.login_shells))
        hub = StreamHub()
        audit = AuditLog(Path(config.audit_log or config.state_path / "audit.log"),
                         config.node_name, config.audit_max_bytes, config.audit_backups)
        isolation = Isolation(IsolationSettings(config.cgroups, config.max_pids_per_user,
                                                config.max_memory_per_user),
                              resolver.can_switch_user)
        runners = RunnerPool(resolver, isolation, RunnerSettings(
            enabled=config.runner, idle_seconds=config.runner_idle_seconds,
            max_per_user=config.max_runners_per_user, max_total=config.max_runners,
            preload_seconds=config.runner_preload_seconds))
        executions = ExecutionManager(
            resolver, hub, config.state_path, spool_max_bytes=config.spool_max_bytes,
            stop_grace=config.stop_grace, retention=config.retention,
            retention_count=config.retention_count, audit=audit,
            max_running_per_user=config.max_running_per_user,
            spool_max_bytes_per_user=config.spool_max_bytes_per_user,
            capture_max=config.max_capture_bytes, isolation=isolation, runners=runners)
        return cls(config=config, signer=TokenSigner(secret, config.token_max_age),
                   resolver=resolver, hub=hub, executions=executions,
                   files=FileService(resolver, config.helper_python, runners,
                                     status_seconds=config.file_helper_seconds),
                   status=StatusPublisher(StatusSampler(
                       config.node_name, process_refresh=config.status_process_refresh)),
                   audit=audit,
                   secret=secret, revocations=Revocations(config.state_path / "revocations.json"),
                   service_signer=TokenSigner(secret, SERVICE_MAX_AGE, salt=SERVICE_SALT),
                   denied=DeniedTokens(config.state_path / "denied-tokens.json"),
                   terminals=TerminalManager(terminal_settings(config), isolation,
                                             resolver, audit),
                   crl=None if config.dev else CrlStore(config.tls_crl, config.tls_ca))

    def authenticate(self, token: str | None, client: str = "?") -> UserIdentity:
        """The identity a token grants on this node (raises 401 or 403 by cause); refusals
        are audited with the client's address."""
        try:
            return self.resolver.resolve(self.verify(token))
        except MarcoError as error:
            self.audit.record("auth.refused", None, client=client, reason=error.message)
            raise

    def verify(self, token: str | None) -> str:
        """The token's user, honouring max_age and the revocations pushed by the controller."""
        return self.signer.verify(token, self.revocations.not_before, self.denied.denied)

    def verify_service(self, token: str | None) -> None:
        """Accept only the controller's own short-lived service token (a salt of its own)."""
        if self.service_signer.verify(token) != "controller":
            raise AuthenticationError("not a controller token")

    def origin_allowed(self, origin: str) -> bool:
        """Browser origins allowed on /v1/stream: all unless the admin listed some.

        The stream is authenticated by a token in its first message, never by a cookie, so a
        foreign page gains nothing by opening it; the list lets admins narrow it anyway.
        """
        allowed = self.config.allowed_origins
        if not allowed:
            return True
        parts = urlsplit(origin)
        wanted = {o.lower().rstrip("/") for o in allowed}
        return f"{parts.scheme}://{parts.netloc}".lower() in wanted

    def health(self, challenge: str | None = None) -> dict[str, object]:
        """Node facts; with a `challenge`, also the proof that this agent holds the secret."""
        facts = self._facts()
        if challenge:
            facts["proof"] = health_proof(self.secret[-1], challenge[:128], self.config.node_name)
        return facts

    def _facts(self) -> dict[str, object]:
        return {"node": self.config.node_name, "version": __version__,
                "proto": protocol.PROTOCOL_VERSION, "os": platform.system().lower(),
                "arch": platform.machine(), "cpus": os.cpu_count() or 1,
                "groups": ",".join(self.config.groups),
                "user_switching": self.resolver.can_switch_user,
                "isolation": self.executions.isolation.mode}
