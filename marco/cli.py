"""marco: the command line for people: log in, list nodes, see their status, run a command on
many nodes with every line live, list your runs and read their output.

    marco login [--controller URL] [--user NAME]
    marco logout [--everywhere]
    marco nodes [--json]
    marco status [--json] [NODE ...]
    marco run [--nodes a,b] [--group web] [--cwd DIR] [--json] -- COMMAND ...
    marco runs [--kind K] [--status S] [--search TEXT] [--limit N] [--json]
    marco logs RUN [--follow] [--host H]
    marco shell NODE [--no-record] [-- COMMAND ...]
    marco --version
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib.metadata
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .client import AgentClient, AgentStream, AsyncAgentClient
from .controller_client import ControllerClient, call_controller
from .credentials import find_token, forget_tls, node_tls, store_tls, store_token, stored_token_path
from .errors import (
    AgentUnreachable,
    AuthenticationError,
    MarcoError,
    NotFound,
    UsageError,
    error_from_response,
)
from .keys import make_user_request
from .runs import KINDS, RUN_ID, STATUSES, host_failed
from .shell_cli import add_parser as add_shell_parser
from .shell_cli import cmd_shell as shell_session

DEFAULT_CONTROLLER = "https://127.0.0.1:7380"
STOP_WAIT = 10.0  # seconds to wait for the exits after Ctrl-C (the agents' grace is 5 s)
FOLLOW_INTERVAL = 1.0  # seconds between two looks at a followed run
OUTPUT_PAGE_LINES = 5000  # output lines asked for per request (the controller's default)
RUNS_PAGE = 200  # runs asked for per request (the controller may answer fewer)
TITLE_WIDTH = 60  # characters of a run's title in `marco runs`

# Exit statuses, as Ansible's: a failed command (1) is told from an unreachable node (4).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 4, 130
EXIT_CODES = """exit status:
  0    all went well
  1    a command failed on some node (exit code not 0, or killed), or an error: not logged
       in, the controller unreachable or refusing
  2    a usage error: bad arguments, an unknown node, a malformed run id
  4    some node could not be reached (wins over 1, as in Ansible)
  130  interrupted (Ctrl-C) before anything ran"""


@dataclass
class NodeResult:
    """How a command ended on one node: `ok`, `failed` (rc not 0 or killed), `unreachable`,
    `error` (refused, e.g. a bad cwd) or `unknown` (still running when we stopped waiting)."""

    status: str
    rc: int | None = None
    signal: str | None = None
    execution_id: str | None = None
    error: str | None = None
    code: str | None = None  # the error's wire code (marco/errors.py)

    @classmethod
    def from_error(cls, error: MarcoError) -> NodeResult:
        status = "unreachable" if isinstance(error, AgentUnreachable) else "error"
        return cls(status, error=str(error), code=error.code)

    @classmethod
    def from_exit(cls, event: dict[str, Any]) -> NodeResult:
        ok = event["rc"] == 0
        return cls("ok" if ok else "failed", event["rc"], event["signal"], event["id"])

    def short(self) -> str:
        """For the summary line: the rc, the signal, or what went wrong."""
        if self.rc is not None:
            return str(self.rc)
        if self.signal:
            return self.signal
        return f"{self.status}: {self.error}" if self.error else self.status

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "rc": self.rc, "signal": self.signal,
                "execution_id": self.execution_id, "error": self.error, "code": self.code}


def exit_status(results: dict[str, NodeResult]) -> int:
    """4 if a node could not be reached, else 1 if the command did not succeed everywhere."""
    statuses = {result.status for result in results.values()}
    if "unreachable" in statuses:
        return EXIT_UNREACHABLE
    return EXIT_OK if statuses <= {"ok"} else EXIT_FAILED


def package_version() -> str:
    """The installed distribution's version (this source tree's when not installed)."""
    try:
        return importlib.metadata.version("marco")
    except importlib.metadata.PackageNotFoundError:
        return __version__


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


def controller(args: argparse.Namespace) -> ControllerClient:
    """The controller's API with the stored (or MARCO_TOKEN) login."""
    return ControllerClient(controller_url(args.controller), find_token())


