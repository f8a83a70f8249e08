"""Authentication through pgguard (target pgguard only): good tokens work, bad ones are
refused with FATAL 28000/28P01 and a clear message, and no token ever reaches the log.

The SQLSTATE is read with the raw client: libpq keeps no result for a failed connection, so
psycopg's ``OperationalError.sqlstate`` is None for startup errors; psycopg is still used to
check that the client sees the same FATAL message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.support import rawpg
from tests.support.gateway import Gateway, MakeGateway
from tests.support.tokens import craft, std_claims

SUB = "auth-alice"
AUTH_FAILED = ("28P01", "28000")
CLEARTEXT = 3


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Gateway], str]
    user: str = SUB
    sqlstates: tuple[str, ...] = AUTH_FAILED
    keyword: str = "token"


def _over_8k(gw: Gateway) -> str:
    token = craft(std_claims(SUB, pad="x" * 9000), secret=gw.secret)
    assert len(token) > 8192
    return token


def _no_claim(name: str) -> Callable[[Gateway], str]:
    def make(gw: Gateway) -> str:
        claims = std_claims(SUB)
        del claims[name]
        return craft(claims, secret=gw.secret)

    return make


CASES = [
    Case("wrong-secret", lambda gw: craft(std_claims(SUB), secret="not-the-secret")),
    Case(
        "expired",
        lambda gw: craft(std_claims(SUB, ttl=300, iat_offset=-900), secret=gw.secret),
        keyword="expired",
    ),
    Case("user-not-sub", lambda gw: gw.token(SUB), user="auth-bob", sqlstates=("28000",)),
    Case("over-8KiB", _over_8k),
    Case("alg-none", lambda gw: craft(std_claims(SUB), secret=None, alg="none")),
    Case("alg-none-signed", lambda gw: craft(std_claims(SUB), secret=gw.secret, alg="none")),
    Case("missing-exp", _no_claim("exp")),
    Case("missing-iat", _no_claim("iat")),
    Case("missing-sub", _no_claim("sub")),
    Case("alg-not-allowed", lambda gw: craft(std_claims(SUB), secret=gw.secret, alg="HS512")),
    Case("ttl-over-max", lambda gw: craft(std_claims(SUB, ttl=2 * 3600), secret=gw.secret)),
    Case(
        "jku-header",
        lambda gw: craft(
            std_claims(SUB), secret=gw.secret, header={"jku": "http://127.0.0.1:1/jwks.json"}
        ),
    ),
    Case("garbage", lambda gw: "this-is.not-a.jwt"),
]


def _assert_not_logged(gw: Gateway, token: str) -> None:
    log = gw.read_log()
    assert token not in log, "the gateway log contains a token"
    signature = token.rsplit(".", 1)[-1]
    if len(signature) >= 16:
        assert signature not in log, "the gateway log contains a token signature"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_refused(gateway: Gateway, case: Case) -> None:
    token = case.make(gateway)
    with pytest.raises(rawpg.PgError) as raw_exc:
        rawpg.connect(gateway.host, gateway.port, case.user, "app", token).terminate()
    err = raw_exc.value
    assert err.auth_methods == [CLEARTEXT], "pgguard should ask for the token in cleartext"
    assert err.fields.get("S") == "FATAL"
    assert err.sqlstate in case.sqlstates, f"got {err.sqlstate}: {err.message}"
    assert case.keyword in err.message.lower(), f"unclear message: {err.message!r}"

    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(gateway.dsn(case.user, password=token), connect_timeout=10)
    if exc.value.sqlstate is not None:  # libpq has none for startup errors (see module doc)
        assert exc.value.sqlstate in case.sqlstates
    assert f"FATAL:  {err.message}" in str(exc.value)
    _assert_not_logged(gateway, token)


def test_good_token(gateway: Gateway) -> None:
    token = gateway.token(SUB, groups=("developers",))
    with psycopg.connect(gateway.dsn(SUB, password=token), connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (100,)
    # A token made elsewhere with the same secret and the standard claims works too.
    crafted = craft(std_claims(SUB, email="alice@example.com"), secret=gateway.secret)
    with rawpg.connect(gateway.host, gateway.port, SUB, "app", crafted) as raw:
        assert raw.auth_methods == [CLEARTEXT, 0]
        assert raw.query("SELECT 1").rows == [[[b"1"]]]
    _assert_not_logged(gateway, token)
    _assert_not_logged(gateway, crafted)


def test_identity_settings(gateway: Gateway) -> None:
    """SPEC §2: pgguard sets pgguard.user on the upstream session."""
    with psycopg.connect(gateway.dsn(SUB), connect_timeout=10) as conn:
        row = conn.execute("SELECT current_setting('pgguard.user', true)").fetchone()
        assert row == (SUB,)


def test_no_token_in_log(gateway: Gateway) -> None:
    """Every token minted for this session's gateway so far (all client tests) stays out of
    its log, and so does the signing secret."""
    time.sleep(0.2)  # let the gateway flush what it logs for the sessions above
    for token in list(gateway.issued):
        _assert_not_logged(gateway, token)
    assert gateway.secret not in gateway.read_log()


def test_plaintext_refused_when_not_allowed(make_gateway: MakeGateway) -> None:
    """SPEC §1: without TLS and with allow_plaintext_loopback false, the token is refused
    (FATAL 28000) before it is asked for."""
    gw = make_gateway(tls={"allow_plaintext_loopback": False})
    token = gw.token(SUB)
    with pytest.raises(rawpg.PgError) as raw_exc:
        rawpg.connect(gw.host, gw.port, SUB, "app", token).terminate()
    assert raw_exc.value.auth_methods == []
    assert raw_exc.value.fields.get("S") == "FATAL"
    assert raw_exc.value.sqlstate == "28000"
    kw: dict[str, Any] = {"sslmode": "disable"}
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn(SUB, password=token, **kw), connect_timeout=10)
    _assert_not_logged(gw, token)
