"""Session-wide fixtures: a private PostgreSQL cluster (``pg``) and the pgguard gateway
(``gateway``, ``make_gateway``). See tests/support/ for the machinery."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Gateway, MakeGateway
from tests.support.pgcluster import (
    PgServer,
    external_server,
    new_private_cluster,
    prepare_server,
    private_server,
)


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """The PostgreSQL server under test: a private cluster, or ``$PGGUARD_TEST_DSN``."""
    external = os.environ.get("PGGUARD_TEST_DSN")
    if external:
        server = external_server(external)
        prepare_server(server)
        yield server
        return
    cluster = new_private_cluster(tmp_path_factory.mktemp("pgcluster"))
    atexit.register(cluster.stop)  # also on an interpreter exit that skips teardown
    try:
        cluster.init()
        cluster.start()
        server = private_server(cluster)
        prepare_server(server)
        yield server
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def gateway(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One pgguard process for the whole session, with the base test configuration."""
    gw = Gateway(pg, tmp_path_factory.mktemp("gateway"))
    atexit.register(gw.stop)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def make_gateway(pg: PgServer, tmp_path: Path) -> Iterator[MakeGateway]:
    """Factory for a gateway with a custom configuration, deep-merged over the base one:
    ``make_gateway(tls={...}, limits={...}, identity={"role_map": {...}})``.
    Keyword-only extras: ``secret=`` (JWT secret), ``env=`` (extra environment),
    ``start=False`` (return it unstarted). All are stopped when the test ends."""
    made: list[Gateway] = []

    def factory(
        *,
        secret: str | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        **overrides: Any,
    ) -> Gateway:
        gw = Gateway(
            pg, tmp_path / f"gateway{len(made)}", overrides=overrides, secret=secret, env=env
        )
        made.append(gw)
        return gw.start() if start else gw

    try:
        yield factory
    finally:
        for gw in made:
            gw.stop()
