"""Upstream TLS modes against a PostgreSQL server with ssl=on (its own private cluster)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from pgguard.embedded import EmbeddedPostgres
from tests.support.gateway import MakeGateway


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedPostgres, Path]]:
    base = Path(tempfile.mkdtemp(prefix="pgguard-tlspg-"))
    base.chmod(0o755)  # the server may run as the postgres user, who must reach the certs
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certs = base / "certs"
    certs.mkdir()
    cert.cert_chain_pems[0].write_to_path(certs / "server.crt")
    cert.private_key_pem.write_to_path(certs / "server.key")
    ca.cert_pem.write_to_path(base / "ca.pem")
    server = EmbeddedPostgres(
        base_dir=base / "pg",
        extra_conf={
            "ssl": "on",
            "ssl_cert_file": f"'{certs / 'server.crt'}'",
            "ssl_key_file": f"'{certs / 'server.key'}'",
        },
        hba_lines=["hostnossl all pgguard 127.0.0.1/32 reject"],
    )
    if server.user is not None:
        info = pwd.getpwnam(server.user)
        for path in (certs, certs / "server.crt", certs / "server.key"):
            os.chown(path, info.pw_uid, info.pw_gid)
    (certs / "server.key").chmod(0o600)
    server.start()
    server.psql("CREATE ROLE pgguard LOGIN PASSWORD 'tls-secret'")
    yield server, base / "ca.pem"
    server.stop(mode="immediate")
    shutil.rmtree(base, ignore_errors=True)


def upstream(server: EmbeddedPostgres, **extra: object) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": server.port, "user": "pgguard", **extra}


ENV = {"PGGUARD_UPSTREAM_PASSWORD": "tls-secret"}


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_tls_modes_encrypt(
    make_gateway: MakeGateway, tls_server: tuple[EmbeddedPostgres, Path], mode: str
) -> None:
    server, _ = tls_server
    gw = make_gateway(upstream=upstream(server, sslmode=mode), env=ENV)
    with psycopg.connect(gw.dsn("alice", dbname="postgres")) as conn:
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert row == (True,)


def test_verify_full_with_the_right_ca(
    make_gateway: MakeGateway, tls_server: tuple[EmbeddedPostgres, Path]
) -> None:
    server, ca = tls_server
    gw = make_gateway(
        upstream=upstream(server, sslmode="verify-full", sslrootcert=str(ca)), env=ENV
    )
    with psycopg.connect(gw.dsn("alice", dbname="postgres")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_verify_full_refuses_an_unknown_ca(
    make_gateway: MakeGateway, tls_server: tuple[EmbeddedPostgres, Path], tmp_path: Path
) -> None:
    server, _ = tls_server
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other_ca)
    gw = make_gateway(
        upstream=upstream(server, sslmode="verify-full", sslrootcert=str(other_ca)), env=ENV
    )
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gw.dsn("alice", dbname="postgres"))
    assert "TLS negotiation with the upstream server failed" in str(info.value)


def test_disable_is_refused_by_a_tls_only_server(
    make_gateway: MakeGateway, tls_server: tuple[EmbeddedPostgres, Path]
) -> None:
    server, _ = tls_server
    gw = make_gateway(upstream=upstream(server, sslmode="disable"), env=ENV)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gw.dsn("alice", dbname="postgres"))
    # pg_hba rejects non-TLS: pgguard reports an upstream authentication failure.
    assert "upstream" in str(info.value)


def test_require_against_a_server_without_tls(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream={"sslmode": "require"})  # the suite's main server has ssl=off
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gw.dsn("alice"))
    assert "does not support TLS" in str(info.value)
