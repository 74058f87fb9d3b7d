"""A throwaway PostgreSQL server for tests: initdb in a temp dir, started on 127.0.0.1, stopped and removed after.

PostgreSQL refuses to run as root; as root the server runs as an unprivileged user (`postgres`, else a
`lnscope-pg` system user made with useradd, else `nobody`), switched to by subprocess itself (no su/runuser).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

USER = "lnscope"  # the database superuser initdb creates (trust auth on loopback)
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


def binaries() -> dict[str, str] | None:
    """Paths of initdb and pg_ctl: on PATH, else in Debian's /usr/lib/postgresql/*/bin; None when absent."""
    found = {name: shutil.which(name) for name in ("initdb", "pg_ctl")}
    if all(found.values()):
        return found
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        paths = {name: os.path.join(bindir, name) for name in ("initdb", "pg_ctl")}
        if all(os.access(p, os.X_OK) for p in paths.values()):
            return paths
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when this process is root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "lnscope-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "lnscope-pg"],
                       check=True, capture_output=True)
        return pwd.getpwnam("lnscope-pg")
    return pwd.getpwnam("nobody")


class PgServer:
    """A running temporary server; `stop()` ends it and removes its files (also at interpreter exit)."""

    def __init__(self, bins: dict[str, str], base: Path, account: pwd.struct_passwd | None) -> None:
        self.bins, self.base, self.account = bins, base, account
        self.data, self.log = base / "data", base / "server.log"
        self.port = 0
        self._stopped = False
        atexit.register(self.stop)

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program, as the unprivileged account when root."""
        ids = {} if self.account is None else {"user": self.account.pw_uid, "group": self.account.pw_gid,
                                               "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.base)}
        return subprocess.run(list(args), cwd=self.base, env=env, capture_output=True, text=True, timeout=timeout,
                              **ids)

    def init(self) -> None:
        if self.account is not None:
            os.chown(self.base, self.account.pw_uid, self.account.pw_gid)
        done = self._pg(self.bins["initdb"], "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync",
                        "-E", "UTF8", "--locale=C")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr[-2000:]}")

    def start(self, attempts: int = 3) -> None:
        """Start on a free port (retried when another process takes the port first)."""
        for _ in range(attempts):
            self.port = free_port()
            settings = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.base}'"}
            (self.data / "postgresql.auto.conf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
            done = self._pg(self.bins["pg_ctl"], "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                            timeout=90)
            if done.returncode == 0:
                return
        log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {done.stdout[-1000:]} {done.stderr[-1000:]} {log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the connections still open to it."""
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, database: str, sql: str) -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname=database, autocommit=True) as conn:
            conn.execute(sql)

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)

    def stop(self) -> None:
        """Stop the server (immediate mode: nothing to keep) and delete its directory; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if (self.data / "postmaster.pid").exists():
            try:
                if self._pg(self.bins["pg_ctl"], "-D", str(self.data), "-m", "immediate", "-w", "stop",
                            timeout=30).returncode:
                    self._kill_postmaster()
            except (OSError, subprocess.SubprocessError):
                self._kill_postmaster()
        shutil.rmtree(self.base, ignore_errors=True)


def start_server() -> PgServer:
    """initdb and start a server in a new temp dir; raises RuntimeError (and cleans up) when it cannot start."""
    bins = binaries()
    if bins is None:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) on PATH")
    server = PgServer(bins, Path(tempfile.mkdtemp(prefix="lnscope-pg-")), _run_as())
    try:
        server.init()
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
