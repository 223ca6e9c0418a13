"""The agent's settings: option list, defaults, and the `AgentConfig` they produce."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from marco.errors import ConfigError
from marco.protocol import DEFAULT_PORT
from marco.serving import ConnectionLimits, connection_limit_options, port_option
from marco.settings import Option, default_state_dir
from marco.shells import login_shells_option
from marco.tls import DEFAULT_TLS_DIR, ServerTlsFiles
from marco.tokens import DEFAULT_MAX_AGE, DEFAULT_SECRET_FILE

DEFAULT_CONFIG_FILE = "/etc/marco/agent.toml"


def default_helper_python() -> str:
    """A Python every user can execute (runs the file helper as the user)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def agent_options() -> list[Option]:
    """Every agent setting, in --help order."""
    return [
        Option("bind", "127.0.0.1", "address to listen on", metavar="ADDR"),
        port_option(DEFAULT_PORT),
        Option("secret_file", DEFAULT_SECRET_FILE, "cluster secret file (0600)", metavar="PATH"),
        Option("tls_cert", f"{DEFAULT_TLS_DIR}/agent.pem", "this node's certificate (from "
               "`marco-controller issue-agent NODE`)", metavar="PATH"),
        Option("tls_key", f"{DEFAULT_TLS_DIR}/agent.key", "its private key (0600)",
               metavar="PATH"),
        Option("tls_ca", f"{DEFAULT_TLS_DIR}/ca.pem", "the cluster CA: clients must present a "
               "certificate it issued", metavar="PATH"),
        Option("tls_crl", f"{DEFAULT_TLS_DIR}/crl.pem", "the CA's revocation list (reloaded "
               "when it changes)", metavar="PATH"),
        Option("dev", False, "development mode: plain HTTP without TLS, only on a loopback "
               "address", flag=True),
        Option("state_dir", default_state_dir("marco-agent"),
               "where execution output is spooled",
               metavar="DIR"),
        Option("node_name", socket.gethostname().split(".")[0], "node name announced",
               metavar="NAME"),
        Option("groups", [], "inventory groups of this node (comma separated)", repeatable=True,
               metavar="A,B"),
        Option("mdns_interface", [], "address of an interface to announce on (repeatable); "
               "default: the bind address unless it is a wildcard", repeatable=True,
               metavar="ADDR"),
        Option("announce", True, "announce the agent by zeroconf", flag=True),
        Option("token_max_age", DEFAULT_MAX_AGE, "seconds a token stays valid", kind=int),
        Option("retention", 24 * 3600, "seconds finished executions' output is kept", kind=int),
        Option("retention_count", 200, "finished executions kept per user", kind=int),
        Option("spool_max_bytes", 64 * 1024 * 1024, "output kept on disk per execution (bytes)",
               kind=int),
        Option("spool_max_bytes_per_user", 1024 ** 3, "disk one user's executions may use: "
               "output spools, their records and ?wait=1 captures, running ones included; the "
               "oldest finished executions go first, then new ones get 507 (bytes)", kind=int),
        Option("max_running_per_user", 64, "executions one user may run at once", kind=int),
        Option("cgroups", "auto", "a cgroup v2 per execution, killed whole on stop: auto (when "
               "the agent's cgroup is delegated and writable), on (refuse to start without) or "
               "off (a child subreaper finds each execution's processes instead)",
               metavar="MODE"),
        Option("max_pids_per_user", 4096, "processes and threads one user's executions may "
               "have at once (pids.max of the user's cgroup, else RLIMIT_NPROC, which counts "
               "all of the user's processes on the node); 0: no limit", kind=int),
        Option("max_memory_per_user", 0, "memory one user's executions may use together "
               "(bytes, memory.max of the user's cgroup; needs the cgroup v2 memory "
               "controller); 0: no limit", kind=int),
        Option("max_command_bytes", 256 * 1024, "largest command: argv or shell, env and cwd "
               "together (bytes; more gets 413, send data as stdin or a file)", kind=int),
        Option("max_capture_bytes", 256 * 1024 * 1024, "stdout (and stderr) a ?wait=1 caller "
               "gets back, per stream; the rest is only streamed and spooled (bytes)", kind=int),
        Option("max_stdin_bytes", 16 * 1024 * 1024, "largest stdin of one execution, held in "
               "memory until the command reads it (bytes; more gets 413, send a file)",
               kind=int),
        Option("max_sockets_per_user", 32, "WebSockets (/v1/stream) one user may hold open at "
               "once (more are closed with 4429)", kind=int),
        Option("max_socket_pending_bytes", 32 * 1024 * 1024, "bytes queued for one socket "
               "before it counts as too slow and is closed with 4408 (it reconnects and replays)",
               kind=int),
        Option("max_upload_bytes", 64 * 1024 ** 3, "largest file upload (bytes)", kind=int),
        *connection_limit_options(),
        Option("stop_grace", 5.0, "seconds between SIGTERM and SIGKILL on stop", kind=float),
        login_shells_option(),
        Option("allowed_origins", [], "browser origins allowed to open /v1/stream "
               "(default: any; the socket is authenticated by token, not cookie)",
               repeatable=True, metavar="URL"),
        Option("audit_log", "", "audit log file (JSON lines, 0600; default STATE_DIR/audit.log)",
               metavar="PATH"),
        Option("audit_max_bytes", 64 * 1024 * 1024, "size at which the audit log is rotated to "
               "AUDIT_LOG.1 (0: never; reopen it with SIGHUP after an external logrotate)",
               kind=int),
        Option("audit_backups", 4, "rotated audit logs kept (AUDIT_LOG.1 is the newest)",
               kind=int),
        Option("runner", True, "run pipelined Ansible modules in a warm module runner: a "
               "Python process per user (as that user) that keeps ansible-core's module_utils "
               "imported and forks a fresh child per task, instead of a new interpreter each "
               "(--no-runner: always a new interpreter)", flag=True),
        Option("runner_idle_seconds", 600.0, "a module runner with no task for this long quits",
               kind=float),
        Option("max_runners_per_user", 2, "module runners one user may have at once (one per "
               "interpreter and ansible-core version in use); beyond it the idlest quits, or "
               "the task runs in a new interpreter", kind=int),
        Option("max_runners", 32, "module runners on this node; beyond it the idlest quits",
               kind=int),
        Option("runner_preload_seconds", 30.0, "longest a new module runner may take to import "
               "module_utils before the task runs in a new interpreter instead", kind=float),
        Option("status_process_refresh", 5.0, "seconds within which the status snapshot "
               "reads every process's CPU time again: new processes and the top ones are read "
               "every second, the others in turns over this period, so an idle process that "
               "turns busy is listed within it (0: every process every second, which costs "
               "about 5 us of CPU per process per second)", kind=float),
        Option("helper_python", default_helper_python(),
               "Python used to run file operations as the user", metavar="PATH"),
        Option("file_helper_seconds", 60.0, "longest a file operation's helper (a user "
               "process) may take to answer its status line, exit or report an error; past it "
               "the helper is killed and the request fails (500); must exceed an upload's "
               "fsync and rename on the slowest disk", kind=float),
        Option("log_level", "info", "debug, info, warning or error", metavar="LEVEL"),
        *register_options(),
        *terminal_options(),
    ]