def choose(nodes: list[dict[str, Any]], names: list[str],
           group: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the nodes to act on, the named ones the controller sees down). Without names: every
    node up; a name the controller does not know is a usage error."""
    if names:
        by_name = {n["name"]: n for n in nodes}
        unknown = [name for name in dict.fromkeys(names) if name not in by_name]
        if unknown:
            raise UsageError(f"unknown node(s): {', '.join(unknown)} (see: marco nodes)")
        nodes = [by_name[name] for name in dict.fromkeys(names)]
    if group:
        nodes = [n for n in nodes if group in n["groups"] or n["txt"].get("os") == group]
    alive = [n for n in nodes if n["alive"]]
    down = [n for n in nodes if not n["alive"]] if names else []
    if not alive and not down:
        raise NotFound("no node to run on", hint="see: marco nodes")
    return alive, down


def down_result(node: dict[str, Any]) -> NodeResult:
    why = f" ({node['error']})" if node.get("error") else ""
    return NodeResult("unreachable", error=f"the controller sees {node['name']} down{why}",
                      code=AgentUnreachable.code)


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
        except MarcoError as error:
            print(f"marco: could not void the token at {url} ({error}); it stays valid on the "
                  "nodes until it expires", file=sys.stderr)
    stored_token_path().unlink(missing_ok=True)
    forget_tls()
    print("logged out")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = controller(args).nodes()
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
    client = controller(args)
    alive, down = choose(client.nodes(), args.node, None)
    results = {node["name"]: down_result(node) for node in down}
    statuses: dict[str, dict[str, Any]] = {}
    for node in alive:
        try:
            with AgentClient(node["host"], node["port"], client.token, node=node["name"],
                             tls=node_tls(node.get("tls", True), node["host"])) as agent:
                statuses[node["name"]] = agent.status()
            results[node["name"]] = NodeResult("ok")
        except MarcoError as error:
            results[node["name"]] = NodeResult.from_error(error)
    names = [node["name"] for node in alive + down]
    if args.json:
        json.dump([{"name": name, "ok": name in statuses, "status": statuses.get(name),
                    "error": None if name in statuses else {
                        "error": results[name].code, "message": results[name].error}}
                   for name in names], sys.stdout, indent=2)
        print()
    else:
        rows = [["NODE", "CPU", "MEM", "LOAD", "TEMP", "NET RX/TX", "TOP PROCESS"]]
        rows += [status_row(name, statuses[name]) if name in statuses
                 else [name, "-", "-", "-", "-", "-", results[name].short()] for name in names]
        table(rows, sys.stdout)
    return exit_status(results)


def status_row(name: str, s: dict[str, Any]) -> list[str]:
    """One node's line of `marco status` from its agent's status."""
    top = s["processes"][0] if s["processes"] else None
    return [name, f"{s['cpu']['percent']:.0f}% of {s['cpu']['count']}",
            f"{s['memory']['used'] / 2**30:.1f}/{s['memory']['total'] / 2**30:.1f} GiB",
            " ".join(f"{x:.2f}" for x in s["load"]),
            "-" if s["temperature"] is None else f"{s['temperature']:.0f}°C",
            f"{s['network']['rx_rate'] / 1024:.0f}/{s['network']['tx_rate'] / 1024:.0f} KiB/s",
            f"{top['name']} ({top['user']}, {top['cpu']:.0f}%)" if top else "-"]


async def open_streams(nodes: list[dict[str, Any]], token: str
                       ) -> tuple[dict[str, AgentStream], dict[str, NodeResult]]:
    """Subscribe to every node's stream of our executions before anything starts, so no line
    is missed: (the open streams, the nodes that could not be subscribed to)."""

    async def connect(node: dict[str, Any]) -> AgentStream | NodeResult:
        try:
            stream = AsyncAgentClient(node["host"], node["port"], token, node=node["name"],
                                      tls=node_tls(node.get("tls", True), node["host"])).stream()
        except MarcoError as error:
            return NodeResult.from_error(error)
        try:
            await stream.connect()
            return stream
        except MarcoError as error:
            stream.close()
            return NodeResult.from_error(error)

    outcomes = await asyncio.gather(*(connect(node) for node in nodes))
    streams, failed = {}, {}
    for node, outcome in zip(nodes, outcomes, strict=True):
        if isinstance(outcome, NodeResult):
            failed[node["name"]] = outcome
        else:
            streams[node["name"]] = outcome
    return streams, failed


def started_ids(answer: dict[str, Any], results: dict[str, NodeResult]) -> dict[str, str]:
    """The execution id per node the controller started the command on; the nodes where it
    could not start go into `results` with the error the controller answered."""
    ids = {}
    for name, started in answer["results"].items():
        if started.get("ok"):
            ids[name] = started["id"]
        else:
            results[name] = NodeResult.from_error(error_from_response(
                500, started.get("error"), str(started.get("message", "")), started.get("hint")))
    return ids


async def run_live(client: ControllerClient, nodes: list[dict[str, Any]], command: str,
                   cwd: str | None, out: TextIO | None, err: TextIO
                   ) -> tuple[dict[str, NodeResult], dict[str, Any] | None]:
    """Have the controller start `command` on every node as one run while we follow each
    node's stream: lines live with a node prefix (none when `out` is None), Ctrl-C stops
    all. Returns the result per node and the run (`id`, absolute `url`) if one was made."""
    assert client.token is not None
    streams, results = await open_streams(nodes, client.token)
    if not streams:
        return results, None
    loop = asyncio.get_running_loop()
    try:
        answer = await loop.run_in_executor(None, client.start_run, list(streams), command, cwd)
    except BaseException:
        for stream in streams.values():
            stream.close()
        raise
    ids = started_ids(answer, results)
    for name in set(streams) - set(ids):
        streams.pop(name).close()
    run = answer.get("run")
    if run is not None:
        run = {"id": run["id"], "url": client.permalink(run["url"])}
        if out is not None:
            err.write(f"run {run['id']}  {run['url']}\n")
            err.flush()
    if streams:
        await follow_all(streams, ids, results, out, err)
    return results, run


async def follow_all(streams: dict[str, AgentStream], ids: dict[str, str],
                     results: dict[str, NodeResult], out: TextIO | None, err: TextIO) -> None:
    """Read every node's stream until its execution exits (or we stop waiting)."""
    width = max(len(name) for name in streams)

    async def follow(name: str) -> None:
        stream, execution_id = streams[name], ids[name]
        prefix = name.ljust(width)
        try:
            while (event := await stream.read()) is not None:
                if event.get("id") != execution_id:
                    continue
                if event["type"] == "output" and out is not None:
                    target, mark = (err, "!") if event["stream"] == "stderr" else (out, "|")
                    target.write("".join(f"{prefix} {mark} {line}\n" for line in event["lines"]))
                    target.flush()
                elif event["type"] == "exit":
                    results[name] = NodeResult.from_exit(event)
                    return
            results[name] = NodeResult("unknown", execution_id=execution_id,
                                       error="the agent closed the stream")
        except MarcoError as error:
            results[name] = NodeResult.from_error(error)
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
            results.setdefault(name, NodeResult("unknown", execution_id=ids[name],
                                                error="still running?"))
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for stream in streams.values():
            stream.close()


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise UsageError("give the command after --, e.g.: marco run -- uptime")
    client = controller(args)
    names = [n for part in args.nodes for n in part.split(",") if n]
    alive, down = choose(client.nodes(), names, args.group)
    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    results = {node["name"]: down_result(node) for node in down}
    run = None
    if alive:
        live, run = asyncio.run(run_live(client, alive, command, args.cwd,
                                         None if args.json else sys.stdout, sys.stderr))
        results.update(live)
    code = exit_status(results)
    if args.json:
        status = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_UNREACHABLE: "unreachable"}[code]
        json.dump({"run": run, "status": status,
                   "nodes": {name: results[name].as_json() for name in sorted(results)}},
                  sys.stdout, indent=2)
        print()
    else:
        summary = ", ".join(f"{name}={results[name].short()}" for name in sorted(results))
        print(f"{'ok' if code == EXIT_OK else 'FAILED'}: {summary}", file=sys.stderr)
    return code


