"""Protocol-level checks with the raw client, against both targets: request negotiation,
refused protocol versions, the extended protocol message by message (Flush, portals with
row limits, errors discarding up to Sync, pipelining) compared byte for byte with a direct
session, and Terminate / disconnect releasing the upstream backend."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import psycopg
import pytest

from tests.support import rawpg
from tests.support.gateway import Gateway
from tests.support.pgcluster import PgServer

from .conftest import Endpoint

Transcript = list[tuple[bytes, bytes]]


def _connect(ep: Endpoint) -> rawpg.RawConnection:
    return rawpg.connect(ep.host, ep.port, ep.user, ep.dbname, ep.password)


def _query(conn: rawpg.RawConnection, sql: str) -> Transcript:
    conn.send(b"Q", sql.encode() + b"\x00")
    return conn.read_until_ready()


def _extended_script(conn: rawpg.RawConnection) -> Transcript:
    t: Transcript = []
    conn.parse(
        "s1", "SELECT id, name, price FROM items WHERE id > $1 ORDER BY id LIMIT $2", [23, 0]
    )
    conn.describe("S", "s1")
    conn.flush()
    t += conn.read_messages(3)  # answered on Flush, before any Sync
    conn.bind("p1", "s1", [b"10", b"5"], result_formats=[1])
    conn.describe("P", "p1")
    conn.execute("p1", 2)
    conn.execute("p1", 2)
    conn.execute("p1", 0)
    conn.close("P", "p1")
    conn.sync()
    t += conn.read_until_ready()
    # Unnamed statement and portal; mixed parameter and result formats.
    conn.parse("", "SELECT $1::int4 * 2 AS doubled, $2::text || '!' AS shout", [23, 25])
    conn.bind(
        "", "", [struct.pack("!i", 21), "ünï".encode()], param_formats=[1, 0],
        result_formats=[0, 1],
    )  # fmt: skip
    conn.describe("P", "")
    conn.execute("", 0)
    conn.sync()
    t += conn.read_until_ready()
    # An error discards everything up to Sync; the named statement survives.
    conn.parse("", "SELEC 1")
    conn.bind("", "", [])
    conn.execute("", 0)
    conn.parse("", "SELECT 1")
    conn.bind("", "", [])
    conn.execute("", 0)
    conn.sync()
    t += conn.read_until_ready()
    # Many Bind/Execute pairs pipelined before one Sync.
    for i in range(200):
        conn.bind("", "s1", [str(i).encode(), b"1"], result_formats=[1, 0, 1])
        conn.execute("", 0)
    conn.sync()
    t += conn.read_until_ready()
    # Close the statement; then it is gone.
    conn.close("S", "s1")
    conn.sync()
    t += conn.read_until_ready()
    conn.bind("", "s1", [b"1", b"1"])
    conn.execute("", 0)
    conn.sync()
    t += conn.read_until_ready()
    # Inside a transaction block: the error fails the block.
    t += _query(conn, "BEGIN")
    conn.parse("", "SELECT 1 / $1", [23])
    conn.bind("", "", [b"0"])
    conn.execute("", 0)
    conn.sync()
    t += conn.read_until_ready()
    t += _query(conn, "SELECT 1")
    t += _query(conn, "ROLLBACK")
    # Empty query, and Describe of a statement with no result.
    t += _query(conn, "")
    conn.parse("ins", "SET application_name = 'wire'")
    conn.describe("S", "ins")
    conn.bind("", "ins", [])
    conn.execute("", 0)
    conn.close("S", "ins")
    conn.sync()
    t += conn.read_until_ready()
    return t


def _kinds(t: Transcript) -> str:
    return "".join(k.decode() for k, _ in t)


def test_extended_protocol_transcript(endpoint: Endpoint, pg: PgServer) -> None:
    with _connect(endpoint) as conn:
        got = _extended_script(conn)
    pipelined = "".join("2DC" if i < 100 else "2C" for i in range(200))
    expected_kinds = (
        "1tT"
        + "2TDDsDDsDC3Z"
        + "12TDCZ"
        + "EZ"
        + pipelined + "Z"
        + "3Z"
        + "EZ"
        + "CZ" + "1EZ" + "EZ" + "CZ"  # 1/$1 is folded at Bind (custom plan): error there
        + "IZ"
        + "1tn2C3SZ"  # ParameterStatus (application_name) comes just before ReadyForQuery
    )  # fmt: skip
    assert _kinds(got) == expected_kinds
    # Spot checks on contents.
    assert got[1][1] == struct.pack("!hII", 2, 23, 20)  # parameter types: int4, inferred int8
    err = rawpg.parse_fields(got[_kinds(got).index("EZ")][1])
    assert (err["S"], err["C"]) == ("ERROR", "42601")
    # The same script directly against PostgreSQL gives the same bytes.
    with rawpg.connect(pg.host, pg.port, pg.pgguard_user, "app", pg.pgguard_password) as ref:
        reference = _extended_script(ref)
    assert got == reference


def test_ssl_request_answered_no(endpoint: Endpoint) -> None:
    """No certificate configured: 'N', and the startup goes on in plaintext."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    assert rawpg.negotiate(sock, rawpg.SSL_REQUEST) == b"N"
    with rawpg.RawConnection(sock) as conn:
        conn.startup(endpoint.user, endpoint.dbname, endpoint.password)
        assert _kinds(_query(conn, "SELECT 1")) == "TDCZ"


