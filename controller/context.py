"""The controller's services, built once from its config and shared by every handler."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from agent.revocations import Revocations
from agent.tokens import SERVICE_MAX_AGE, SERVICE_SALT, SecretKeys, TokenSigner

from .auth import LoginRateLimiter, PamAuthenticator
from .config import ControllerConfig
from .discovery import HealthMonitor, NodeRegistry, parse_static_node
from .revoke import RevocationPusher


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
    pusher: RevocationPusher

    @classmethod
    def build(cls, config: ControllerConfig, secret: SecretKeys) -> "ControllerContext":
        registry = NodeRegistry()
        for spec in config.node:
            registry.upsert(parse_static_node(spec))
        limiter = LoginRateLimiter(config.login_max_failures, config.login_lockout)
        # The cookie key is derived from the cluster secret for this one purpose.
        # One cookie key per secret (versions 0..n-1): the newest signs, older cookies still
        # verify, so rotating the secret does not log browser sessions out.
        cookie_secret = {version: hmac.new(key, b"marco-controller-cookie",
                                           hashlib.sha256).hexdigest()
                         for version, key in enumerate(secret)}
        revocations = Revocations(Path(config.state_dir) / "revocations.json")
        pusher = RevocationPusher(revocations, registry,
                                  TokenSigner(secret, SERVICE_MAX_AGE, salt=SERVICE_SALT))
        return cls(config=config, signer=TokenSigner(secret, config.token_max_age),
                   authenticator=PamAuthenticator(config.pam_service, limiter),
                   registry=registry,
                   health=HealthMonitor(registry, config.health_interval, keys=secret),
                   cookie_secret=cookie_secret, revocations=revocations, pusher=pusher)
