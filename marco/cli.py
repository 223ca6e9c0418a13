"""marco: the command line for people: log in, list nodes, see their status, run a command on
many nodes with every line live.

    marco login [--controller URL] [--user NAME]
    marco logout [--everywhere]
    marco nodes
    marco status [NODE ...]
    marco run [--nodes a,b] [--group web] [--cwd DIR] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .client import AgentClient, AsyncAgentClient
from .controller_client import call_controller
from .credentials import find_token, forget_tls, node_tls, store_tls, store_token, stored_token_path
from .errors import AuthenticationError, MarcoError
from .keys import make_user_request

DEFAULT_CONTROLLER = "https://127.0.0.1:7380"
STOP_WAIT = 10.0  # seconds to wait for the exits after Ctrl-C (the agents' grace is 5 s)


class CliError(Exception):
    """A failure to report in one line (exit status 1)."""


def controller_path() -> Path:
    return stored_token_path().parent / "controller"


def controller_url(given: str | None) -> str:
    """--controller, else $MARCO_CONTROLLER, else the one `marco login` used, else the default."""
    if given:
        return given.rstrip("/")
    if os.environ.get("MARCO_CONTROLLER"):
        return os.environ["MARCO_CONTROLLER"].rstrip("/")
    try:
        return controller_path().read_text().strip().rstrip("/") or DEFAULT_CONTROLLER
    except OSError:
        return DEFAULT_CONTROLLER


def fetch_nodes(url: str, token: str) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = call_controller(url, "/api/nodes", token)["nodes"]
    return nodes


def choose(nodes: list[dict[str, Any]], names: list[str],
           group: str | None) -> list[dict[str, Any]]:
    alive = [n for n in nodes if n["alive"]]
    if names:
        by_name = {n["name"]: n for n in alive}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise CliError(f"unknown or unreachable node(s): {', '.join(missing)}")
        alive = [by_name[name] for name in names]
    if group:
        alive = [n for n in alive if group in n["groups"] or n["txt"].get("os") == group]
    if not alive:
        raise CliError("no node to run on (see: marco nodes)")
    return alive


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


# -- commands ----------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    url = controller_url(args.controller)
    user = args.user or getpass.getuser()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {user} at {url}: ")
    key, request = make_user_request(user)
    reply = call_controller(url, "/api/token", ca=args.ca,
                            body={"user": user, "password": password, "csr": request})
    path = store_token(reply["token"])
    if reply.get("certificate"):
        store_tls(reply["certificate"], key, reply["ca"], reply.get("crl"))
    else:
        forget_tls()  # a --dev controller: no certificate
    controller_path().write_text(url + "\n")
    hours = reply.get("max_age", 0) / 3600
    print(f"logged in as {reply['user']} at {url}; token"
          f"{' and client certificate' if reply.get('certificate') else ''} stored in "
          f"{path.parent} (valid {hours:.0f} h)")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    """Void the stored token on the controller and the nodes, then forget it; with
    --everywhere, void all of your tokens on every node."""
    url = controller_url(args.controller)
    if args.everywhere:
        reply = call_controller(url, "/api/revoke", find_token(), body={})
        missed = [name for name, r in reply["nodes"].items() if not r["ok"]]
        print(f"every token of {reply['user']} issued up to now is refused"
              + (f" (not yet told: {', '.join(missed)}; they learn it when they come back)"
                 if missed else ""))
    else:
        try:
            token = find_token()
        except AuthenticationError:
            print("not logged in")  # no token here: nothing to void, nothing to forget
            return 0
        try:
            reply = call_controller(url, "/api/logout", token, body={})
            missed = [name for name, r in reply["nodes"].items() if not r["ok"]]
            print("your token is void" + (f" (not yet told: {', '.join(missed)}; they learn "
                                          "it when they come back)" if missed else ""))
        except (MarcoError, CliError) as error:
            print(f"marco: could not void the token at {url} ({error}); it stays valid on the "
                  "nodes until it expires", file=sys.stderr)
    stored_token_path().unlink(missing_ok=True)
    forget_tls()
    print("logged out")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    url = controller_url(args.controller)
    nodes = fetch_nodes(url, find_token())
    if args.json:
        json.dump(nodes, sys.stdout, indent=2)
        print()
        return 0
    rows = [["NODE", "ADDRESS", "STATE", "GROUPS", "OS", "VERSION"]]
    for node in nodes:
        rows.append([node["name"], f"{node['host']}:{node['port']}",
                     "up" if node["alive"] else "down", ",".join(node["groups"]) or "-",
                     node["txt"].get("os", "-"), node["txt"].get("version", "-")])
    table(rows, sys.stdout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    url = controller_url(args.controller)
    token = find_token()
    nodes = choose(fetch_nodes(url, token), args.node, None)
    rows = [["NODE", "CPU", "MEM", "LOAD", "TEMP", "NET RX/TX", "TOP PROCESS"]]
    failed = False
    for node in nodes:
        try:
            with AgentClient(node["host"], node["port"], token, node=node["name"],
                             tls=node_tls(node.get("tls", True), node["host"])) as client:
                s = client.status()
        except MarcoError as error:
            rows.append([node["name"], "-", "-", "-", "-", "-", f"error: {error}"])
            failed = True
            continue
        top = s["processes"][0] if s["processes"] else None
        rows.append([
            node["name"], f"{s['cpu']['percent']:.0f}% of {s['cpu']['count']}",
            f"{s['memory']['used'] / 2**30:.1f}/{s['memory']['total'] / 2**30:.1f} GiB",
            " ".join(f"{x:.2f}" for x in s["load"]),
            "-" if s["temperature"] is None else f"{s['temperature']:.0f}°C",
            f"{s['network']['rx_rate'] / 1024:.0f}/{s['network']['tx_rate'] / 1024:.0f} KiB/s",
            f"{top['name']} ({top['user']}, {top['cpu']:.0f}%)" if top else "-"])
    table(rows, sys.stdout)
    return 1 if failed else 0


async def run_live(nodes: list[dict[str, Any]], token: str, command: str, cwd: str | None,
                   out: TextIO, err: TextIO) -> dict[str, int | str | None]:
    """Start `command` on every node, print lines live with a node prefix, Ctrl-C stops all."""
    width = max(len(n["name"]) for n in nodes)
    streams, ids = {}, {}
    results: dict[str, int | str | None] = {}
    for node in nodes:
        try:
            api = AsyncAgentClient(node["host"], node["port"], token, node=node["name"],
                                   tls=node_tls(node.get("tls", True), node["host"]))
            streams[node["name"]] = api.stream()
            await streams[node["name"]].connect()  # subscribe first: no line is missed
            ids[node["name"]] = await api.start(command, cwd=cwd, label="marco run")
        except MarcoError as error:
            results[node["name"]] = f"error: {error}"
            stream = streams.pop(node["name"], None)
            if stream is not None:
                stream.close()

    async def follow(name: str) -> None:
        stream, execution_id = streams[name], ids[name]
        prefix = name.ljust(width)
        try:
            while (event := await stream.read()) is not None:
                if event.get("id") != execution_id:
                    continue
                if event["type"] == "output":
                    target, mark = (err, "!") if event["stream"] == "stderr" else (out, "|")
                    target.write("".join(f"{prefix} {mark} {line}\n" for line in event["lines"]))
                    target.flush()
                elif event["type"] == "exit":
                    results[name] = event["rc"] if event["rc"] is not None else event["signal"]
                    return
        except MarcoError as error:
            results[name] = f"error: {error}"
        finally:
            stream.close()

    loop = asyncio.get_running_loop()
    following = asyncio.gather(*(follow(name) for name in streams))
    stopping = False

    def interrupt() -> None:
        """First Ctrl-C: stop the remote executions and wait a little for their exits.
        Second Ctrl-C (or no answer in time): stop waiting."""
        nonlocal stopping
        if stopping:
            following.cancel()
            return
        stopping = True
        err.write("\nstopping the remote executions (Ctrl-C again to stop waiting)…\n")
        for name, stream in streams.items():
            asyncio.ensure_future(stream.send({"type": "stop", "id": ids[name]}))
        loop.call_later(STOP_WAIT, following.cancel)

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        await following
    except asyncio.CancelledError:
        for name in streams:
            results.setdefault(name, "still running?")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for stream in streams.values():
            stream.close()
    return results


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise CliError("give the command after --, e.g.: marco run -- uptime")
    url = controller_url(args.controller)
    token = find_token()
    names = [n for part in args.nodes for n in part.split(",") if n]
    nodes = choose(fetch_nodes(url, token), names, args.group)
    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    results = asyncio.run(run_live(nodes, token, command, args.cwd, sys.stdout, sys.stderr))
    summary = ", ".join(f"{name}={rc}" for name, rc in sorted(results.items()))
    ok = all(rc == 0 for rc in results.values())
    print(f"{'ok' if ok else 'FAILED'}: {summary}", file=sys.stderr)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marco", description=__doc__.splitlines()[0])
    parser.add_argument("--controller", metavar="URL",
                        help="controller URL [env MARCO_CONTROLLER] (default: the one you "
                             f"logged in to, else {DEFAULT_CONTROLLER})")
    commands = parser.add_subparsers(dest="name", metavar="COMMAND", required=True)
    login = commands.add_parser("login", help="log in and store your token (0600)")
    login.add_argument("--user", help="Unix user name (default: you)")
    login.add_argument("--ca", metavar="FILE", help="the cluster CA to trust the controller "
                       "with [env MARCO_TLS_CA] (default: /etc/marco/ca.pem if readable)")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from stdin instead of prompting")
    login.set_defaults(func=cmd_login)
    logout = commands.add_parser("logout", help="forget your stored token")
    logout.add_argument("--everywhere", action="store_true",
                        help="also void every token of yours on every node (other browsers, "
                             "running Ansible)")
    logout.set_defaults(func=cmd_logout)
    nodes = commands.add_parser("nodes", help="list the nodes the controller knows")
    nodes.add_argument("--json", action="store_true", help="print JSON")
    nodes.set_defaults(func=cmd_nodes)
    status = commands.add_parser("status", help="CPU, memory, load, network of nodes")
    status.add_argument("node", nargs="*", help="node names (default: all up)")
    status.set_defaults(func=cmd_status)
    run = commands.add_parser("run", help="run a command on nodes, output live")
    run.add_argument("--nodes", action="append", default=[], metavar="A,B",
                     help="node names (default: all up)")
    run.add_argument("--group", help="only nodes of this group (or OS)")
    run.add_argument("--cwd", help="working directory on the nodes (default: your home)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return int(args.func(args))
    except MarcoError as error:
        print(f"marco: {error}", file=sys.stderr)
        return 1
    except CliError as error:
        print(f"marco: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
