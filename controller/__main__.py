"""marco-controller: command line, start-up and shutdown of the web controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Sequence

from agent.errors import ConfigError
from agent.protocol import choose_mdns_interfaces
from agent.serving import close_server, stop_event_on_signals
from agent.settings import add_config_argument, add_options, load_settings
from agent.tokens import load_secret

from . import __version__
from .app import make_app
from .config import DEFAULT_CONFIG_FILE, ControllerConfig, controller_options
from .context import ControllerContext
from .discovery import ZeroconfBrowser

log = logging.getLogger("marco.controller")
BODY_CHUNK = 1024 * 1024  # uploads reach the deploy handler in chunks this large


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marco-controller",
        description="Marco controller: PAM login, live discovery of agents, Ansible inventory "
                    "and the web page with live output. Settings come from the config file, "
                    "then MARCO_* environment variables, then these flags.")
    parser.add_argument("--version", action="version", version=f"marco-controller {__version__}")
    add_config_argument(parser, DEFAULT_CONFIG_FILE)
    add_options(parser, controller_options())
    return parser


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> ControllerConfig:
    return ControllerConfig(**load_settings(controller_options(), args, environ, DEFAULT_CONFIG_FILE))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args, dict(os.environ))
        secret = load_secret(config.secret_file)
        ctx = ControllerContext.build(config, secret)
    except ConfigError as error:
        print(f"marco-controller: {error.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(ctx))
    except ConfigError as error:
        print(f"marco-controller: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"marco-controller: cannot listen on {config.bind}:{config.port}: "
              f"{error.strerror}", file=sys.stderr)
        return 1
    return 0


async def serve(ctx: ControllerContext) -> None:
    """Serve until SIGTERM/SIGINT: the web app, the zeroconf browser and the health probes."""
    config = ctx.config
    server = make_app(ctx).listen(config.port, config.bind, chunk_size=BODY_CHUNK)
    log.info("marco-controller %s on http://%s:%d (PAM service %r)", __version__, config.bind,
             config.port, config.pam_service)
    browser = None
    if config.discovery:
        interfaces = choose_mdns_interfaces(config.bind, config.mdns_interface)
        if interfaces:
            browser = ZeroconfBrowser(ctx.registry, interfaces, verify=ctx.health.verify)
        else:
            log.warning("not browsing: --bind %s is a wildcard and no --mdns-interface is set",
                        config.bind)
    ctx.revocations.load()
    ctx.pusher.watch()
    stop = stop_event_on_signals()
    try:
        if browser is not None:
            await browser.start()
        ctx.health.start()
        await stop.wait()
        log.info("stopping")
    finally:
        ctx.health.stop()
        if browser is not None:
            await browser.stop()
        await close_server(server)
        ctx.authenticator.close()


if __name__ == "__main__":
    sys.exit(main())
