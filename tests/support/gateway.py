"""Run ``pgguard serve`` as a subprocess against the test cluster."""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from psycopg.conninfo import make_conninfo

from .pgcluster import PgServer
from .ports import free_ports, port_accepts

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class GatewayStartError(RuntimeError):
    """pgguard did not come up; the message carries its log."""


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` into a copy of ``base`` (mappings merge, other values,
    including None and lists, replace)."""
    out: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_config(pg: PgServer, *, port: int, admin_port: int) -> dict[str, Any]:
    """The configuration every test gateway starts from (SPEC §9)."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "tls": {"allow_plaintext_loopback": True},
        "upstream": {
            "host": pg.host,
            "port": pg.port,
            "user": pg.pgguard_user,
            "password_env": "PGGUARD_UPSTREAM_PASSWORD",
            "sslmode": "disable",
        },
        "identity": {"algorithms": ["HS256"], "secret_env": "PGGUARD_JWT_SECRET"},
        "audit": {"url": None},
        "policies": [],
    }


def pgguard_command(config: Path) -> list[str]:
    """The console script next to the interpreter, else ``python -m pgguard.cli``."""
    script = Path(sys.executable).parent / "pgguard"
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    return [sys.executable, "-m", "pgguard.cli", "serve", "--config", str(config)]


class Gateway:
    """One pgguard process. ``start()`` waits for its port; ``stop()`` terminates it."""

    def __init__(
        self,
        pg: PgServer,
        workdir: Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        secret: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.pg = pg
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret = secret if secret is not None else secrets.token_urlsafe(32)
        self.host = "127.0.0.1"
        self.port, self.admin_port = free_ports(2)
        config = base_config(pg, port=self.port, admin_port=self.admin_port)
        self.config = deep_merge(config, overrides or {})
        listen = self.config.get("listen") or {}
        self.host = str(listen.get("host", self.host))
        self.port = int(listen.get("port", self.port))
        self.config_path = workdir / "pgguard.yaml"
        self.log_path = workdir / "pgguard.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.issued: list[str] = []  # every token minted here, to check the log never has one

    # -- process ------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
        env["PGGUARD_JWT_SECRET"] = self.secret
        env["PGGUARD_UPSTREAM_PASSWORD"] = self.pg.pgguard_password
        env["PGGUARD_MASKING_SECRET"] = "test-masking-secret"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = START_TIMEOUT) -> Gateway:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                pgguard_command(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayStartError(
                    f"pgguard exited with status {self.proc.returncode} before listening on "
                    f"{self.host}:{self.port}\n--- config ---\n{self.config_path.read_text()}"
                    f"--- log ---\n{self.read_log()}"
                )
            if port_accepts(self.host, self.port, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise GatewayStartError(
            f"pgguard did not accept connections on {self.host}:{self.port} within "
            f"{timeout:.0f}s\n--- config ---\n{self.config_path.read_text()}"
            f"--- log ---\n{self.read_log()}"
        )

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        # Workers or helpers left in the process group go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- identity -----------------------------------------------------------------------

    def token(self, sub: str, groups: Iterable[str] = (), ttl: int = 600, **claims: Any) -> str:
        """A token signed with this gateway's secret (``pgguard.identity.mint_token``)."""
        from pgguard.identity import mint_token  # lazy: the harness must import without it

        token: str = mint_token(self.secret, sub, groups=tuple(groups), ttl=ttl, claims=claims)
        self.issued.append(token)
        return token

    def dsn(
        self,
        sub: str,
        dbname: str = "app",
        *,
        groups: Iterable[str] = (),
        ttl: int = 600,
        claims: Mapping[str, Any] | None = None,
        password: str | None = None,
        **params: Any,
    ) -> str:
        """A libpq DSN for ``sub`` with a fresh token as the password. ``params`` are extra
        libpq keywords (application_name, sslmode, options…)."""
        if password is None:
            password = self.token(sub, groups=groups, ttl=ttl, **dict(claims or {}))
        return make_conninfo(
            "", host=self.host, port=self.port, user=sub, dbname=dbname, password=password, **params
        )


MakeGateway = Callable[..., Gateway]
"""The ``make_gateway`` fixture: ``make_gateway(*, secret=None, env=None, start=True,
**config_overrides) -> Gateway``."""


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    """The gateway's /readyz: HTTP status and the JSON body."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()
