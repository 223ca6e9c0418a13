"""JSON API: the page's session, nodes, Ansible inventory, tokens for the CLI, run."""

from __future__ import annotations

import asyncio
from typing import Any

from marco.errors import BadRequest, MarcoError, to_body
from marco.inventory import build_inventory, host_vars

from .session import ApiHandler


class SessionApi(ApiHandler):
    """GET /api/session: who is logged in and until when. Never the token itself: the page
    reaches agents through the relay, which authenticates upstream, so an XSS could not
    carry the token away."""

    def get(self) -> None:
        user = self.require_user()
        self.set_header("Cache-Control", "no-store")
        token = self.token()
        assert token is not None  # require_user verified it
        self.write_json({"user": user, "expires": self.ctx.signer.expires_at(token)})


class TokenApi(ApiHandler):
    """POST /api/token {"user", "password", "csr"?} -> {"token", "certificate"?, "ca"?, "crl"?}:
    login for command-line tools. With a CSR (the tool's own new key), the answer carries a
    client certificate for the agents' mutual TLS, valid as long as the token."""

    def check_xsrf_cookie(self) -> None:
        pass  # no cookie is involved: the password itself authenticates this request

    async def post(self) -> None:
        body = self.json_body()
        if not isinstance(body, dict):
            raise BadRequest("expected {\"user\": ..., \"password\": ...}")
        user = await self.ctx.authenticator.login(str(body.get("user", "")),
                                                  str(body.get("password", "")),
                                                  self.request.remote_ip or "?")
        self.set_header("Cache-Control", "no-store")
        answer: dict[str, Any] = {"user": user, "token": await self.ctx.issue_token(user),
                                  "max_age": self.ctx.config.token_max_age}
        pki = self.ctx.pki
        if pki is not None and isinstance(body.get("csr"), str):
            answer["certificate"] = pki.sign_user_request(body["csr"], user,
                                                          self.ctx.config.token_max_age)
            answer["ca"] = pki.ca_file.read_text()
            answer["crl"] = pki.crl_file.read_text()
        self.write_json(answer)


class NodesApi(ApiHandler):
    """GET /api/nodes: every known node, alive or not; `tls` is how clients must reach it (the
    controller's own mode, never what the node announced)."""

    def get(self) -> None:
        self.require_user()
        self.write_json({"nodes": [{**n.summary(), "tls": self.agents_tls}
                                   for n in self.ctx.registry.all()]})


class InventoryApi(ApiHandler):
    """GET /api/inventory (`--list`), or ?host=NAME (`--host`): served from the live registry."""

    def get(self) -> None:
        self.require_user()
        host = self.get_query_argument("host", None)
        if host is None:
            self.write_json(build_inventory(self.ctx.registry.alive(), self.agents_tls))
            return
        node = self.ctx.registry.get(host)
        self.write_json(host_vars(node, self.agents_tls) if node is not None and node.alive
                        else {})


def chosen_nodes(ctx: Any, names: Any) -> list[Any]:
    """The alive nodes named, or a clear 400 naming the unknown or down ones."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRequest("'nodes' must be a list of node names")
    if not names:
        raise BadRequest("choose at least one node")
    nodes, missing = [], []
    for name in dict.fromkeys(names):
        node = ctx.registry.get(name)
        if node is None or not node.alive:
            missing.append(name)
        else:
            nodes.append(node)
    if missing:
        raise BadRequest(f"unknown or unreachable node(s): {', '.join(missing)}")
    return nodes


class RunApi(ApiHandler):
    """POST /api/run {"nodes": [...], "command": "...", "cwd": "~", "label": "..."}: start the
    command on every chosen node at once; output goes to the user's sockets on each agent."""

    async def post(self) -> None:
        user = self.require_user()
        body = self.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("command"), str) \
                or not body["command"].strip():
            raise BadRequest("give a command to run")
        nodes = chosen_nodes(self.ctx, body.get("nodes") or [])
        token = self.token()

        async def start(node: Any) -> dict[str, Any]:
            client = self.ctx.connector.client(node, token)
            try:
                execution_id = await client.start(body["command"], cwd=body.get("cwd") or None,
                                                  label=str(body.get("label") or "shell"))
                return {"ok": True, "id": execution_id}
            except MarcoError as error:
                return {"ok": False, **to_body(error)}

        results = await asyncio.gather(*(start(node) for node in nodes))
        answers = {n.name: r for n, r in zip(nodes, results, strict=True)}
        self.write_json({"user": user, "results": answers})


class LogoutApi(ApiHandler):
    """POST /api/logout: void the token this request carries (`marco logout`), on the
    controller at once and on every live node before answering."""

    async def post(self) -> None:
        user = self.require_user()
        token = self.token()
        assert token is not None  # require_user verified it
        result = await self.ctx.pusher.deny(token)
        self.clear_cookie("marco_token")
        self.write_json({"user": user, **result})


class RevokeApi(ApiHandler):
    """POST /api/revoke: log out everywhere; every token of the caller issued up to now (this
    second included) is refused by the controller and, once pushed, by every agent."""

    async def post(self) -> None:
        user = self.require_user()
        result = await self.ctx.pusher.revoke(user)
        self.clear_cookie("marco_token")
        self.write_json({"user": user, **result})
