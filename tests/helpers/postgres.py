"""A throwaway PostgreSQL server for tests: found (or, as root, installed from Debian's package), started on
127.0.0.1 at a free port with trust auth in a temporary directory, and wiped when stopped.

    with PostgresServer.start() as server:       # raises PostgresUnavailable with the reason if it cannot
        url = server.create_schema()             # a fresh, empty namespace: postgresql://...?options=-csearch_path...
        url = server.create_database()           # or a whole new database: postgresql://postgres@127.0.0.1:PORT/test_N
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

SERVER_USER = "postgres"  # initdb refuses root; Debian's package creates this OS user
_INSTALL_TIMEOUT_S = 600
_START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why (tests skip with it)."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/<ver>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    return Path(candidates[-1]).parent if candidates else None


def _version_key(pg_ctl: str) -> tuple[int, ...]:
    version = Path(pg_ctl).parts[-3]  # /usr/lib/postgresql/<version>/bin/pg_ctl
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def ensure_installed() -> Path:
    """find_bin_dir(), installing Debian's `postgresql` package first when absent and we are root."""
    found = find_bin_dir()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable("PostgreSQL binaries not found and cannot apt-get install them (not root or no apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    found = find_bin_dir()
    if not found:
        raise PostgresUnavailable("installed the postgresql package but found no pg_ctl")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One running server; use PostgresServer.start() as a context manager (or call stop())."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root  # temp dir holding data/ and server.log
        self.port = port
        self._counter = itertools.count(1)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = ensure_installed()
        root = Path(tempfile.mkdtemp(prefix="mist-pg-"))
        server = cls(bin_dir, root, _free_port())
        try:
            server._init()
            for attempt in range(3):
                try:
                    server._start()
                    break
                except PostgresUnavailable:
                    # Another process may have taken the port between _free_port() and the bind.
                    if attempt == 2:
                        raise
                    server.port = _free_port()
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, args: Sequence[str]) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        try:
            # pg_ctl gives up after _START_TIMEOUT_S itself; the margin lets it say why.
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_START_TIMEOUT_S + 30, cwd=self.root
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresUnavailable(f"{args[0]} did not finish in {error.timeout} s") from error
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise PostgresUnavailable(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-800:]}\n{tail}")

    def _init(self) -> None:
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError as error:
                raise PostgresUnavailable(f"running as root but there is no {SERVER_USER!r} OS user") from error
            os.chown(self.root, account.pw_uid, account.pw_gid)
        # --no-sync and fsync=off: the throwaway cluster need not survive a power cut; the tests kill clients,
        # never this server, so what they check (transactions, locks, rollback) is unchanged.
        self._run(["initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                   "--locale=C", "--no-sync"])  # fmt: skip

    def _start(self) -> None:
        # TCP only: no unix socket, whose path length limit a long TMPDIR could exceed.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off"
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-w",
                   "-t", str(_START_TIMEOUT_S), "-o", options, "start"])  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database on this server; returns its URL. About 7 MiB on disk each."""
        import psycopg

        name = f"test_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def create_schema(self) -> str:
        """A URL whose connections see only a new empty schema (via search_path): a fresh namespace per
        test at the cost of a few catalog rows, where a database per test would copy a template."""
        import psycopg

        name = f"test_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        """Stops the server at once (immediate mode: no checkpoint) and deletes its directory."""
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"])
            except PostgresUnavailable:
                pass  # best effort: the directory goes anyway
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
