"""A private PostgreSQL cluster for the test session (or an external server).

Server binaries are looked up, in order: ``postgres``/``initdb`` on ``PATH``,
``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` (highest version), then the ``pgserver``
wheel if it happens to be importable. The cluster listens on 127.0.0.1 only, on a free port,
with its unix socket inside its own directory; it is always stopped with
``pg_ctl stop -m immediate`` (falling back to signals).

PostgreSQL refuses to run as root; when the tests run as root, the cluster's processes run as
the ``postgres`` system user (else ``nobody``) in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgguard.embedded import EmbeddedError
from pgguard.embedded import find_bindir as embedded_bindir

from .ports import free_port
from .schema import create_schema

APP_DB = "app"
SUPERUSER = "postgres"
PGGUARD_ROLE = "pgguard"
MD5_ROLE = "md5user"
TRUST_ROLE = "trustuser"
NOLOGIN_ROLES = ("analyst", "app_rw")

PG_HBA = f"""\
# written by tests/support/pgcluster.py
# TYPE  DATABASE  USER        ADDRESS        METHOD
local   all       all                        trust
host    all       {MD5_ROLE}     127.0.0.1/32   md5
host    all       {TRUST_ROLE}   127.0.0.1/32   trust
host    all       all         127.0.0.1/32   scram-sha-256
local   replication all                      trust
host    replication all       127.0.0.1/32   scram-sha-256
"""


class ClusterError(RuntimeError):
    """The private cluster could not be created or started."""


@dataclass
class PgServer:
    """What the tests need to know about the PostgreSQL server under test."""

    host: str
    port: int
    superuser: str
    superuser_password: str | None
    superuser_dsn: str
    pgguard_password: str
    md5user_password: str
    bindir: Path | None
    private: bool
    datadir: Path | None = None
    socket_dir: Path | None = None
    log_path: Path | None = None
    dbname: str = APP_DB
    pgguard_user: str = PGGUARD_ROLE
    passwords: dict[str, str] = field(default_factory=dict)

    def dsn(
        self,
        user: str = PGGUARD_ROLE,
        password: str | None = None,
        dbname: str = APP_DB,
        **params: Any,
    ) -> str:
        """A libpq connection string over TCP; the password defaults to the role's known one."""
        if password is None:
            password = self.passwords.get(user)
        kw: dict[str, Any] = {"host": self.host, "port": self.port, "user": user, "dbname": dbname}
        if password is not None:
            kw["password"] = password
        kw.update(params)
        return make_conninfo("", **kw)

    def superuser_app_dsn(self) -> str:
        """The superuser DSN, connected to the ``app`` database."""
        return make_conninfo(self.superuser_dsn, dbname=self.dbname)

    def bin(self, name: str) -> str:
        """Path of a server binary (or the bare name, to be found on PATH)."""
        if self.bindir is not None and (self.bindir / name).exists():
            return str(self.bindir / name)
        return name


# --------------------------------------------------------------------------- binaries


def find_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl/postgres (pgguard's own lookup), or None."""
    try:
        return embedded_bindir()
    except EmbeddedError:
        return None


# --------------------------------------------------------------------------- private cluster


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as, if we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    raise ClusterError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class PrivateCluster:
    """initdb + pg_ctl around a throw-away data directory."""

    def __init__(self, bindir: Path, basedir: Path, *, remove_basedir: bool) -> None:
        self.bindir = bindir
        self.basedir = basedir
        self.remove_basedir = remove_basedir
        self.datadir = basedir / "data"
        self.socket_dir = basedir / "sock"
        self.log_path = basedir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = 0
        self.superuser_password = secrets.token_hex(16)
        self.owner = _run_as()
        self.started = False
        self._stopped = False

    # -- helpers ------------------------------------------------------------------------

    def _run(
        self, args: Sequence[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {}
        if self.owner is not None:
            kw.update(user=self.owner[0], group=self.owner[1], extra_groups=[])
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd=self.basedir,
            check=False,
            **kw,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                f"\n{self.read_log()}"
            )
        return proc

    def _chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------

    def init(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.basedir, 0o755)
        self._chown(self.basedir)
        self._chown(self.socket_dir)
        pwfile = self.basedir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        try:
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        (self.datadir / "pg_hba.conf").write_text(PG_HBA)
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(
                "\n# tests/support/pgcluster.py\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 300\n"
                "password_encryption = 'scram-sha-256'\n"
                "timezone = 'UTC'\n"
                "log_timezone = 'UTC'\n"
                "datestyle = 'iso, mdy'\n"
                "lc_messages = 'C'\n"
                "log_min_messages = warning\n"
                "log_connections = off\n"
            )

    def start(self, attempts: int = 3) -> None:
        last = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            proc = self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    f"-p {self.port}",
                ],
                check=False,
            )
            if proc.returncode == 0:
                self.started = True
                return
            last = f"{proc.stdout}\n{proc.stderr}\n{self.read_log()}"
            self._kill_postmaster()
            if "already in use" not in last and "could not bind" not in last:
                break
        raise ClusterError(f"PostgreSQL did not start:\n{last}")

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, ValueError, IndexError):
            return None

    def _kill_postmaster(self) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                except PermissionError:
                    return
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (immediate mode) and remove the data directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.datadir.exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "stop",
                        "-D",
                        str(self.datadir),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "30",
                    ],
                    timeout=60,
                    check=False,
                )
            self._kill_postmaster()
        shutil.rmtree(self.datadir, ignore_errors=True)
        if self.remove_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)