def terminal_options() -> list[Option]:
    """Interactive terminals, /v1/terminal (issue 16, docs/terminals.md)."""
    return [
        Option("terminals", True, "serve interactive terminals on /v1/terminal: a login shell "
               "(or one command) in a pseudo-terminal as the token's user (--no-terminals: "
               "every terminal is refused with 4403)", flag=True),
        Option("terminal_max_per_user", 8, "terminal sessions one user may have on this node, "
               "attached or detached (more are refused with 4429)", kind=int),
        Option("terminal_idle_timeout", 3600.0, "a terminal with no input and no output for "
               "this long ends (seconds; 0: never)", kind=float),
        Option("terminal_detach_grace", 60.0, "seconds a terminal whose socket closed is kept "
               "for a reattach before it is hung up", kind=float),
        Option("terminal_buffer_bytes", 256 * 1024, "terminal output the agent hands to a "
               "socket before the socket has written it; past it the agent stops reading the "
               "pty until the writes complete (bytes)", kind=int),
        Option("terminal_scrollback_bytes", 64 * 1024, "output of a detached terminal kept "
               "for its reattach; when full, the pty is not read until then (bytes)", kind=int),
        Option("terminal_input_max_bytes", 1024 * 1024, "input a terminal's pty has not taken "
               "yet that the agent keeps; past it the agent reads no more of the socket until "
               "the program has read some (the client's sends wait) (bytes)", kind=int),
        Option("terminal_input_stall", 60.0, "seconds a terminal's full input backlog may "
               "wait without the program reading any of it; then the socket is closed with "
               "4408 and the session detaches (0: wait for ever)", kind=float),
        Option("websocket_ping_interval", 30.0, "seconds between the agent's pings on a "
               "WebSocket (/v1/stream, /v1/terminal); 0: none", kind=float),
        Option("websocket_ping_timeout", 30.0, "seconds a ping's pong may take before the "
               "socket is closed as dead (at most websocket_ping_interval; a terminal whose "
               "client has output before the ping unread is kept: flow control); 0: never",
               kind=float),
    ]


