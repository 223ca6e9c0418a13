"""marco-controller: command line, start-up and shutdown of the web controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tornado.ioloop import PeriodicCallback

from marco.discovery import DiscoveryLimits, ZeroconfBrowser
from marco.errors import MarcoError
from marco.nodes import parse_static_node
from marco.protocol import choose_mdns_interfaces, require_loopback
from marco.serving import Listening, close_server, listen, stop_event_on_signals
from marco.settings import add_config_argument, add_options, load_settings
from marco.tls import ServerTlsReloader
from marco.tokens import create_secret, load_secret

from . import __version__
from .app import make_app
from .config import DEFAULT_CONFIG_FILE, ControllerConfig, controller_options
from .context import ControllerContext
from .pki import ClusterPki, write_secret_copy

log = logging.getLogger("marco.controller")
BODY_CHUNK = 1024 * 1024  # uploads reach the deploy handler in chunks this large
TLS_RELOAD_MS = 5000
RUNS_PRUNE_MS = 3600 * 1000  # the runs store is pruned to its bounds hourly (and at start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marco-controller",
        description="Marco controller: PAM login, live discovery of agents, Ansible inventory "
                    "and the web page with live output. Settings come from the config file, "
                    "then MARCO_* environment variables, then these flags.")
    parser.add_argument("--version", action="version", version=f"marco-controller {__version__}")
    add_config_argument(parser, DEFAULT_CONFIG_FILE)
    add_options(parser, controller_options())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    init = commands.add_parser(
        "init", help="create the cluster: secret (if missing), CA, controller certificate, CRL")
    init.add_argument("--name", dest="san", action="append", default=[], metavar="NAME",
                      help="another DNS name or IP address users reach the controller by "
                           "(repeatable; the host name, localhost and 127.0.0.1 are included)")
    issue = commands.add_parser("issue-agent", help="issue a node's certificate: writes a "
                                "bundle directory to copy to the node's /etc/marco/")
    issue.add_argument("node", metavar="NODE", help="the node name (as the agent announces it)")
    issue.add_argument("--out", metavar="DIR", help="bundle directory (default ./NODE.marco)")
    issue.add_argument("--days", type=float, help="validity in days (default 825)")
    client = commands.add_parser("issue-client", help="issue a long-lived client certificate "
                                 "(for automation; users get short-lived ones at `marco login`)")
    client.add_argument("node", metavar="NAME")
    client.add_argument("--out", metavar="DIR", help="bundle directory (default ./NAME.marco)")
    client.add_argument("--days", type=float, help="validity in days (default 825)")
    renew = commands.add_parser("renew-controller", help="a new certificate for the controller "
                                "(same names, plus --name ...); the running one reloads it")
    renew.add_argument("--name", dest="san", action="append", default=[], metavar="NAME")
    revoke = commands.add_parser("revoke-cert", help="revoke certificates by name or serial "
                                 "and rewrite the CRL (a running controller pushes it to every "
                                 "agent)")
    revoke.add_argument("which", metavar="NAME|SERIAL")
    commands.add_parser("list-certs", help="the certificates this CA issued")
    return parser


def admin(args: argparse.Namespace, config: ControllerConfig) -> int:
    """The cluster admin's commands (init, issue-*, revoke-cert, list-certs)."""
    pki = ClusterPki(config.pki_dir)
    if args.command == "init":
        if not os.path.exists(config.secret_file):
            print(f"created {create_secret(config.secret_file)} (the cluster secret, 0600)")
        pki.init(args.san)
        print(f"created the cluster CA and the controller's certificate in {pki.dir}\n"
              f"  give every node a bundle: marco-controller issue-agent NODE\n"
              f"  browsers: trust {pki.ca_file} or accept the controller's certificate once")
    elif args.command in ("issue-agent", "issue-client"):
        kind = "agent" if args.command == "issue-agent" else "client"
        out = Path(args.out or f"{args.node}.marco")
        bundle = pki.issue(args.node, kind, days=args.days, out_dir=out)
        if kind == "agent":
            write_secret_copy(config.secret_file, out / "secret")
        print(f"wrote {out}/ (serial {bundle.serial}, valid until "
              f"{bundle.not_after:%Y-%m-%d}): "
              + ("copy its files to /etc/marco/ on the node (keep agent.key and secret 0600)"
                 if kind == "agent" else "point MARCO_CLIENT_CERT/KEY/CA at its files"))
    elif args.command == "renew-controller":
        bundle = pki.renew_controller(args.san)
        print(f"renewed {bundle.cert_file} (serial {bundle.serial}, valid until "
              f"{bundle.not_after:%Y-%m-%d}); a running controller uses it within 5 s")
    elif args.command == "revoke-cert":
        serials = pki.revoke(args.which)
        print(f"revoked {', '.join(map(str, serials))}; a running controller pushes "
              f"{pki.crl_file} to every live agent within seconds (agents that are down get it "
              "when they come back); without one, copy it to each agent's /etc/marco/crl.pem")
    elif args.command == "list-certs":
        for serial, record in sorted(pki.issued().items(), key=lambda item: item[1]["name"]):
            state = "revoked" if record.get("revoked") else f"until {record['not_after'][:10]}"
            print(f"{record['name']:<24} {record['kind']:<10} {state:<17} {serial}")
    return 0


