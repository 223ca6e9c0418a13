"""HTML pages: login, logout, the single-page app (nodes, run/deploy, output viewer) and the
runs pages (the list and one run's page; their data comes from the runs API in runs.js)."""

from __future__ import annotations

import tornado.web

from marco.errors import AuthenticationError, NotFound, PermissionDenied
from marco.runs import RUN_ID

from .auth import TooManyAttempts
from .session import COOKIE, BaseHandler


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this site only (never `//host` or a scheme),
    else the main page."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target \
            and not any(c < " " for c in target):
        return target
    return "/"


class LoginPage(BaseHandler):
    """GET shows the form; POST checks the password with PAM and sets the login cookie."""

    def get(self) -> None:
        target = safe_next(self.get_query_argument("next", "/"))
        if self.current_user:
            self.redirect(target)
            return
        self.render("login.html", error=None, username="", next=target)

    async def post(self) -> None:
        username = self.get_body_argument("username", "").strip()
        password = self.get_body_argument("password", "")
        target = safe_next(self.get_body_argument("next", "/"))
        try:
            user = await self.ctx.authenticator.login(username, password,
                                                      self.request.remote_ip or "?")
        except (AuthenticationError, PermissionDenied, TooManyAttempts) as error:
            self.set_status(error.status)
            self.render("login.html", error=error.message, username=username, next=target)
            return
        self.set_login_cookie(await self.ctx.issue_token(user))
        self.redirect(target)


class LogoutPage(BaseHandler):
    """POST /logout voids this session's token (here at once, on the agents as soon as it is
    pushed) and clears the cookie; with `everywhere=1` it voids every token of the user on
    every agent (other browsers, `marco login` tokens, Ansible runs)."""

    async def post(self) -> None:
        user = self.current_user
        if user and self.get_body_argument("everywhere", "") == "1":
            await self.ctx.pusher.revoke(user)
        elif user and (token := self.token()):
            self.ctx.pusher.deny_soon(token)
        self.clear_cookie(COOKIE)
        self.redirect("/login")


class IndexPage(BaseHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        self.render("index.html", user=self.current_user)


class RunsPage(BaseHandler):
    """GET /runs: the shell of the caller's runs list (runs.js fills it from GET /api/runs)."""

    @tornado.web.authenticated
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.render("runs.html", user=self.current_user)


class RunPage(BaseHandler):
    """GET /runs/ID: one run's permalink (runs.js fills it from GET /api/runs/ID). Another
    user's run shows the same "not found" as a missing one."""

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        self.set_header("Cache-Control", "no-store")
        user = str(self.current_user)
        try:
            if not RUN_ID.fullmatch(run_id):
                raise NotFound(f"no run {run_id}")
            run = await self.ctx.runs.get(user, run_id)
        except NotFound:
            self.set_status(404)
            self.render("run.html", user=user, run=None, run_id=run_id)
            return
        self.render("run.html", user=user, run=run, run_id=run_id)