def new_private_cluster(tmp_base: Path) -> PrivateCluster:
    """A cluster in ``tmp_base`` (a pytest tmp dir), or in a fresh /tmp dir when running as
    root (pytest's tmp dirs are private to root, and the server cannot run as root)."""
    bindir = find_bindir()
    if bindir is None:
        raise ClusterError(
            "no PostgreSQL server binaries found (PATH, pg_config, /usr/lib/postgresql/*/bin, "
            "pgserver); install PostgreSQL or set PGGUARD_TEST_DSN"
        )
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="pgguard-test-pg-"))
        return PrivateCluster(bindir, base, remove_basedir=True)
    return PrivateCluster(bindir, tmp_base, remove_basedir=False)


def private_server(cluster: PrivateCluster) -> PgServer:
    dsn = make_conninfo(
        "",
        host=cluster.host,
        port=cluster.port,
        user=SUPERUSER,
        password=cluster.superuser_password,
        dbname="postgres",
    )
    return PgServer(
        host=cluster.host,
        port=cluster.port,
        superuser=SUPERUSER,
        superuser_password=cluster.superuser_password,
        superuser_dsn=dsn,
        pgguard_password=secrets.token_urlsafe(18),
        md5user_password=secrets.token_urlsafe(18),
        bindir=cluster.bindir,
        private=True,
        datadir=cluster.datadir,
        socket_dir=cluster.socket_dir,
        log_path=cluster.log_path,
    )


def external_server(dsn: str) -> PgServer:
    """Describe the server named by ``PGGUARD_TEST_DSN`` (a superuser DSN)."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "127.0.0.1")
    if host.startswith("/"):
        host = "127.0.0.1"  # pgguard and the clients under test need TCP
    port = int(params.get("port") or os.environ.get("PGPORT") or 5432)
    superuser = str(params.get("user") or os.environ.get("PGUSER") or SUPERUSER)
    password = params.get("password") or os.environ.get("PGPASSWORD")
    pgguard_password = os.environ.get("PGGUARD_TEST_PGGUARD_PASSWORD", "pgguard-test-pw")
    if superuser == PGGUARD_ROLE and password:
        pgguard_password = str(password)  # don't change the password the DSN itself uses
    return PgServer(
        host=host,
        port=port,
        superuser=superuser,
        superuser_password=None if password is None else str(password),
        superuser_dsn=dsn,
        pgguard_password=pgguard_password,
        md5user_password=os.environ.get("PGGUARD_TEST_MD5USER_PASSWORD", "md5user-test-pw"),
        bindir=find_bindir(),
        private=False,
    )


# --------------------------------------------------------------------------- roles and data


def _set_role(
    conn: psycopg.Connection[Any], name: str, options: str, password: str | None, encryption: str
) -> None:
    conn.execute(sql.SQL("SET password_encryption = {}").format(sql.Literal(encryption)))
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
    stmt = sql.SQL("{} {} {}").format(verb, sql.Identifier(name), sql.SQL(options))
    if password is not None:
        stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(password))
    conn.execute(stmt)


def prepare_server(server: PgServer) -> None:
    """Create the roles, the ``app`` database and its schema (idempotent)."""
    server.passwords = {
        PGGUARD_ROLE: server.pgguard_password,
        MD5_ROLE: server.md5user_password,
    }
    if server.superuser_password is not None:
        server.passwords[server.superuser] = server.superuser_password
    with psycopg.connect(server.superuser_dsn, autocommit=True, connect_timeout=10) as conn:
        _set_role(conn, PGGUARD_ROLE, "LOGIN SUPERUSER", server.pgguard_password, "scram-sha-256")
        _set_role(conn, MD5_ROLE, "LOGIN", server.md5user_password, "md5")
        _set_role(conn, TRUST_ROLE, "LOGIN", None, "scram-sha-256")
        for role in NOLOGIN_ROLES:
            _set_role(conn, role, "NOLOGIN", None, "scram-sha-256")
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(r) for r in NOLOGIN_ROLES),
                sql.Identifier(PGGUARD_ROLE),
            )
        )
        conn.execute("RESET password_encryption")
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DB,)).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(APP_DB), sql.Identifier(PGGUARD_ROLE)
                )
            )
    with psycopg.connect(server.superuser_app_dsn(), autocommit=True, connect_timeout=10) as conn:
        create_schema(conn)
        conn.execute("GRANT SELECT ON public.items TO analyst, md5user, trustuser")
        conn.execute("GRANT ALL ON public.items TO app_rw")
        conn.execute("GRANT USAGE, CREATE ON SCHEMA public TO app_rw")
