"""Fixtures shared by the client matrix: every test runs against ``direct`` (PostgreSQL, as
pgguard's own upstream role) and ``pgguard`` (through the gateway, user = sub, password = JWT).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.support.gateway import Gateway
from tests.support.pgcluster import PgServer

TARGETS = ("direct", "pgguard")
GATEWAY_SUB = "alice"


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom a client under test connects."""

    target: str
    host: str
    port: int
    user: str
    password: str
    dbname: str

    def conninfo(self, **params: Any) -> str:
        return make_conninfo(
            "",
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            **params,
        )

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        """A psycopg connection (``kw`` go to ``psycopg.connect``)."""
        kw.setdefault("connect_timeout", 10)
        return psycopg.connect(self.conninfo(), **kw)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for libpq/node clients: the parent's minus any PG* variable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=self.dbname,
            PGCONNECT_TIMEOUT="10",
        )
        env.update(extra)
        return env


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def endpoint(target: str, pg: PgServer, request: pytest.FixtureRequest) -> Endpoint:
    if target == "direct":
        return Endpoint("direct", pg.host, pg.port, pg.pgguard_user, pg.pgguard_password, "app")
    gw: Gateway = request.getfixturevalue("gateway")
    return Endpoint("pgguard", gw.host, gw.port, GATEWAY_SUB, gw.token(GATEWAY_SUB), "app")


@pytest.fixture(scope="session")
def admin(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection to ``app``, straight to PostgreSQL (references, cleanup)."""
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def tables(
    request: pytest.FixtureRequest, target: str, admin: psycopg.Connection[Any]
) -> Iterator[Callable[[str], str]]:
    """``tables("suffix")`` → a table name unique to this test and target; dropped after."""
    base = re.sub(r"\W+", "_", request.node.originalname).strip("_").lower()[:32]
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]
    names: list[str] = []

    def new(suffix: str = "") -> str:
        name = f"t_{base}_{target}_{digest}" + (f"_{suffix}" if suffix else "")
        name = name[:63]
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        names.append(name)
        return name

    yield new
    for name in names:
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def table(tables: Callable[[str], str]) -> str:
    return tables("")