@pytest.mark.parametrize(
    "version",
    [rawpg.PROTOCOL_2, (4 << 16), (1234 << 16) | 9999],
    ids=["protocol-2.0", "protocol-4.0", "unknown-code"],
)
def test_unsupported_protocol_refused(endpoint: Endpoint, version: int) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as sock:
        body = struct.pack("!i", version) + b"user\x00x\x00database\x00app\x00\x00"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data[:1] == b"E", data
    assert b"FATAL" in data
    assert b"protocol" in data.lower()


def _backend_alive(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] > 0


def _wait_gone(admin: psycopg.Connection[Any], pid: int) -> None:
    deadline = time.monotonic() + 10
    while _backend_alive(admin, pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _backend_alive(admin, pid), f"upstream backend {pid} is still there"


@pytest.mark.parametrize("how", ["terminate", "close-socket"])
def test_disconnect_releases_upstream(
    endpoint: Endpoint, admin: psycopg.Connection[Any], how: str
) -> None:
    conn = _connect(endpoint)
    res = conn.query("SELECT pg_backend_pid()")
    value = res.rows[0][0][0]
    assert value is not None
    pid = int(value)
    assert _backend_alive(admin, pid)
    if how == "terminate":
        conn.send(b"X")
        conn.sock.settimeout(10)
        assert conn.sock.recv(1) == b"", "the connection should be closed after Terminate"
        conn.sock.close()
    else:
        conn.sock.close()
    _wait_gone(admin, pid)


def test_gssenc_request_answered_no(gateway: Gateway) -> None:
    """SPEC §1: pgguard answers GSSENCRequest with 'N' and the startup goes on (pgguard only:
    a PostgreSQL built with GSSAPI answers 'G')."""
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    assert rawpg.negotiate(sock, rawpg.GSSENC_REQUEST) == b"N"
    with rawpg.RawConnection(sock) as conn:
        conn.startup("alice", "app", gateway.token("alice"))
        assert _kinds(_query(conn, "SELECT 1")) == "TDCZ"


def test_startup_parameters_match_direct(endpoint: Endpoint, pg: PgServer) -> None:
    """The ParameterStatus set a client gets at startup is PostgreSQL's own."""
    with _connect(endpoint) as conn:
        got = dict(conn.parameters)
    with rawpg.connect(pg.host, pg.port, pg.pgguard_user, "app", pg.pgguard_password) as ref:
        reference = dict(ref.parameters)
    assert got == reference
