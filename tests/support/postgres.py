"""A throwaway PostgreSQL server for tests: Debian's PostgreSQL (`pg_config --bindir`, else
/usr/lib/postgresql/*/bin) in a fresh directory under /tmp, run by the unprivileged `postgres`
user (the server refuses to run as root), on a Unix socket in that directory and a free loopback
port, stopped and removed after the run.

Each test asks for a database of its own (`postgres_url`): a fresh database owned by the
unprivileged role `marco` (password authentication, as a deployment would use), given as a
`postgresql://` URL for `--database`. A run killed before its teardown leaves a directory
named with its tag; the next run stops that server and removes it (`sweep_postgres`).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.processes import alive
from tests.support.run import this_run

SERVER_USER = "postgres"   # made by Debian's postgresql-common
ROLE = "marco"             # the unprivileged role the controller connects as
PREFIX = "marcotest-"      # /tmp/marcotest-TAG-pg-*: the run's tag, for the sweep
START_TRIES = 5            # a free port can be taken between the probe and the bind
# Durability is not what tests check: the cluster lives for one run.
SERVER_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                  "-c shared_buffers=16MB -c max_connections=200")


def bindir() -> Path:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl)."""
    try:
        found = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True,
                               text=True).stdout.strip()
        if (Path(found) / "pg_ctl").exists():
            return Path(found)
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if not candidates:
        raise RuntimeError("PostgreSQL's server is not installed: apt-get install postgresql "
                           "(scripts/test installs it)")
    return Path(candidates[0]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in `home`: data in `home`/data, socket and log beside it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.data = home / "data"
        self.log_path = home / "server.log"
        self.superuser_password = secrets.token_hex(16)
        self.password = secrets.token_hex(16)
        self.port = 0
        self.bin = bindir()
        # As root the server runs as `postgres`; as anyone else, as that user.
        self._user = SERVER_USER if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, user=self._user, cwd=self.home, check=False,
                              capture_output=True, text=True)

    def start(self) -> None:
        """initdb (password authentication everywhere), then start on a free port."""
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)
        os.chmod(self.home, 0o755)  # clients reach the socket inside it
        pwfile = self.home / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self._user is not None:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        os.chmod(pwfile, 0o600)
        done = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                         "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                         "--locale=C.UTF-8", "--no-sync")
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        for _ in range(START_TRIES):
            self.port = _free_port()
            options = (f"-k {self.home} -p {self.port} -c listen_addresses=127.0.0.1 "
                       f"{SERVER_OPTIONS}")
            started = self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60",
                                "-D", str(self.data), "-l", str(self.log_path), "-o", options)
            if started.returncode == 0:
                break
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{started.stderr}\n{self.log()}")
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server at once (nothing here needs a clean shutdown) and remove it all."""
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate",
                      "-w", "-t", "30")
        shutil.rmtree(self.home, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = ROLE, password: str | None = None,
            unix_socket: bool = False) -> str:
        """A libpq URL for `database`: over loopback TCP, or the Unix socket (which a
        controller in another network namespace still reaches through the file system)."""
        secret = password if password is not None else (
            self.superuser_password if user == "postgres" else self.password)
        host = "" if unix_socket else "127.0.0.1"
        query = f"?host={quote(str(self.home), safe='')}" if unix_socket else ""
        return (f"postgresql://{quote(user, safe='')}:{quote(secret, safe='')}@{host}:"
                f"{self.port}/{quote(database, safe='')}{query}")

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser (outside a transaction: CREATE DATABASE)."""
        import psycopg  # a test dependency, imported when a test asks for a server

        with psycopg.connect(self.url(user="postgres"), autocommit=True) as connection:
            connection.execute(sql.encode())

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database owned by the role `marco`; its name."""
        self._databases += 1
        name = name or f"marco_{self._databases}_{secrets.token_hex(3)}"
        self.admin(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing what is still connected to it."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def sweep_postgres() -> list[str]:
    """Stop and remove the servers of runs that died before their teardown; returns them."""
    removed = []
    for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-pg-*"):
        tag = home.name[len(PREFIX):].split("-", 1)[0]
        try:
            if alive(int(tag, 16)):
                continue
        except ValueError:
            continue
        pid = _postmaster_pid(home / "data")
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGQUIT)  # the postmaster's immediate shutdown
        shutil.rmtree(home, ignore_errors=True)
        removed.append(str(home))
    return removed


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the run (each pytest-xdist worker has its own). The run's
    tag comes from this_run(), not the `run` fixture, a name some test modules give their
    own fixtures."""
    sweep_postgres()
    home = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{this_run().tag}-pg-"))
    server = PostgresServer(home)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for one test, as a `postgresql://` URL (role `marco`, over loopback),
    dropped after it."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
