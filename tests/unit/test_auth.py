"""Upstream authentication client: SCRAM-SHA-256 against RFC 7677's vector, and MD5."""

from __future__ import annotations

import hashlib

import pytest

from pgguard.protocol.auth import AuthFailed, ScramClient, md5_password

CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_rfc7677_vector() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE, username="user")
    assert client.client_first() == b"n,,n=user,r=" + CLIENT_NONCE.encode()
    assert client.client_final(SERVER_FIRST) == CLIENT_FINAL
    client.verify_server_final(SERVER_FINAL)


def test_scram_rejects_forged_server_signature() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE, username="user")
    client.client_final(SERVER_FIRST)
    with pytest.raises(AuthFailed, match="signature mismatch"):
        client.verify_server_final(b"v=" + b"A" * 44)


def test_scram_rejects_nonce_not_extending_ours() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE)
    with pytest.raises(AuthFailed, match="nonce"):
        client.client_final(b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


@pytest.mark.parametrize(
    "server_first",
    [
        b"",
        b"garbage",
        b"r=rOprNGfwEbeRWgbNEkqOx,s=!!!,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOx,s=QQ==,i=0",
    ],
)
def test_scram_rejects_malformed_server_first(server_first: bytes) -> None:
    with pytest.raises(AuthFailed):
        ScramClient("pencil", nonce=CLIENT_NONCE).client_final(server_first)


def test_scram_server_error_is_reported() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE)
    client.client_final(SERVER_FIRST)
    with pytest.raises(AuthFailed, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_md5_password_matches_postgres_formula() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password("alice", "secret", salt) == expected
    assert len(md5_password("alice", "secret", salt)) == 35
