"""marco-agent: command line, start-up and shutdown of the node daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tornado.ioloop import PeriodicCallback

from marco import __version__
from marco.errors import ConfigError
from marco.protocol import choose_mdns_interfaces, require_loopback
from marco.serving import Listening, close_server, listen, stop_event_on_signals
from marco.settings import add_config_argument, add_options, load_settings
from marco.tls import ServerTlsReloader
from marco.tokens import DEFAULT_SECRET_FILE, create_secret, load_secret, rotate_secret

from .app import make_app
from .config import DEFAULT_CONFIG_FILE, AgentConfig, agent_options
from .context import AgentContext
from .executions import use_pidfd_child_watcher
from .register import Registrar, check_register_settings

log = logging.getLogger("marco.agent")
EXPIRE_INTERVAL = 60.0
TLS_RELOAD_INTERVAL = 5.0
BODY_CHUNK = 1024 * 1024  # request bodies (uploads) reach handlers in chunks this large


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marco-agent",
        description="Marco node agent: runs commands and file transfers as the token's user "
                    "and streams their output live. Settings come from the config file, then "
                    "MARCO_* environment variables, then these flags.",
        epilog="Create the cluster secret first: marco-agent init-secret "
               "(the same secret file goes to the controller and every agent).")
    parser.add_argument("--version", action="version", version=f"marco-agent {__version__}")
    add_config_argument(parser, DEFAULT_CONFIG_FILE)
    add_options(parser, agent_options())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    init = commands.add_parser("init-secret", help="create a new cluster secret file (0600)")
    init.add_argument("--secret-file", dest="init_secret_file", metavar="PATH",
                      help="where to write it (default: $MARCO_SECRET_FILE or "
                           f"{DEFAULT_SECRET_FILE})")
    init.add_argument("--force", action="store_true", help="replace an existing secret")
    init.add_argument("--rotate", action="store_true",
                      help="append a new secret to the existing file: it signs from now on, "
                           "the old ones still verify until you delete their lines")
    return parser


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> AgentConfig:
    return AgentConfig(**load_settings(agent_options(), args, environ, DEFAULT_CONFIG_FILE))


def init_secret(args: argparse.Namespace, environ: dict[str, str]) -> int:
    path = args.init_secret_file or environ.get("MARCO_SECRET_FILE") or DEFAULT_SECRET_FILE
    if args.rotate:
        rotate_secret(path)
        print(f"added a new secret to {path}; copy the file to the controller and every agent, "
              "restart them, and delete the old first line once tokens signed with it have "
              "expired (--token-max-age)")
        return 0
    created = create_secret(path, overwrite=args.force)
    print(f"created {created} (mode 0600); copy it to the controller and every agent")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    try:
        if args.command == "init-secret":
            return init_secret(args, environ)
        config = load_config(args, environ)
        secret = load_secret(config.secret_file)
        tls = config.tls_files()
        if tls is None:
            require_loopback(config.bind)
            for address in config.mdns_interface:
                require_loopback(address, "--dev (announcing on --mdns-interface)")
        else:
            tls.context()  # refuse to start with missing or broken TLS files
        if config.controller:
            check_register_settings(config)
    except ConfigError as error:
        print(f"marco-agent: {error.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config, secret))
    except ConfigError as error:
        print(f"marco-agent: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"marco-agent: cannot listen on {config.bind}:{config.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0


async def serve(config: AgentConfig, secret: tuple[bytes, ...]) -> None:
    """Run the agent until SIGTERM or SIGINT, then unannounce, stop executions and exit."""
    use_pidfd_child_watcher()
    ctx = AgentContext.build(config, secret)
    ctx.executions.load()
    ctx.revocations.load()
    ctx.denied.load()
    ctx.audit.open()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, ctx.audit.reopen)  # logrotate
    tls = config.tls_files()
    server = listen(make_app(ctx), config.port, config.bind, config.connection_limits(),
                    xheaders=False, chunk_size=BODY_CHUNK,
                    ssl_options=tls.context() if tls else None)
    listening = Listening(os.getpid(), server.port, config.bind, "https" if tls else "http")
    log.info("marco-agent %s serving node %s on %s as %s", __version__, config.node_name,
             listening.url, "root (runs executions as each token's user)"
             if ctx.resolver.can_switch_user else f"uid {os.geteuid()} (serves only that user)")
    if tls is None:
        log.warning("DEVELOPMENT MODE (--dev): plain HTTP without TLS on loopback only; "
                    "tokens and output are not encrypted. Never use this on a network.")
    reloader = ServerTlsReloader(server, tls) if tls else None
    ctx.on_tls_change = reloader.check if reloader else None
    tls_watch = None
    if reloader is not None:
        def check_tls() -> None:
            reloader.check()
        tls_watch = PeriodicCallback(check_tls, TLS_RELOAD_INTERVAL * 1000)
    if tls_watch:
        tls_watch.start()
    announcer = None
    if config.announce:
        # Imported here: zeroconf is a tenth of the agent's start-up CPU, and an agent that
        # registers with its controller instead (--no-announce) never needs it.
        from .announce import Announcement, Announcer
        interfaces = choose_mdns_interfaces(config.bind, config.mdns_interface)
        if interfaces:
            announcer = Announcer(Announcement(
                node=config.node_name, port=server.port, addresses=tuple(interfaces),
                groups=tuple(config.groups), tls=tls is not None), interfaces)
        else:
            log.warning("not announcing: --bind %s is a wildcard and no --mdns-interface is set",
                        config.bind)
    # Registration with a controller mDNS does not reach; announcing stays as configured.
    registrar = Registrar(config, server.port) if config.controller else None
    stop = stop_event_on_signals()
    if announcer is not None:
        announcer.on_conflict = stop.set  # yielding our name: stop as on SIGTERM, then fail
    expiry = PeriodicCallback(ctx.executions.expire, EXPIRE_INTERVAL * 1000)
    expiry.start()
    try:
        listening.write(config.state_path)
        if announcer is not None:
            await announcer.start()
            log.info("announced %s on %s", config.node_name, ", ".join(interfaces))
        if registrar is not None:
            registrar.start()
        await stop.wait()
        log.info("stopping")
        ctx.executions.closing = True  # no new executions from kept-alive connections
        ctx.terminals.closing = True
    finally:
        expiry.stop()
        if tls_watch:
            tls_watch.stop()
        # No new connections first, then the goodbye: a controller checks a goodbye by
        # connecting to the node, and a node still answering is kept (a forged goodbye).
        server.stop()  # running executions get their answers below
        if announcer is not None:
            await announcer.stop()
        if registrar is not None:
            await registrar.stop()
        listening.remove(config.state_path)
        await ctx.terminals.shutdown()  # before the isolation closes under them
        await ctx.executions.shutdown()
        await close_server(server)
        ctx.status.close()
        ctx.audit.close()
    if announcer is not None and announcer.conflict is not None:
        raise ConfigError(announcer.conflict)


if __name__ == "__main__":
    sys.exit(main())
