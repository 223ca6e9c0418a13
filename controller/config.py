"""The controller's settings: option list, defaults, and the `ControllerConfig` they produce."""

from __future__ import annotations

from dataclasses import dataclass

from marco.errors import ConfigError
from marco.serving import (
    ConnectionLimits,
    connection_limit_options,
    port_option,
    proxy_network,
)
from marco.settings import Option, default_state_dir
from marco.shells import login_shells_option
from marco.tokens import DEFAULT_MAX_AGE, DEFAULT_SECRET_FILE

from .runstore import MAX_EVENTS_READ, MAX_PAGE_LINES

DEFAULT_CONFIG_FILE = "/etc/marco/controller.toml"
DEFAULT_PORT = 7380


def controller_options() -> list[Option]:
    """Every controller setting, in --help order."""
    return [
        Option("bind", "127.0.0.1", "address to listen on", metavar="ADDR"),
        port_option(DEFAULT_PORT),
        Option("secret_file", DEFAULT_SECRET_FILE, "cluster secret file (0600), shared with "
               "the agents", metavar="PATH"),
        Option("pki_dir", "/etc/marco/pki", "the cluster CA and the controller's certificate "
               "(made by `marco-controller init`)", metavar="DIR"),
        Option("web_cert", "", "certificate for the web page (default: the controller's "
               "certificate from the cluster CA)", metavar="PATH"),
        Option("web_key", "", "its private key", metavar="PATH"),
        Option("dev", False, "development mode: plain HTTP to browsers and agents, only on a "
               "loopback address", flag=True),
        Option("pam_service", "login", "PAM service used to check passwords", metavar="NAME"),
        login_shells_option(),
        Option("mdns_interface", [], "address of an interface to browse for agents on "
               "(repeatable); default: the bind address unless it is a wildcard",
               repeatable=True, metavar="ADDR"),
        Option("node", [], "a static node HOST:PORT or NAME=HOST:PORT (repeatable), for "
               "networks mDNS does not reach", repeatable=True, metavar="HOST:PORT"),
        Option("discovery", True, "browse for agents by zeroconf", flag=True),
        Option("token_max_age", DEFAULT_MAX_AGE, "seconds a login stays valid", kind=int),
        Option("health_interval", 2.0, "seconds between health checks of each agent", kind=float),
        Option("health_failures", 3, "health checks in a row an agent may leave unanswered "
               "before it is down (a wrong answer downs it at once)", kind=int),
        Option("health_connection_max_age", 300.0, "seconds one kept connection carries an "
               "agent's health checks before a new one (0: a new connection for each check)",
               kind=float),
        Option("health_checks_at_once", 64, "health checks in flight at once (the others wait "
               "their turn; each answer still has 2 s)", kind=int),
        Option("discovery_retry_names", 1024, "announced agents not listed yet (resolution or "
               "first check lost) tried again at once, most", kind=int),
        Option("discovery_retry_longest", 30.0, "longest wait in seconds between two tries of an "
               "announced agent not listed yet (the first is 1 s, then doubling)", kind=float),
        Option("discovery_retry_tries", 8, "tries of an announced agent not listed yet that "
               "did not answer (one that answered wrong, certificate or secret proof, is not "
               "tried again); then it waits for its next announcement", kind=int),
        Option("discovery_rebrowse", 60.0, "seconds between two browse queries for agents "
               "whose announcements were all lost (0: none)", kind=float),
        Option("discovery_receive_buffer", 4 * 1024 * 1024, "bytes of receive buffer for "
               "the mDNS sockets, so a burst of announcements (many agents starting at once) "
               "is not dropped (0: the system's default)", kind=int),
        Option("deploy_stall_timeout", 30.0, "seconds an agent may take no data during a "
               "deploy before it is dropped (the others go on)", kind=float),
        Option("login_max_failures", 5, "failed logins allowed per user and per client address "
               "within the lockout window", kind=int),
        Option("login_lockout", 300, "lockout window in seconds", kind=int),
        *connection_limit_options(),
        *page_socket_options(),
        *registration_options(),
        *runs_options(),
        *shared_options(),
        *proxy_options(),
        Option("state_dir", default_state_dir("marco-controller"), "where revocations and "
               "runs (runs.sqlite3) are kept", metavar="DIR"),
        Option("database", "", "where runs are kept: a postgresql:// URL (libpq's: sslmode, "
               "passfile, ... are its parameters; controllers may share it), or a SQLite file "
               "(a path, relative to state_dir, or sqlite:///PATH); empty: "
               "STATE_DIR/runs.sqlite3", metavar="URL"),
        Option("log_level", "info", "debug, info, warning or error", metavar="LEVEL"),
        *terminal_options(),
    ]


