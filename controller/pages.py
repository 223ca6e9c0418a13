"""HTML pages: login, logout and the single-page app (nodes, run/deploy, output viewer)."""

from __future__ import annotations

import tornado.web

from marco.errors import AuthenticationError, PermissionDenied

from .auth import TooManyAttempts
from .session import COOKIE, BaseHandler


class LoginPage(BaseHandler):
    """GET shows the form; POST checks the password with PAM and sets the login cookie."""

    def get(self) -> None:
        if self.current_user:
            self.redirect("/")
            return
        self.render("login.html", error=None, username="")

    async def post(self) -> None:
        username = self.get_body_argument("username", "").strip()
        password = self.get_body_argument("password", "")
        try:
            user = await self.ctx.authenticator.login(username, password,
                                                      self.request.remote_ip or "?")
        except (AuthenticationError, PermissionDenied, TooManyAttempts) as error:
            self.set_status(error.status)
            self.render("login.html", error=error.message, username=username)
            return
        self.set_login_cookie(await self.ctx.issue_token(user))
        self.redirect("/")


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
