"""JSON API: the page's session, nodes, Ansible inventory, tokens for the CLI, run."""

from __future__ import annotations

import asyncio
from typing import Any

from marco.errors import BadRequest, MarcoError, to_body
from marco.inventory import build_inventory, host_vars
from marco.runs import with_command

from .archive import outcome_of
from .runs import run_url
from .runstore import MAX_TITLE
from .session import ApiHandler

COMMAND_RUN_KINDS = ("command", "shell")  # the kinds of run POST /api/run makes


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
    """GET /api/nodes: every known node, alive or not, in natural order of their names (sc2
    before sc10); `tls` is how clients must reach it (the controller's own mode, never what
    the node announced)."""

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
    """POST /api/run {"nodes": [...], "command": "...", "cwd": "~", "label": "...", "kind"?}:
    start the command on every chosen node at once, as one `command` (or `shell`) run whose
    executions carry its tags; output goes to the user's sockets on each agent. The run ends
    in the background once every execution has exited."""

    async def post(self) -> None:
        user = self.require_user()
        body = self.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("command"), str) \
                or not body["command"].strip():
            raise BadRequest("give a command to run")
        kind = body.get("kind") or "command"
        if kind not in COMMAND_RUN_KINDS:
            raise BadRequest(f"'kind' must be one of {', '.join(COMMAND_RUN_KINDS)}")
        nodes = chosen_nodes(self.ctx, body.get("nodes") or [])
        token = self.token()
        assert token is not None  # require_user verified it
        cwd = body.get("cwd") or None
        meta = with_command({"cwd": cwd} if isinstance(cwd, str) else {}, body["command"])
        run = await self.ctx.runs.create(user, kind, body["command"][:MAX_TITLE],
                                         [n.name for n in nodes], meta)

        settled: dict[str, str] = {}  # the nodes that did not start it: failed, unreachable

        async def start(node: Any) -> dict[str, Any]:
            client = self.ctx.connector.client(node, token)
            try:
                execution_id = await client.start(body["command"], cwd=cwd,
                                                  label=str(body.get("label") or "shell"),
                                                  tags={"run": run.id, "host": node.name})
                return {"ok": True, "id": execution_id}
            except MarcoError as error:
                settled[node.name] = outcome_of(error)
                return {"ok": False, **to_body(error)}

        results = await asyncio.gather(*(start(node) for node in nodes))
        answers = {n.name: r for n, r in zip(nodes, results, strict=True)}
        await self.ctx.runs.started(run, token, {name: str(r["id"]) for name, r
                                                 in answers.items() if r["ok"]}, settled)
        self.write_json({"user": user, "results": answers,
                         "run": {"id": run.id, "url": run_url(run.id)}})


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