def terminal_options() -> list[Option]:
    """The terminal relay and its recordings (issue 16, controller/terminal_relay.py)."""
    return [
        Option("terminal_record", True, "keep each terminal session of the page as a run of "
               "kind terminal (asciicast v2)", flag=True),
        Option("terminal_record_max_bytes", 64 << 20, "output bytes one terminal session "
               "records at most; then the recording stops (the session goes on)", kind=int),
        Option("terminal_relays_per_user", 16, "terminals of one user the controller relays "
               "at once (more: closed with 4429)", kind=int),
    ]


def page_socket_options() -> list[Option]:
    """The bounds of the page's one socket, /page-socket (issue 15)."""
    return [
        Option("page_max_nodes", 64, "nodes one page socket watches at once (the page watches "
               "the rows in sight, at most 64)", kind=int),
        Option("page_max_per_user", 32, "page sockets of one user open at once (more: closed "
               "with 4429)", kind=int),
        Option("page_max_pending_bytes", 16 << 20, "bytes queued for one page socket; beyond, "
               "it is closed (4408) and the page reconnects", kind=int),
        Option("page_replays_at_once", 4, "replays and stops of one page asking agents at "
               "once", kind=int),
        Option("page_status_flush", 0.25, "seconds between two batches of node statuses to a "
               "page (the newest status of each node)", kind=float),
    ]


def registration_options() -> list[Option]:
    """Agents beyond one LAN registering themselves (issue 15, controller/registration.py)."""
    return [
        Option("registration", True, "accept agents that register themselves (marco-agent "
               "--controller URL) with their node certificate, where mDNS does not reach",
               flag=True),
        Option("registration_ttl", 90.0, "seconds a registration lasts unless the agent renews "
               "it; then the node is forgotten (a node that stops answering leaves the "
               "inventory sooner, by its health checks)", kind=float),
        Option("registration_max", 2000, "registrations held at once (more: 503, the agent "
               "tries again later)", kind=int),
    ]


def shared_options() -> list[Option]:
    """Controllers sharing one PostgreSQL database (issue 15, controller/shared_state.py)."""
    return [
        Option("shared_poll", 2.0, "with a PostgreSQL database: seconds between two reads of "
               "what other controllers wrote (revocations; without shared_listen, run changes "
               "too)", kind=float),
        Option("shared_listen", True, "with a PostgreSQL database: LISTEN for other "
               "controllers' revocations and run changes and act on them at once", flag=True),
        Option("shared_timeout", 10.0, "with a PostgreSQL database: seconds one exchange of "
               "revocations, failed logins or run changes with it may take", kind=float),
        Option("shared_clock_margin", 2.0, "with a PostgreSQL database: seconds added to a "
               "'log out everywhere' cutoff (beyond the later of this clock and the "
               "database's), for the other controllers' clocks running ahead", kind=float),
        Option("runs_statement_timeout", 30.0, "with a PostgreSQL database: seconds one "
               "statement of the run store may run (then it is cancelled: 503)", kind=float),
        Option("runs_store_queue", 256, "run store calls waiting at once for its thread (more: "
               "503 at once, while the database is slow or stalled)", kind=int),
    ]


def proxy_options() -> list[Option]:
    """Controllers behind a load balancer (issue 15, marco/serving.py `ProxyTrust`)."""
    return [
        Option("trusted_proxies", [], "address or network (CIDR) of a load balancer or reverse "
               "proxy in front of the controller (repeatable): only its requests' "
               "X-Forwarded-For / X-Real-Ip and X-Forwarded-Proto are believed, and its "
               "connections are bounded by max_connections alone (not per address)",
               kind=proxy_network, repeatable=True, metavar="ADDR[/BITS]"),
    ]


