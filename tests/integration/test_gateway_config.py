"""pgguard with custom configurations (make_gateway): TLS, upstream authentication methods,
a dead upstream, role_map, limits, token expiry, and a refused configuration.
Target pgguard only."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme
from psycopg import errors

from tests.support import rawpg
from tests.support.gateway import Gateway, GatewayStartError, MakeGateway
from tests.support.pgcluster import PgServer
from tests.support.ports import free_port

SUB = "cfg-alice"


def _raw(gw: Gateway, token: str | None = None, user: str = SUB) -> rawpg.RawConnection:
    return rawpg.connect(gw.host, gw.port, user, "app", token or gw.token(SUB))


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["cert"].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


def test_tls_verify_full(make_gateway: MakeGateway, tls_files: dict[str, Path]) -> None:
    gw = make_gateway(
        tls={
            "cert_file": str(tls_files["cert"]),
            "key_file": str(tls_files["key"]),
            "allow_plaintext_loopback": False,
        }
    )
    dsn = gw.dsn(SUB, sslmode="verify-full", sslrootcert=str(tls_files["ca"]))
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (100,)
    # The SSLRequest is answered 'S' when a certificate is configured.
    with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
        assert rawpg.negotiate(sock, rawpg.SSL_REQUEST) == b"S"
    # Plaintext is refused before the token is asked for.
    with pytest.raises(rawpg.PgError) as exc:
        _raw(gw).terminate()
    assert (exc.value.fields.get("S"), exc.value.sqlstate) == ("FATAL", "28000")
    assert exc.value.auth_methods == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn(SUB, sslmode="disable"), connect_timeout=10)

    async def via_asyncpg() -> None:
        ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
        conn = await asyncpg.connect(
            host=gw.host, port=gw.port, user=SUB, password=gw.token(SUB), database="app",
            ssl=ctx, timeout=10,
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


# --------------------------------------------------------------------------- upstream


def test_upstream_md5(make_gateway: MakeGateway, pg: PgServer) -> None:
    if not pg.private:
        pytest.skip("needs the private cluster's pg_hba md5 line")
    gw = make_gateway(
        upstream={"user": "md5user"}, env={"PGGUARD_UPSTREAM_PASSWORD": pg.md5user_password}
    )
    with psycopg.connect(gw.dsn(SUB), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, count(*) FROM items").fetchone() == (
            "md5user",
            100,
        )


def test_upstream_trust(make_gateway: MakeGateway, pg: PgServer) -> None:
    if not pg.private:
        pytest.skip("needs the private cluster's pg_hba trust line")
    gw = make_gateway(upstream={"user": "trustuser", "password_env": None})
    with psycopg.connect(gw.dsn(SUB), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trustuser",)


def test_upstream_wrong_password(make_gateway: MakeGateway) -> None:
    gw = make_gateway(env={"PGGUARD_UPSTREAM_PASSWORD": "definitely-wrong"})
    with pytest.raises(rawpg.PgError) as exc:
        _raw(gw).terminate()
    assert exc.value.fields.get("S") == "FATAL"
    assert exc.value.message
    assert gw.running
    _assert_token_not_logged(gw)


def test_dead_upstream(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream={"port": free_port()})
    start = time.monotonic()
    with pytest.raises(rawpg.PgError) as exc:
        _raw(gw).terminate()
    assert time.monotonic() - start < 15
    assert exc.value.fields.get("S") == "FATAL"
    assert exc.value.message
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn(SUB), connect_timeout=15)
    assert gw.running, gw.read_log()


def _assert_token_not_logged(gw: Gateway) -> None:
    log = gw.read_log()
    for token in gw.issued:
        assert token not in log


# --------------------------------------------------------------------------- identity


def test_role_map(make_gateway: MakeGateway) -> None:
    gw = make_gateway(identity={"role_map": {"analysts": "analyst", "writers": "app_rw"}})
    dsn = gw.dsn(SUB, groups=["analysts"])
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, session_user").fetchone() == (
            "analyst",
            "pgguard",
        )
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (100,)
        # The client cannot step out of the mapped role (SPEC §2); refusals are 42501
        # errors starting with "pgguard:", and the session goes on.
        for stmt in (
            "RESET ROLE",
            "SET ROLE pgguard",
            "SET ROLE NONE",
            "SET SESSION AUTHORIZATION pgguard",
            "SELECT set_config('role', 'pgguard', false)",
        ):
            with pytest.raises(errors.InsufficientPrivilege) as exc:
                conn.execute(stmt)
            assert exc.value.diag.message_primary, stmt
            assert exc.value.diag.message_primary.startswith("pgguard:"), stmt
            assert conn.execute("SELECT current_user").fetchone() == ("analyst",), stmt
    with psycopg.connect(gw.dsn(SUB, groups=["writers"]), connect_timeout=10) as c:
        assert c.execute("SELECT current_user").fetchone() == ("app_rw",)
    # "First match wins" in the role_map's (the operator's) order, not the token's.
    with psycopg.connect(gw.dsn(SUB, groups=["writers", "analysts"]), connect_timeout=10) as c:
        assert c.execute("SELECT current_user").fetchone() == ("analyst",)
    with psycopg.connect(gw.dsn(SUB), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pgguard",)


def test_token_expiry_ends_session(make_gateway: MakeGateway) -> None:
    gw = make_gateway(identity={"leeway": "0s"})
    with _raw(gw, gw.token(SUB, ttl=2)) as conn:
        assert conn.query("SELECT 1").rows == [[[b"1"]]]
        time.sleep(3)
        conn.send(b"Q", b"SELECT 2\x00")
        kind, body = conn.read_message()
        assert kind == b"E"
        fields = rawpg.parse_fields(body)
        assert (fields["S"], fields["C"]) == ("FATAL", "28000")
        assert "token expired" in fields["M"]


# --------------------------------------------------------------------------- limits


def test_max_connections(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"max_connections": 2})
    a = _raw(gw)
    b = _raw(gw)
    try:
        with pytest.raises(rawpg.PgError) as exc:
            _raw(gw).terminate()
        assert (exc.value.fields.get("S"), exc.value.sqlstate) == ("FATAL", "53300")
        assert a.query("SELECT 1").rows == [[[b"1"]]]
    finally:
        a.terminate()
    deadline = time.monotonic() + 5
    while True:  # the slot is released once the gateway has seen the Terminate
        try:
            c = _raw(gw)
            break
        except rawpg.PgError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with c:
        assert c.query("SELECT 2").rows == [[[b"2"]]]
    b.terminate()


def test_max_message_size(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"max_message_bytes": 1024 * 1024})
    with psycopg.connect(gw.dsn(SUB), autocommit=True, connect_timeout=10) as conn:
        small = "SELECT length('" + "x" * 500_000 + "')"
        assert conn.execute(small).fetchone() == (500_000,)
    with pytest.raises(psycopg.Error) as exc:
        conn = psycopg.connect(gw.dsn(SUB), autocommit=True, connect_timeout=10)
        try:
            conn.execute("SELECT length('" + "x" * 2_000_000 + "')")
        finally:
            conn.close()
    assert str(exc.value)
    assert gw.running
    with psycopg.connect(gw.dsn(SUB), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_oversized_startup_packet(gateway: Gateway) -> None:
    """SPEC §1: a startup packet over 10 000 bytes gets a clear FATAL error."""
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        body = struct.pack("!i", rawpg.PROTOCOL_3) + b"user\x00x\x00options\x00"
        body += b"-c a=" + b"y" * 20_000 + b"\x00\x00"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        data = _read_until_closed(sock)
    assert data[:1] == b"E", data[:200]
    assert b"FATAL" in data
    assert gateway.running


def test_auth_timeout(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"auth_timeout": "1s"})
    with socket.create_connection((gw.host, gw.port), timeout=10) as sock:
        start = time.monotonic()
        data = _read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 5, elapsed
    assert data == b"" or data[:1] == b"E"


def test_idle_timeout(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"idle_timeout": "1s"})
    with _raw(gw) as conn:
        assert conn.query("SELECT 1").rows == [[[b"1"]]]
        time.sleep(2)
        conn.sock.settimeout(5)
        kind, body = conn.read_message()  # sent unprompted when the session is reaped
        assert kind == b"E"
        fields = rawpg.parse_fields(body)
        assert (fields["S"], fields["C"]) == ("FATAL", "57P05")


# --------------------------------------------------------------------------- configuration


def test_invalid_config_refused(make_gateway: MakeGateway) -> None:
    gw = make_gateway(start=False, listen={"bogus": 1}, limits={"max_connections": "lots"})
    with pytest.raises(GatewayStartError) as exc:
        gw.start(timeout=15)
    assert gw.proc is not None and gw.proc.returncode not in (0, None)
    message = str(exc.value)
    assert "listen.bogus" in message
    assert "limits.max_connections" in message
