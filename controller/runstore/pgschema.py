"""The run store's schema in PostgreSQL and how a connection is opened: versions in the table
`marco_schema` (one row per part of Marco's state: "runs" here), applied in order at open, all
in one transaction under an advisory lock (two controllers starting at once migrate once).

The schema starts at what SQLite's version 5 holds (schema.py), in PostgreSQL's types; its
versions are its own from there. Ids compare bytewise (COLLATE "C"), as in SQLite, whatever the
database's collation: pages of runs follow their ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import conninfo

from marco.errors import ConfigError

PART = "runs"  # this store's row in marco_schema
MIGRATE_LOCK = 0x6D6172636F_01  # pg_advisory_xact_lock key while migrating ("marco", 1)
# libpq parameters given unless the URL gives its own: a server that does not answer (a
# network cut with no reset) ends the call in about 30 s instead of holding the store's thread.
CONNECTION_DEFAULTS: dict[str, str | int] = {
    "connect_timeout": 10, "application_name": "marco-controller", "keepalives": 1,
    "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000}

DEFAULT_STATEMENT_TIMEOUT = 30.0  # seconds (the controller's runs_statement_timeout)

Step = str | Callable[[psycopg.Connection[Any]], None]

SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS marco_schema (part TEXT PRIMARY KEY, "
                "version INTEGER NOT NULL)")

# MIGRATIONS[n - 1] takes a database from version n - 1 to n (never edit one that has shipped;
# append a new one). `position`: the order rows were added in (SQLite's rowid).
MIGRATIONS: list[tuple[Step, ...]] = [
    (
        """CREATE TABLE runs (
            id TEXT COLLATE "C" PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL,
            title TEXT NOT NULL, hosts TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
            ended DOUBLE PRECISION, status TEXT NOT NULL, stats TEXT NOT NULL,
            meta TEXT NOT NULL, bytes BIGINT NOT NULL DEFAULT 0,
            last_activity DOUBLE PRECISION)""",
        "CREATE INDEX runs_by_owner ON runs (owner, id DESC)",
        "CREATE INDEX runs_by_ended ON runs (ended) WHERE ended IS NOT NULL",
        "CREATE INDEX runs_running ON runs (owner) WHERE ended IS NULL",
        """CREATE TABLE events (
            run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            seq BIGINT NOT NULL, time DOUBLE PRECISION NOT NULL, type TEXT NOT NULL,
            body TEXT NOT NULL, PRIMARY KEY (run_id, seq))""",
        """CREATE TABLE outputs (
            position BIGINT GENERATED ALWAYS AS IDENTITY,
            run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            execution_id TEXT NOT NULL, host TEXT NOT NULL, node TEXT NOT NULL, task_id TEXT,
            archived INTEGER NOT NULL, bytes BIGINT NOT NULL, next_seq BIGINT NOT NULL DEFAULT 0,
            truncated_seq BIGINT, started DOUBLE PRECISION, ended DOUBLE PRECISION,
            rc INTEGER, PRIMARY KEY (run_id, execution_id))""",
        "CREATE INDEX outputs_in_order ON outputs (run_id, position)",
        "CREATE INDEX outputs_by_node ON outputs (run_id, node, position)",
        "CREATE INDEX outputs_by_host ON outputs (run_id, host, position)",
        "CREATE INDEX outputs_by_task ON outputs (run_id, task_id, position)",
        """CREATE TABLE chunks (
            run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            execution_id TEXT NOT NULL, first_seq BIGINT NOT NULL, next_seq BIGINT NOT NULL,
            bytes BIGINT NOT NULL, data BYTEA NOT NULL,
            PRIMARY KEY (run_id, execution_id, first_seq))""",
        # The chunks are zlib-compressed already: no second compression by TOAST.
        "ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        """CREATE TABLE swept (
            run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            node TEXT NOT NULL, PRIMARY KEY (run_id, node))""",
        """CREATE TABLE nodes (
            position BIGINT GENERATED ALWAYS AS IDENTITY,
            run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            node TEXT NOT NULL, PRIMARY KEY (run_id, node))""",
        # Stored bytes per owner, kept by a trigger in the transaction that changes a run's
        # bytes: every controller sharing the database reads the same sums, without a scan.
        """CREATE TABLE owner_bytes (owner TEXT PRIMARY KEY, bytes BIGINT NOT NULL)""",
        """CREATE FUNCTION runs_owner_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') THEN
                UPDATE owner_bytes SET bytes = bytes - OLD.bytes WHERE owner = OLD.owner;
            END IF;
            IF TG_OP IN ('UPDATE', 'INSERT') THEN
                INSERT INTO owner_bytes (owner, bytes) VALUES (NEW.owner, NEW.bytes)
                ON CONFLICT (owner) DO UPDATE SET bytes = owner_bytes.bytes + EXCLUDED.bytes;
            END IF;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER runs_owner_bytes AFTER INSERT OR DELETE OR UPDATE OF owner, bytes
            ON runs FOR EACH ROW EXECUTE FUNCTION runs_owner_bytes()""",
    ),
]


def masked(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "the runs database URL (unparsable)"


def check_url(url: str) -> dict[str, Any]:
    """The URL's libpq parameters; ConfigError naming the URL masked when libpq cannot parse
    it (libpq's own message quotes the bad part, which may be the password)."""
    try:
        return conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError(f"the database URL {masked(url)} is malformed (libpq cannot parse it)",
                          hint="a % in the password is written %25; libpq parameters go in "
                               "the query as ?name=value") from None


def schema_version(connection: psycopg.Connection[Any], part: str = PART) -> int:
    row = connection.execute("SELECT version FROM marco_schema WHERE part = %s",
                             (part,)).fetchone()
    return 0 if row is None else int(row[0])


def migrate(connection: psycopg.Connection[Any], where: str,
            migrations: Sequence[tuple[Step, ...]] = MIGRATIONS, part: str = PART) -> int:
    """Bring the database to the newest version in one transaction with its version number (a
    crash leaves the old version or the new, never half; DDL is transactional here). Returns
    the version."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        connection.execute(SCHEMA_TABLE)
        version = schema_version(connection, part)
        if version > len(migrations):
            raise ConfigError(f"the runs database {where} has schema version {version}; this "
                              f"Marco knows versions up to {len(migrations)}",
                              hint="run a newer Marco, or point --database elsewhere")
        for number, statements in enumerate(migrations[version:], start=version + 1):
            for step in statements:
                if isinstance(step, str):
                    connection.execute(step)  # no parameters: a % or $$ stays as written
                else:
                    step(connection)
            connection.execute("INSERT INTO marco_schema (part, version) VALUES (%s, %s) "
                               "ON CONFLICT (part) DO UPDATE SET version = EXCLUDED.version",
                               (part, number))
    return len(migrations)


def milliseconds(seconds: float) -> str:
    """A PostgreSQL duration setting of at least 1 ms (0 would mean no limit)."""
    return f"{max(1, int(seconds * 1000))}ms"


def connect(url: str, busy_timeout: float, row_factory: Any,
            statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (transactions are explicit), whose statements wait up to
    `busy_timeout` seconds for a lock and run at most `statement_timeout` seconds (then
    PostgreSQL cancels them: TryAgain; a server that stalls mid-query holds the store's thread
    no longer). Any libpq parameter of the URL (sslmode, passfile, options, ...) is kept."""
    given = check_url(url)
    extra = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in given}
    connection = psycopg.connect(conninfo.make_conninfo(url, **extra), autocommit=True,
                                 row_factory=row_factory)
    try:
        connection.execute("SELECT set_config('lock_timeout', %s, false), "
                           "set_config('statement_timeout', %s, false)",
                           (milliseconds(busy_timeout), milliseconds(statement_timeout)))
    except BaseException:
        connection.close()
        raise
    return connection