def runs_options() -> list[Option]:
    """The bounds of the runs the controller keeps (docs/runs.md)."""
    return [
        Option("runs_retention_days", 90.0, "days an ended run is kept", kind=float),
        Option("runs_max_bytes", 1 << 30, "bytes of stored run output and events in all; the "
               "oldest ended runs are pruned first", kind=int),
        Option("runs_max_running_per_user", 20, "runs of one user running at once (more: 429)",
               kind=int),
        Option("runs_max_per_user", 10_000, "runs kept per user; the user's oldest ended runs "
               "are pruned", kind=int),
        Option("runs_max_bytes_per_user", 256 << 20, "bytes of stored run output and events "
               "per user", kind=int),
        Option("runs_collect_per_user", 4, "output collections of one user's runs running at "
               "once", kind=int),
        Option("runs_collect_queue_per_user", 1000, "collections of one user's running runs "
               "waiting their turn; more are dropped (logged; the run's final collection picks "
               "them up)", kind=int),
        Option("runs_collect_finals_per_user", 1000, "final collections of one user's ended "
               "runs (one per node) queued, running or waiting to be retried; more are not "
               "queued (logged; that output is read from its agent while the agent holds it)",
               kind=int),
        Option("runs_collect_retry", 5.0, "seconds before an ended run's output is collected "
               "again from a node not done yet, doubling up to runs_collect_retry_max",
               kind=float),
        Option("runs_collect_retry_max", 60.0, "longest wait between two tries of a final "
               "collection (and of a command run's watcher ending its run on a busy store)",
               kind=float),
        Option("runs_collect_give_up", 3600.0, "seconds after a run ended when its output "
               "stops being collected (and a watcher stops trying to end its run)", kind=float),
        Option("runs_collect_page_lines", 20_000, "lines of output asked of an agent at once "
               "when collecting (one page is held in memory at a time)", kind=int),
        Option("runs_wait_max", 25, "seconds a request for a running run's next events "
               "(GET /api/runs/ID?wait=) waits at most", kind=int),
        Option("runs_max_waiting_per_user", 16, "requests of one user waiting for a run's "
               "next events at once; more answer at once, without waiting", kind=int),
        Option("runs_events_page", 5000, "most events one GET /api/runs/ID answer gives (its "
               "default too)", kind=int),
        Option("runs_events_page_bytes", 4 << 20, "most bytes of events (as stored) one GET "
               "/api/runs/ID answer gives; `more` says the rest follows", kind=int),
        Option("runs_executions_page", 5000, "most executions one GET /api/runs/ID/executions "
               "answer gives (its default too)", kind=int),
        Option("runs_output_page_lines", 20_000, "most output lines one GET /api/runs/ID/output "
               "answer gives", kind=int),
        Option("runs_read_agent_timeout", 10.0, "seconds an agent gets to answer a read of a "
               "run's executions or output; one that does not adds nothing", kind=float),
        Option("runs_read_agents_at_once", 16, "agents one listing of a run's executions asks "
               "at once", kind=int),
        Option("runs_downloads_per_user", 2, "output downloads (GET /api/runs/ID/output.txt "
               "or .jsonl) of one user at once (more: 429)", kind=int),
        Option("runs_read_listings_per_user", 4, "listings of one user's run executions asking "
               "agents at once; more answer from the store alone", kind=int),
        Option("runs_search_per_user", 2, "output searches (GET /api/runs/ID/search) of one "
               "user at once (more: 429)", kind=int),
        Option("runs_search_hits", 1000, "most hits one search answer gives (its default too)",
               kind=int),
        Option("runs_search_query_chars", 200, "longest text a search looks for, in characters",
               kind=int),
        Option("runs_search_lines", 5_000_000, "most output lines one search scans; beyond, its "
               "answer says it is not complete", kind=int),
        Option("runs_search_chars", 1 << 30, "most characters of output lines one search "
               "scans; beyond, its answer says it is not complete", kind=int),
        Option("runs_search_seconds", 30.0, "seconds one search runs at most; then it answers "
               "what it found, saying it is not complete", kind=float),
        Option("runs_search_at_once", 4, "output searches going on at once in the whole "
               "controller, whoever asks (more: 429)", kind=int),
    ]


