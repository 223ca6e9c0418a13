"""Who is asking: the signed HttpOnly cookie of a browser login, or a Bearer token.

Both carry the agents' token; the user is always derived from it (checked with max_age).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from typing import Any

import tornado.web

from marco.errors import AuthenticationError, BadRequest
from marco.jsonapi import JsonApiMixin
from marco.protocol import decode
from marco.tokens import bearer_token

from .context import ControllerContext

COOKIE = "marco_token"


class SessionMixin(tornado.web.RequestHandler):
    """The caller's token and user, from a Bearer header or the signed login cookie; shared by
    the HTTP handlers and the relay WebSocket."""

    ctx: ControllerContext

    def initialize(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    def bearer_token(self) -> str | None:
        return bearer_token(self.request.headers.get("Authorization"))

    def token(self) -> str | None:
        """The caller's token: Bearer header first, else the signed cookie."""
        bearer = self.bearer_token()
        if bearer:
            return bearer
        raw = self.get_signed_cookie(COOKIE, max_age_days=self.ctx.config.token_max_age / 86400 + 1)
        return raw.decode() if raw else None

    def get_current_user(self) -> str | None:
        token = self.token()
        if not token:
            return None
        try:
            return self.ctx.signer.verify(token, self.ctx.revocations.not_before,
                                          self.ctx.denied.denied)
        except AuthenticationError:
            return None


class BaseHandler(SessionMixin):
    """Authentication helpers and JSON errors shared by pages and API handlers."""

    def set_default_headers(self) -> None:
        # The page talks to this controller only (API and relay sockets): connect-src 'self'.
        # xterm.js's renderer makes <style> elements (xterm.js #4445): a nonce new with every
        # response allows those that style_nonce.js stamps, never inline style in markup.
        self.style_nonce = secrets.token_urlsafe(18)
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                        f"style-src 'self' 'nonce-{self.style_nonce}'; script-src 'self'; "
                        "frame-ancestors 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")

    def get_template_namespace(self) -> dict[str, Any]:
        """The templates' names, with this response's style nonce (base.html's meta)."""
        return {**super().get_template_namespace(), "style_nonce": self.style_nonce}

    def check_xsrf_cookie(self) -> None:
        # A Bearer header cannot be sent cross-site by a browser without CORS: no CSRF there.
        if self.bearer_token():
            return
        super().check_xsrf_cookie()

    def set_login_cookie(self, token: str) -> None:
        self.set_signed_cookie(COOKIE, token, expires_days=None, httponly=True,
                               samesite="Strict", secure=self.request.protocol == "https")

    def require_user(self) -> str:
        user = self.current_user
        if not user:
            raise AuthenticationError("log in first")
        return str(user)


class ApiHandler(JsonApiMixin, BaseHandler):
    """JSON in, JSON out, typed errors translated to status codes."""

    service_name = "controller"

    def prepare(self) -> Awaitable[None] | None:  # subclasses may prepare asynchronously
        self.set_header("Content-Type", "application/json")
        return None

    @property
    def agents_tls(self) -> bool:
        """Whether clients must reach the agents over mutual TLS: the controller's own mode."""
        return self.ctx.connector.tls is not None

    def json_body(self) -> Any:
        try:
            return decode(self.request.body or b"null")
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