def load_config(args: argparse.Namespace, environ: dict[str, str]) -> ControllerConfig:
    return ControllerConfig(**load_settings(controller_options(), args, environ,
                                            DEFAULT_CONFIG_FILE))


def discovery_limits(config: ControllerConfig) -> DiscoveryLimits:
    """How the browser tries announced agents not listed yet (checked at start-up)."""
    return DiscoveryLimits(retry_names=config.discovery_retry_names,
                           retry_longest=config.discovery_retry_longest,
                           retry_tries=config.discovery_retry_tries,
                           rebrowse=config.discovery_rebrowse,
                           receive_buffer=config.discovery_receive_buffer)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args, dict(os.environ))
        if args.command:
            return admin(args, config)
        if config.dev:
            require_loopback(config.bind)
            for address in config.mdns_interface:
                require_loopback(address, "--dev (browsing on --mdns-interface)")
            for spec in config.node:
                require_loopback(parse_static_node(spec).host, "--dev (static --node)")
        discovery_limits(config)
        secret = load_secret(config.secret_file)
        ctx = ControllerContext.build(config, secret)
    except MarcoError as error:
        print(f"marco-controller: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"marco-controller: {error.filename or ''}: {error.strerror or error}",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(ctx))
    except MarcoError as error:
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
    tls = ctx.web_tls
    server = listen(make_app(ctx), config.port, config.bind, config.connection_limits(),
                    chunk_size=BODY_CHUNK, ssl_options=tls.context() if tls else None)
    listening = Listening(os.getpid(), server.port, config.bind, "https" if tls else "http")
    log.info("marco-controller %s on %s (PAM service %r)", __version__, listening.url,
             config.pam_service)
    if tls is None:
        log.warning("DEVELOPMENT MODE (--dev): plain HTTP on loopback, agents without TLS. "
                    "Never use this on a network.")
    if config.web_cert and ctx.registrations is not None:
        # Registering agents check this port's certificate against the cluster CA only.
        log.warning("--web-cert with registration on: agents registering with --controller "
                    "check this port's certificate against the cluster CA and refuse %s "
                    "unless the cluster CA issued it (turn registration off with "
                    "--no-registration, or leave --web-cert unset)", config.web_cert)
    reloader = ServerTlsReloader(server, tls) if tls else None

    async def tls_files_changed() -> None:
        if reloader is not None:
            reloader.check()
        await ctx.pusher.check_crl()

    reload = PeriodicCallback(tls_files_changed, TLS_RELOAD_MS) if tls else None
    if reload:
        reload.start()
    browser = None
    if config.discovery:
        interfaces = choose_mdns_interfaces(config.bind, config.mdns_interface)
        if interfaces:
            browser = ZeroconfBrowser(ctx.registry, interfaces, verify=ctx.health.probe,
                                      limits=discovery_limits(config))
        else:
            log.warning("not browsing: --bind %s is a wildcard and no --mdns-interface is set",
                        config.bind)
    ctx.revocations.load()
    ctx.denied.load()
    ctx.pusher.watch()
    await ctx.runs.start()
    prune = PeriodicCallback(ctx.runs.prune, RUNS_PRUNE_MS)
    prune.start()
    stop = stop_event_on_signals()
    try:
        listening.write(Path(config.state_dir))
        if browser is not None:
            await browser.start()
        ctx.health.start()
        await stop.wait()
        log.info("stopping")
    finally:
        server.stop()  # no new connections: the file no longer holds
        listening.remove(Path(config.state_dir))
        if reload:
            reload.stop()
        prune.stop()
        ctx.health.stop()
        if browser is not None:
            await browser.stop()
        await close_server(server)
        await ctx.runs.close()
        await ctx.shared.close()
        ctx.authenticator.close()


if __name__ == "__main__":
    sys.exit(main())
