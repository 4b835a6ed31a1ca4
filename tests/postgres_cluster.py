"""A throwaway PostgreSQL server: `initdb` and `pg_ctl` in a temporary folder, a free port, its
unix socket in that folder, removed on stop; `fsync=False` (the tests) trades durability across
a machine crash for speed. Used by the tests and by benchmarks/serve_replicas.py.

PostgreSQL refuses to run as root; as root (CI runs the tests so), the cluster belongs to the
`postgres` user (or `nobody`) and every server command runs as that user through `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

UNPRIVILEGED_USERS = ("postgres", "nobody")
INITDB = ["-E", "UTF8", "--no-locale", "--no-sync"]


def postgres_bin(name: str) -> str | None:
    """Path of a PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return versions[-1] if versions else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayCluster:
    """One PostgreSQL server on a free port, data and socket under a temporary folder."""

    def __init__(self, fsync: bool = True, database: str = "mmnewsrec") -> None:
        initdb, self.pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            raise FileNotFoundError("initdb/pg_ctl not found on PATH nor in /usr/lib/postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="mmnewsrec-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = next(u for u in UNPRIVILEGED_USERS if has_user(u))
            os.chown(self.root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
            self.prefix = ["runuser", "-u", user, "--"]
        self.data, self.port, self.database = self.root / "data", free_port(), database
        try:
            self.run([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres"] + INITDB)
            options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            options += "" if fsync else " -c fsync=off -c synchronous_commit=off"
            log = str(self.root / "log")
            self.run([self.pg_ctl, "-D", str(self.data), "-l", log, "-o", options, "-w", "start"])
            self.new_database(database)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """A libpq URL to the database over the unix socket."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.root}&port={self.port}"

    def new_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url_of("postgres"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def run(self, command: list[str]) -> None:
        done = subprocess.run(self.prefix + command, capture_output=True, text=True)
        if done.returncode:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr}{done.stdout}\n{tail}")

    def restart(self) -> None:
        """Stop the server (its clients' connections drop) and start it again."""
        log = str(self.root / "log")
        self.run([self.pg_ctl, "-D", str(self.data), "-l", log, "-m", "fast", "-w", "restart"])

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        subprocess.run(
            self.prefix + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