@dataclass(frozen=True)
class ControllerConfig:
    """Resolved controller settings."""

    bind: str
    port: int
    secret_file: str
    pki_dir: str
    web_cert: str
    web_key: str
    dev: bool
    pam_service: str
    login_shells: list[str]
    mdns_interface: list[str]
    node: list[str]
    discovery: bool
    token_max_age: int
    health_interval: float
    health_failures: int
    health_connection_max_age: float
    health_checks_at_once: int
    discovery_retry_names: int
    discovery_retry_longest: float
    discovery_retry_tries: int
    discovery_rebrowse: float
    discovery_receive_buffer: int
    deploy_stall_timeout: float
    login_max_failures: int
    login_lockout: int
    handshake_timeout: float
    max_pending_connections_per_address: int
    idle_timeout: float
    max_connections_per_address: int
    page_max_nodes: int
    page_max_per_user: int
    page_max_pending_bytes: int
    page_replays_at_once: int
    page_status_flush: float
    runs_retention_days: float
    runs_max_bytes: int
    runs_max_running_per_user: int
    runs_max_per_user: int
    runs_max_bytes_per_user: int
    runs_collect_per_user: int
    runs_collect_queue_per_user: int
    runs_collect_finals_per_user: int
    runs_collect_retry: float
    runs_collect_retry_max: float
    runs_collect_give_up: float
    runs_collect_page_lines: int
    runs_wait_max: int
    runs_max_waiting_per_user: int
    runs_events_page: int
    runs_events_page_bytes: int
    runs_executions_page: int
    runs_output_page_lines: int
    runs_read_agent_timeout: float
    runs_read_agents_at_once: int
    runs_read_listings_per_user: int
    runs_downloads_per_user: int
    runs_search_per_user: int
    runs_search_hits: int
    runs_search_query_chars: int
    runs_search_lines: int
    runs_search_chars: int
    runs_search_seconds: float
    runs_search_at_once: int
    state_dir: str
    database: str
    log_level: str
    shared_poll: float
    shared_listen: bool
    shared_timeout: float
    runs_statement_timeout: float
    shared_clock_margin: float
    runs_store_queue: int
    registration: bool
    registration_ttl: float
    registration_max: int
    trusted_proxies: list[str]
    max_connections: int
    terminal_record: bool
    terminal_record_max_bytes: int
    terminal_relays_per_user: int

    def __post_init__(self) -> None:
        self.connection_limits()  # refuse bad limits at start-up (ConfigError)
        self.check_runs_limits()
        for key in ("shared_poll", "shared_timeout", "runs_statement_timeout",
                    "runs_store_queue"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be greater than 0 (got {getattr(self, key)})")
        if not 0 <= self.shared_clock_margin <= 60:
            raise ConfigError("shared_clock_margin must be 0 to 60 seconds "
                              f"(got {self.shared_clock_margin})")
        for key in ("registration_ttl", "registration_max", "terminal_record_max_bytes",
                    "terminal_relays_per_user"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be greater than 0 (got {getattr(self, key)})")

    def check_runs_limits(self) -> None:
        """Every runs bound must be positive: a zero would prune everything or refuse every run."""
        for key in ("runs_retention_days", "runs_max_bytes", "runs_max_running_per_user",
                    "runs_max_per_user", "runs_max_bytes_per_user", "runs_collect_per_user",
                    "runs_collect_queue_per_user", "runs_collect_finals_per_user",
                    "runs_collect_retry", "runs_collect_retry_max", "runs_collect_give_up",
                    "runs_collect_page_lines", "runs_wait_max", "runs_max_waiting_per_user",
                    "runs_events_page", "runs_events_page_bytes", "runs_executions_page",
                    "runs_output_page_lines",
                    "runs_read_agent_timeout", "runs_read_agents_at_once",
                    "runs_read_listings_per_user", "runs_downloads_per_user",
                    "runs_search_per_user", "runs_search_hits", "runs_search_query_chars",
                    "runs_search_lines", "runs_search_chars", "runs_search_seconds",
                    "runs_search_at_once", "page_max_nodes", "page_max_per_user",
                    "page_max_pending_bytes", "page_replays_at_once", "page_status_flush"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be greater than 0 (got {getattr(self, key)})")
        # Pages the store gives at most in one read (a listing asks one execution more than a
        # page, to know whether more follow); a larger setting would refuse every read.
        for key, most in (("runs_events_page", MAX_EVENTS_READ),
                          ("runs_executions_page", MAX_EVENTS_READ - 1),
                          ("runs_output_page_lines", MAX_PAGE_LINES),
                          ("runs_collect_page_lines", MAX_PAGE_LINES)):
            if getattr(self, key) > most:
                raise ConfigError(f"{key} must be at most {most} (got {getattr(self, key)})")

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.handshake_timeout, self.max_pending_connections_per_address,
                                self.idle_timeout, self.max_connections_per_address,
                                self.max_connections, tuple(self.trusted_proxies))