def register_options() -> list[Option]:
    """Registering with a controller mDNS does not reach (issue 15, agent/register.py)."""
    return [
        Option("controller", [], "a controller's URL (https://HOST:PORT) to register with over "
               "TLS, proved by this node's certificate, for networks mDNS does not reach "
               "(announcing stays as --announce says); repeatable (comma separated in the "
               "environment and config file): it registers with each, on its own",
               repeatable=True, metavar="URL"),
        Option("register_every", 30.0, "seconds between two renewals of the registration "
               "(at most half the controller's registration_ttl; each costs the controller "
               "about 5 ms of CPU)", kind=float),
        Option("register_retry_max", 60.0, "longest wait between two tries while the "
               "controller is unreachable (the wait doubles from 1 s)", kind=float),
        Option("register_address", "", "address the controller reaches this agent at "
               "(default: the bind address when it is one IP, not a wildcard; else the "
               "address the controller sees the registration come from)",
               metavar="ADDR"),
    ]


@dataclass(frozen=True)
class AgentConfig:
    """Resolved agent settings."""

    bind: str
    port: int
    secret_file: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    tls_crl: str
    dev: bool
    state_dir: str
    node_name: str
    groups: list[str]
    mdns_interface: list[str]
    announce: bool
    token_max_age: int
    retention: int
    retention_count: int
    spool_max_bytes: int
    spool_max_bytes_per_user: int
    max_running_per_user: int
    cgroups: str
    max_pids_per_user: int
    max_memory_per_user: int
    max_command_bytes: int
    max_stdin_bytes: int
    max_capture_bytes: int
    max_sockets_per_user: int
    max_socket_pending_bytes: int
    max_upload_bytes: int
    handshake_timeout: float
    max_pending_connections_per_address: int
    idle_timeout: float
    max_connections_per_address: int
    max_connections: int
    stop_grace: float
    login_shells: list[str]
    allowed_origins: list[str]
    audit_log: str
    audit_max_bytes: int
    audit_backups: int
    runner: bool
    runner_idle_seconds: float
    max_runners_per_user: int
    max_runners: int
    runner_preload_seconds: float
    status_process_refresh: float
    helper_python: str
    file_helper_seconds: float
    log_level: str
    controller: list[str]
    register_every: float
    register_retry_max: float
    register_address: str
    terminals: bool
    terminal_max_per_user: int
    terminal_idle_timeout: float
    terminal_detach_grace: float
    terminal_buffer_bytes: int
    terminal_scrollback_bytes: int
    terminal_input_max_bytes: int
    terminal_input_stall: float
    websocket_ping_interval: float
    websocket_ping_timeout: float

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def __post_init__(self) -> None:
        self.connection_limits()  # refuse bad limits at start-up (ConfigError)
        for key in ("register_every", "register_retry_max"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be greater than 0 (got {getattr(self, key)})")
        self._check_terminal_settings()

    def _check_terminal_settings(self) -> None:
        """Every terminal bound is a positive number (the idle timeout may be 0: none)."""
        for key in ("terminal_max_per_user", "terminal_buffer_bytes",
                    "terminal_scrollback_bytes", "terminal_input_max_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1 (got {getattr(self, key)})")
        if self.terminal_idle_timeout < 0 or self.terminal_detach_grace < 0 \
                or self.terminal_input_stall < 0:
            raise ConfigError("terminal_idle_timeout, terminal_detach_grace and "
                              "terminal_input_stall must be >= 0")
        if not 0 <= self.websocket_ping_timeout <= self.websocket_ping_interval \
                and self.websocket_ping_interval > 0:
            raise ConfigError("websocket_ping_timeout must be from 0 to websocket_ping_interval "
                              f"({self.websocket_ping_interval}; got "
                              f"{self.websocket_ping_timeout})")
        if self.websocket_ping_interval < 0:
            raise ConfigError("websocket_ping_interval must be >= 0")

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.handshake_timeout, self.max_pending_connections_per_address,
                                self.idle_timeout, self.max_connections_per_address,
                                self.max_connections)

    def tls_files(self) -> ServerTlsFiles | None:
        """The TLS setup to serve with, or None in development mode."""
        if self.dev:
            return None
        return ServerTlsFiles(self.tls_cert, self.tls_key, self.tls_ca, self.tls_crl)
