"""The FunctionCall ('F') protocol message, sent by a raw client, against both targets.

Direct connections authenticate with SCRAM-SHA-256 as pgguard's upstream role; through pgguard
the password is the JWT (cleartext)."""

from __future__ import annotations

import struct

import pytest

from tests.support import rawpg

from .conftest import Endpoint


def _int4(v: int) -> bytes:
    return struct.pack("!i", v)


def _oid(conn: rawpg.RawConnection, signature: str) -> int:
    res = conn.query(f"SELECT '{signature}'::regprocedure::oid")
    assert res.error is None, res.error
    value = res.rows[0][0][0]
    assert value is not None
    return int(value)


def _connect(ep: Endpoint) -> rawpg.RawConnection:
    return rawpg.connect(ep.host, ep.port, ep.user, ep.dbname, ep.password)


def test_startup_and_simple_query(endpoint: Endpoint) -> None:
    with _connect(endpoint) as conn:
        expected_auth = [10, 11, 12, 0] if endpoint.target == "direct" else [3, 0]
        assert conn.auth_methods == expected_auth
        assert conn.backend_key is not None
        assert conn.status == b"I"
        assert conn.parameters["client_encoding"] == "UTF8"
        assert conn.parameters["server_encoding"] == "UTF8"
        assert "server_version" in conn.parameters
        res = conn.query("SELECT 1, NULL, 'x'; SELECT count(*) FROM items")
        assert res.error is None
        assert res.tags == ["SELECT 1", "SELECT 1"]
        assert res.rows == [[[b"1", None, b"x"]], [[b"100"]]]
        assert res.status == b"I"


def test_function_call(endpoint: Endpoint) -> None:
    with _connect(endpoint) as conn:
        abs_oid = _oid(conn, "abs(int4)")
        assert abs_oid == 1397
        plus_oid = _oid(conn, "int4pl(int4,int4)")
        div_oid = _oid(conn, "int4div(int4,int4)")
        cat_oid = _oid(conn, "textcat(text,text)")
        len_oid = _oid(conn, "length(text)")
        # binary argument, binary result
        assert conn.function_call(abs_oid, [_int4(-42)]) == _int4(42)
        # binary argument, text result
        assert conn.function_call(abs_oid, [_int4(-42)], result_format=0) == b"42"
        # text argument, binary result
        assert conn.function_call(abs_oid, [b"-7"], arg_formats=[0]) == _int4(7)
        # one format code for all arguments
        assert conn.function_call(plus_oid, [_int4(40), _int4(2)], arg_formats=[1]) == _int4(42)
        # no format codes at all means text
        assert conn.function_call(plus_oid, [b"40", b"2"], arg_formats=[], result_format=0) == (
            b"42"
        )
        # NULL in, NULL out (strict function)
        assert conn.function_call(abs_oid, [None]) is None
        # text in and out, UTF-8
        cat = conn.function_call(cat_oid, ["ünï".encode(), "cødé ✓".encode()], result_format=0)
        assert cat == "ünïcødé ✓".encode()
        assert conn.function_call(len_oid, ["ünïcødé ✓".encode()]) == _int4(9)
        assert conn.status == b"I"
        for i in range(200):  # many calls in a row
            assert conn.function_call(plus_oid, [_int4(i), _int4(i)]) == _int4(2 * i)

        # An error, then the session goes on.
        with pytest.raises(rawpg.PgError) as exc:
            conn.function_call(div_oid, [_int4(1), _int4(0)])
        assert (exc.value.severity, exc.value.sqlstate, exc.value.message) == (
            "ERROR",
            "22012",
            "division by zero",
        )
        assert conn.status == b"I"
        with pytest.raises(rawpg.PgError) as exc:
            conn.function_call(0, [])
        assert exc.value.sqlstate == "42883"
        assert conn.query("SELECT 'alive'").rows == [[[b"alive"]]]

        # Inside a transaction block: the error fails the block, ROLLBACK recovers.
        assert conn.query("BEGIN").status == b"T"
        assert conn.function_call(abs_oid, [_int4(-1)]) == _int4(1)
        assert conn.status == b"T"
        with pytest.raises(rawpg.PgError):
            conn.function_call(div_oid, [_int4(1), _int4(0)])
        assert conn.status == b"E"
        res = conn.query("SELECT 1")
        assert res.error is not None and res.error.sqlstate == "25P02"
        assert conn.query("ROLLBACK").status == b"I"
        assert conn.function_call(abs_oid, [_int4(-5)]) == _int4(5)
