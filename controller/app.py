"""The controller's routes: one Tornado application over a `ControllerContext`."""

from __future__ import annotations

from pathlib import Path

import tornado.web

from marco.registration import REGISTER_PATH
from marco.serving import log_request

from .api import InventoryApi, LogoutApi, NodesApi, RevokeApi, RunApi, SessionApi, TokenApi
from .context import ControllerContext
from .deploy import DeployApi
from .page_socket import PageHub, PageSocket
from .pages import IndexPage, LoginPage, LogoutPage, RunPage, RunsPage
from .registration import RegisterApi
from .relay import RelaySocket
from .runs import ROUTES as RUN_ROUTES
from .terminal_relay import RelayLimits, TerminalRelays, TerminalRelaySocket

HERE = Path(__file__).resolve().parent


def make_app(ctx: ControllerContext) -> tornado.web.Application:
    """Build the web app: XSRF on, signed cookies, no debug mode, assets served locally."""
    routes = [
        (r"/", IndexPage),
        (r"/login", LoginPage),
        (r"/logout", LogoutPage),
        (r"/runs", RunsPage),
        (r"/runs/([^/]+)", RunPage),
        (r"/api/session", SessionApi),
        (r"/api/token", TokenApi),
        (r"/api/nodes", NodesApi),
        (r"/api/inventory", InventoryApi),
        (r"/api/run", RunApi),
        (r"/api/revoke", RevokeApi),
        (r"/api/logout", LogoutApi),
        (r"/api/deploy", DeployApi),
        (r"/relay/([^/]+)", RelaySocket),
        *RUN_ROUTES,
    ]
    # The page's one socket (issue 15); its hub holds the status and output feeds it shares.
    page_socket = (r"/page-socket", PageSocket, {"ctx": ctx, "hub": PageHub(ctx)})
    # Agents beyond one LAN register here (issue 15), authenticated by their certificates.
    register = (REGISTER_PATH, RegisterApi, {"registrations": ctx.registrations})
    # Terminals on the nodes (issue 16); the relays held per user.
    terminal = (r"/terminal/([^/]+)", TerminalRelaySocket,
                {"ctx": ctx, "relays": TerminalRelays(RelayLimits.of(ctx.config))})
    return tornado.web.Application(
        [(path, handler, {"ctx": ctx}) for path, handler in routes]
        + [page_socket, register, terminal],
        template_path=str(HERE / "templates"), static_path=str(HERE / "static"),
        cookie_secret=ctx.cookie_secret, key_version=max(ctx.cookie_secret), xsrf_cookies=True,
        login_url="/login",
        xsrf_cookie_kwargs={"samesite": "Strict"},
        websocket_ping_interval=30, websocket_max_message_size=1024 * 1024,
        log_function=log_request,
    )