# -- runs ----------------------------------------------------------------------------------------

def run_id(text: str) -> str:
    """A run id as given on the command line (argparse type): r + 20 hex digits."""
    if not RUN_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (r + 20 hex digits; "
                                         "see: marco runs)")
    return text


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def list_runs(client: ControllerClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Up to --limit of the caller's runs, newest first, page by page."""
    runs: list[dict[str, Any]] = []
    before = None
    while len(runs) < args.limit:
        page, more = client.runs(args.kind, args.status, args.search, before,
                                 min(RUNS_PAGE, args.limit - len(runs)))
        runs += page
        if not more or not page:
            break
        before = page[-1]["id"]
    return runs[:args.limit]


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 2h07m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def hosts_ok_failed(run: dict[str, Any]) -> str:
    """`ok/failed` hosts by the run's stats (a host with a failed or unreachable count failed);
    hosts without stats yet count in neither."""
    stats = run.get("stats") or {}
    failed = sum(1 for counts in stats.values() if host_failed(counts))
    return f"{len(stats) - failed}/{failed}"


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())  # a multi-line command on one line
    return text if len(text) <= width else text[:width - 1] + "…"


def run_row(run: dict[str, Any], now: float) -> list[str]:
    """One line of `marco runs`; a running run's duration so far ends with `…`."""
    ended = run.get("ended")
    took = duration((ended if ended is not None else now) - run["started"])
    return [run["id"], run["status"], run["kind"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"])),
            took if ended is not None else took + "…", hosts_ok_failed(run),
            shorten(run["title"], TITLE_WIDTH)]


def cmd_runs(args: argparse.Namespace) -> int:
    runs = list_runs(controller(args), args)
    if args.json:
        json.dump(runs, sys.stdout, indent=2)
        print()
        return EXIT_OK
    if not runs:
        print("no runs", file=sys.stderr)
        return EXIT_OK
    now = time.time()
    rows = [["RUN", "STATUS", "KIND", "STARTED", "DURATION", "HOSTS OK/FAILED", "TITLE"]]
    table(rows + [run_row(run, now) for run in runs], sys.stdout)
    return EXIT_OK


class RunLogs:
    """A run's output as `host | line` (stderr lines `host ! line`), all on one stream so their
    order is kept: each execution's lines once, in seq order, read page by page from where the
    last page ended (`GET /api/runs/ID/output?execution=&since=`)."""

    def __init__(self, client: ControllerClient, run: str, host: str | None,
                 out: TextIO) -> None:
        self.client, self.run, self.host, self.out = client, run, host, out
        self.next: dict[str, int] = {}  # execution id -> the seq of its next line to print
        self.ended: set[str] = set()    # executions no line will ever be added to (`end`)

    def read(self) -> None:
        """One look: the run's executions, then the new lines of each not known ended."""
        for execution in self.client.run_executions(self.run, host=self.host):
            if execution["execution_id"] not in self.ended:
                self.drain(execution["execution_id"], execution["host"])
        self.out.flush()

    def drain(self, execution: str, host: str) -> None:
        """Pages of the execution's output until its end or a page that brings nothing new."""
        while True:
            since = self.next.get(execution, 0)
            page = self.client.execution_output(self.run, execution, since, OUTPUT_PAGE_LINES)
            self.show(execution, page.get("host") or host, page["events"])
            self.next[execution] = max(self.next.get(execution, 0), int(page["next"]))
            if page["end"]:
                self.ended.add(execution)
                return
            if self.next[execution] <= since:
                return

    def show(self, execution: str, host: str, events: list[dict[str, Any]]) -> None:
        """The events' lines not printed yet (an event may start before the next one)."""
        for event in events:
            lines, first = event.get("lines") or [], int(event["seq"])
            fresh = lines[max(0, self.next.get(execution, first) - first):]
            if fresh:
                mark = "!" if event.get("stream") == "stderr" else "|"
                self.out.write("".join(f"{host} {mark} {line}\n" for line in fresh))
                self.next[execution] = first + len(lines)


def cmd_logs(args: argparse.Namespace) -> int:
    """The run's output; with --follow, looks at the run and its new lines until the run
    ends (the last look comes after the end, so nothing is missed)."""
    client = controller(args)
    logs = RunLogs(client, args.run, args.host, sys.stdout)
    if not args.follow:
        logs.read()
        return EXIT_OK
    while True:
        # Only `ended` matters here: one event is the least the controller sends with it.
        run = client.run(args.run, limit=1)
        logs.read()
        if run["ended"] is not None:
            return EXIT_OK
        time.sleep(FOLLOW_INTERVAL)


def cmd_shell(args: argparse.Namespace) -> int:
    """A terminal on a node (marco/shell_cli.py)."""
    return shell_session(args, controller_url(args.controller))


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="marco", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"marco {package_version()}")
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
    nodes.add_argument("--json", action="store_true",
                       help="print JSON: a list of nodes (name, host, port, alive, groups, "
                            "txt, ...)")
    nodes.set_defaults(func=cmd_nodes)
    status = commands.add_parser("status", help="CPU, memory, load, network of nodes",
                                 epilog=EXIT_CODES, formatter_class=raw)
    status.add_argument("node", nargs="*", help="node names (default: all up)")
    status.add_argument("--json", action="store_true",
                        help="print JSON: a list of {name, ok, status (the agent's, or null), "
                             "error (null, or {error, message})}")
    status.set_defaults(func=cmd_status)
    run = commands.add_parser("run", help="run a command on nodes as one run, output live",
                              epilog=EXIT_CODES, formatter_class=raw)
    run.add_argument("--nodes", action="append", default=[], metavar="A,B",
                     help="node names (default: all up)")
    run.add_argument("--group", help="only nodes of this group (or OS)")
    run.add_argument("--cwd", help="working directory on the nodes (default: your home)")
    run.add_argument("--json", action="store_true",
                     help="no live lines; at the end one JSON document: {run: {id, url} or "
                          "null, status: ok|failed|unreachable, nodes: {NAME: {status, rc, "
                          "signal, execution_id, error, code}}} (the output: marco logs RUN)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    run.set_defaults(func=cmd_run)
    runs = commands.add_parser("runs", help="your runs, newest first")
    runs.add_argument("--kind", choices=KINDS, help="only runs of this kind")
    runs.add_argument("--status", choices=STATUSES, help="only runs with this status")
    runs.add_argument("--search", metavar="TEXT", help="only runs whose title contains TEXT")
    runs.add_argument("--limit", type=positive, default=20, metavar="N",
                      help="at most N runs (default: 20)")
    runs.add_argument("--json", action="store_true",
                      help="print JSON: a list of runs as the controller has them (id, owner, "
                           "kind, title, hosts, started, ended, status, stats, meta)")
    runs.set_defaults(func=cmd_runs)
    logs = commands.add_parser("logs", help="the output of a run: every line of every host, "
                                            "as 'HOST | line' (stderr lines 'HOST ! line')")
    logs.add_argument("run", type=run_id, metavar="RUN", help="the run's id (see: marco runs)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help=f"keep printing new lines until the run ends (looks every "
                           f"{FOLLOW_INTERVAL:g} s)")
    logs.add_argument("--host", metavar="H", help="only this host's output")
    logs.set_defaults(func=cmd_logs)
    add_shell_parser(commands).set_defaults(func=cmd_shell)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return int(args.func(args))
    except UsageError as error:  # a mistake in the command line, as argparse's
        print(f"marco: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MarcoError as error:
        print(f"marco: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
