"""Unit tests for pgguard.identity: JWT validation, key sources, rotation, minting.

Keys are generated here; the only network use is a JWKS / OIDC server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jose import jwk, jws

from pgguard.config import IdentitySettings
from pgguard.identity import (
    TOKEN_ERROR_REASONS,
    Identity,
    IdentityConfigError,
    TokenError,
    TokenValidator,
    claim_at_path,
    mint_token,
)

NOW = 1_700_000_000.0
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstuv"
DUP_ALG_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","alg":"none"}').rstrip(b"=").decode()


# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def craft_hs(
    header: Mapping[str, Any], payload: Any, key: bytes | str, *, raw: bool = False
) -> str:
    """An HMAC-signed token with any header/payload (payload bytes as-is when raw)."""
    key_bytes = key.encode() if isinstance(key, str) else key
    body = b64(payload) if raw else b64json(payload)
    signing_input = f"{b64json(header)}.{body}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(
        str(header.get("alg")), hashlib.sha256
    )
    sig = hmac.new(key_bytes, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(sig)}"


def claims_at(now: float = NOW, ttl: float = 900, **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "alice", "iat": int(now), "exp": int(now + ttl)}
    claims.update(extra)
    return claims


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _int_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64(value.to_bytes(size, "big"))


def to_jwk(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str | None, **extra: Any
) -> dict[str, Any]:
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64(numbers.n), "e": _int_b64(numbers.e)}
    else:
        pub = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        jwk = {"kty": "EC", "crv": crv, "x": _int_b64(pub.x, size), "y": _int_b64(pub.y, size)}
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def make_settings(**overrides: Any) -> IdentitySettings:
    base: dict[str, Any] = {"secret_env": None}
    base.update(overrides)
    return IdentitySettings(**base)


def expect_error(
    validator: TokenValidator,
    token: str,
    reason: str,
    *,
    secrets: tuple[str, ...] = (SECRET,),
    cached: bool = False,
) -> TokenError:
    with pytest.raises(TokenError) as info:
        if cached:
            validator.validate_cached_keys(token)
        else:
            anyio.run(validator.validate, token)
    exc = info.value
    assert exc.reason == reason, f"expected {reason}, got {exc.reason}: {exc}"
    assert exc.reason in TOKEN_ERROR_REASONS
    assert exc.sqlstate == ("28P01" if reason == "signature" else "28000")
    text = str(exc) + repr(exc)
    assert text.strip()
    if isinstance(token, str) and len(token) >= 8:
        assert token not in text
    for part in token.split(".") if isinstance(token, str) else ():
        if len(part) >= 8:
            assert part not in text
    for secret in secrets:
        assert secret not in text
    assert "BEGIN" not in text
    return exc


def validate(validator: TokenValidator, token: str) -> Identity:
    return anyio.run(validator.validate, token)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ec_key2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hs_validator(secret_file: Path, clock: FakeClock) -> TokenValidator:
    return TokenValidator(make_settings(secret_file=secret_file, leeway=0), clock=clock)


@pytest.fixture
def rsa_pem_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rsa.pub.pem"
    path.write_bytes(public_pem(rsa_key))
    return path


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class FakeIdP:
    """A JWKS / OIDC discovery server on 127.0.0.1 that counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.hits: Counter[str] = Counter()
        self.delay = 0.0
        self._lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with idp._lock:
                    idp.hits[path] += 1
                    status, body = idp.routes.get(path, (404, b'{"error": "not found"}'))
                if idp.delay:
                    time.sleep(idp.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def set_json(self, path: str, document: Any, status: int = 200) -> None:
        with self._lock:
            self.routes[path] = (status, json.dumps(document).encode())

    def set_jwks(self, path: str, *keys: dict[str, Any]) -> None:
        self.set_json(path, {"keys": list(keys)})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    server = FakeIdP()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- HS256


def test_hs256_ok(hs_validator: TokenValidator) -> None:
    token = mint_token(
        SECRET,
        "alice",
        groups=["ai-agents", "readers"],
        claims={"email": "alice@example.com", "agent": "cursor", "prompt_id": "p-42"},
        now=NOW,
    )
    ident = validate(hs_validator, token)
    assert ident.user == "alice"
    assert ident.email == "alice@example.com"
    assert ident.groups == ("ai-agents", "readers")
    assert ident.agent == "cursor"
    assert ident.prompt_id == "p-42"
    assert ident.jti is not None and len(ident.jti) >= 16
    assert ident.issued_at == NOW
    assert ident.expires_at == NOW + 900
    assert ident.claims["sub"] == "alice"
    with pytest.raises(TypeError):
        ident.claims["sub"] = "mallory"  # type: ignore[index]
    # The sync path gives the same answer.
    assert hs_validator.validate_cached_keys(token) == ident
    hash(ident)


def test_hs256_optional_claims_absent(hs_validator: TokenValidator) -> None:
    token = craft_hs({"alg": "HS256", "typ": "JWT"}, claims_at(), SECRET)
    ident = validate(hs_validator, token)
    assert (ident.email, ident.agent, ident.prompt_id, ident.jti) == (None, None, None, None)
    assert ident.groups == ()


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    monkeypatch.setenv("PGGUARD_TEST_JWT_SECRET", SECRET)
    validator = TokenValidator(make_settings(secret_env="PGGUARD_TEST_JWT_SECRET"), clock=clock)
    assert validate(validator, mint_token(SECRET, "bob", now=NOW)).user == "bob"


def test_wrong_secret(hs_validator: TokenValidator) -> None:
    token = mint_token(OTHER_SECRET, "alice", now=NOW)
    expect_error(hs_validator, token, "signature", secrets=(SECRET, OTHER_SECRET))


def test_tampered_payload(hs_validator: TokenValidator) -> None:
    token = mint_token(SECRET, "alice", now=NOW)
    header, _, sig = token.split(".")
    forged = f"{header}.{b64json(claims_at(sub='root'))}.{sig}"
    expect_error(hs_validator, forged, "signature")


def test_empty_signature_refused(hs_validator: TokenValidator) -> None:
    token = mint_token(SECRET, "alice", now=NOW)
    header, payload, _ = token.split(".")
    expect_error(hs_validator, f"{header}.{payload}.", "signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_refused(hs_validator: TokenValidator, alg: str) -> None:
    header = b64json({"alg": alg, "typ": "JWT"})
    token = f"{header}.{b64json(claims_at())}."
    exc = expect_error(hs_validator, token, "algorithm")
    assert "not allowed" in str(exc)
    # ... also with a (meaningless) signature attached.
    expect_error(hs_validator, token + b64(b"x" * 32), "algorithm")


def test_alg_none_refused_even_if_configured(secret_file: Path) -> None:
    with pytest.raises(ValueError):
        make_settings(secret_file=secret_file, algorithms=["none"])


def test_alg_not_in_allow_list(
    hs_validator: TokenValidator, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    expect_error(hs_validator, mint_token(SECRET, "a", algorithm="HS384", now=NOW), "algorithm")
    expect_error(hs_validator, mint_token(SECRET, "a", algorithm="HS512", now=NOW), "algorithm")
    rs = mint_token(private_pem(rsa_key), "a", algorithm="RS256", now=NOW)
    assert str(expect_error(hs_validator, rs, "algorithm")) == "token algorithm RS256 not allowed"
    es = mint_token(private_pem(ec_key), "a", algorithm="ES256", now=NOW)
    expect_error(hs_validator, es, "algorithm")
    weird = craft_hs({"alg": "HS256\nInjected: yes"}, claims_at(), SECRET)
    assert "Injected" not in str(expect_error(hs_validator, weird, "algorithm"))
    expect_error(hs_validator, craft_hs({"typ": "JWT"}, claims_at(), SECRET), "header")


def test_hs384_when_allowed(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, algorithms=["HS384"]), clock=clock)
    assert validate(v, mint_token(SECRET, "a", algorithm="HS384", now=NOW)).user == "a"
    expect_error(v, mint_token(SECRET, "a", now=NOW), "algorithm")


# --------------------------------------------------------------------------- RS / ES / PS


def test_rs256_with_pem(
    rsa_pem_file: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    v = TokenValidator(
        make_settings(algorithms=["RS256"], public_key_file=rsa_pem_file), clock=clock
    )
    token = mint_token(private_pem(rsa_key), "carol", groups=["dba"], algorithm="RS256", now=NOW)
    ident = validate(v, token)
    assert (ident.user, ident.groups) == ("carol", ("dba",))
    assert v.validate_cached_keys(token).user == "carol"
    # A kid in the token does not matter for a PEM key.
    with_kid = mint_token(
        private_pem(rsa_key), "carol", algorithm="RS256", now=NOW, headers={"kid": "whatever"}
    )
    assert validate(v, with_kid).user == "carol"
    # Signed by another RSA key.
    expect_error(v, mint_token(private_pem(rsa_key2), "c", algorithm="RS256", now=NOW), "signature")


def test_rs256_pem_certificate_and_private_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(rsa_key, hashes.SHA256())
    )
    token = mint_token(private_pem(rsa_key), "carol", algorithm="RS256", now=NOW)
    for name_, data in (
        ("cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
        ("key.pem", private_pem(rsa_key).encode()),
    ):
        path = tmp_path / name_
        path.write_bytes(data)
        v = TokenValidator(make_settings(algorithms=["RS256"], public_key_file=path), clock=clock)
        assert validate(v, token).user == "carol"


def test_es256_token_with_rsa_pem_has_no_key(
    rsa_pem_file: Path, ec_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    v = TokenValidator(
        make_settings(algorithms=["RS256", "ES256"], public_key_file=rsa_pem_file), clock=clock
    )
    token = mint_token(private_pem(ec_key), "dave", algorithm="ES256", now=NOW)
    expect_error(v, token, "key")


def test_es256_with_jwks_file(
    tmp_path: Path,
    ec_key: ec.EllipticCurvePrivateKey,
    ec_key2: ec.EllipticCurvePrivateKey,
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
) -> None:
    jwks = {
        "keys": [
            to_jwk(rsa_key, "rsa-1", use="sig", alg="RS256"),
            to_jwk(ec_key, "ec-1", use="sig", alg="ES256"),
            to_jwk(ec_key2, "ec-enc", use="enc"),  # not a signing key: ignored
            {"kty": "oct", "kid": "sym", "k": b64(SECRET.encode())},  # symmetric: ignored
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},  # unsupported: ignored
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    v = TokenValidator(make_settings(algorithms=["ES256", "RS256"], jwks_file=path), clock=clock)
    ec_pem = private_pem(ec_key)
    token = mint_token(ec_pem, "erin", algorithm="ES256", now=NOW, headers={"kid": "ec-1"})
    assert validate(v, token).user == "erin"
    assert v.validate_cached_keys(token).user == "erin"
    # No kid: every key of a matching type is tried.
    assert validate(v, mint_token(ec_pem, "erin", algorithm="ES256", now=NOW)).user == "erin"
    # Unknown kid: no key.
    unknown = mint_token(ec_pem, "erin", algorithm="ES256", now=NOW, headers={"kid": "nope"})
    expect_error(v, unknown, "key")
    # The "enc" key must not verify signatures.
    enc = mint_token(
        private_pem(ec_key2), "x", algorithm="ES256", now=NOW, headers={"kid": "ec-enc"}
    )
    expect_error(v, enc, "key")
    # A kid naming the RSA key with an ES256 token finds no ES256 key under that kid.
    cross = mint_token(ec_pem, "erin", algorithm="ES256", now=NOW, headers={"kid": "rsa-1"})
    expect_error(v, cross, "key")
    rs = mint_token(private_pem(rsa_key), "r", algorithm="RS256", now=NOW, headers={"kid": "rsa-1"})
    assert validate(v, rs).user == "r"


def test_jwks_keys_without_kid(
    tmp_path: Path,
    ec_key: ec.EllipticCurvePrivateKey,
    ec_key2: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [to_jwk(ec_key2, None), to_jwk(ec_key, None)]}))
    v = TokenValidator(make_settings(algorithms=["ES256"], jwks_file=path), clock=clock)
    assert validate(v, mint_token(private_pem(ec_key), "f", algorithm="ES256", now=NOW)).user == "f"
    other = ec.generate_private_key(ec.SECP256R1())
    expect_error(v, mint_token(private_pem(other), "f", algorithm="ES256", now=NOW), "signature")


def test_es384_needs_p384_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [to_jwk(ec_key, "p256"), to_jwk(p384, "p384")]}))
    v = TokenValidator(make_settings(algorithms=["ES256", "ES384"], jwks_file=path), clock=clock)
    good = mint_token(private_pem(p384), "g", algorithm="ES384", now=NOW, headers={"kid": "p384"})
    assert validate(v, good).user == "g"
    # ES384 header, but the kid names a P-256 key: refused, never verified with the wrong curve.
    bad = mint_token(private_pem(p384), "g", algorithm="ES384", now=NOW, headers={"kid": "p256"})
    expect_error(v, bad, "key")


def test_ps256_with_pem(rsa_pem_file: Path, rsa_key: rsa.RSAPrivateKey, clock: FakeClock) -> None:
    v = TokenValidator(
        make_settings(algorithms=["PS256"], public_key_file=rsa_pem_file), clock=clock
    )
    token = mint_token(private_pem(rsa_key), "pat", algorithm="PS256", now=NOW)
    assert validate(v, token).user == "pat"
    # An RS256 (PKCS#1 v1.5) signature under a PS256 header does not verify.
    header, payload, _ = token.split(".")
    rs_sig = mint_token(private_pem(rsa_key), "pat", algorithm="RS256", now=NOW).split(".")[2]
    expect_error(v, f"{header}.{payload}.{rs_sig}", "signature")


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize("missing", ["exp", "iat", "sub"])
def test_required_claims(hs_validator: TokenValidator, missing: str) -> None:
    claims = claims_at()
    del claims[missing]
    exc = expect_error(hs_validator, craft_hs({"alg": "HS256"}, claims, SECRET), "claims")
    assert missing in str(exc)


@pytest.mark.parametrize(
    "override",
    [
        {"exp": "1700000900"},
        {"iat": "1700000000"},
        {"exp": True},
        {"iat": None},
        {"exp": 1e300},
        {"nbf": "soon"},
        {"sub": 42},
        {"sub": ""},
        {"sub": None},
        {"email": ["a@b"]},
        {"jti": 7},
        {"prompt_id": {"id": 1}},
    ],
)
def test_claim_types(hs_validator: TokenValidator, override: dict[str, Any]) -> None:
    claims = claims_at()
    claims.update(override)
    expect_error(hs_validator, craft_hs({"alg": "HS256"}, claims, SECRET), "claims")


def test_infinity_and_duplicate_claims_refused(hs_validator: TokenValidator) -> None:
    payload = b'{"sub":"alice","iat":1700000000,"exp":Infinity}'
    expect_error(hs_validator, craft_hs({"alg": "HS256"}, payload, SECRET, raw=True), "claims")
    dup = b'{"sub":"alice","sub":"root","iat":1700000000,"exp":1700000900}'
    expect_error(hs_validator, craft_hs({"alg": "HS256"}, dup, SECRET, raw=True), "claims")
    array = b'["sub","alice"]'
    expect_error(hs_validator, craft_hs({"alg": "HS256"}, array, SECRET, raw=True), "claims")
    expect_error(hs_validator, craft_hs({"alg": "HS256"}, b"\xff", SECRET, raw=True), "claims")


def test_user_claim(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(
        make_settings(secret_file=secret_file, user_claim="preferred_username"), clock=clock
    )
    token = mint_token(SECRET, "uuid-1", claims={"preferred_username": "alice"}, now=NOW)
    assert validate(v, token).user == "alice"
    exc = expect_error(v, mint_token(SECRET, "uuid-1", now=NOW), "claims")
    assert "preferred_username" in str(exc)
    # sub stays required even with another user claim.
    no_sub = {**claims_at(), "preferred_username": "alice"}
    del no_sub["sub"]
    expect_error(v, craft_hs({"alg": "HS256"}, no_sub, SECRET), "claims")


def test_expired_without_leeway(hs_validator: TokenValidator, clock: FakeClock) -> None:
    token = mint_token(SECRET, "alice", ttl=60, now=NOW)
    clock.advance(59)
    assert validate(hs_validator, token).user == "alice"
    clock.advance(1)
    assert str(expect_error(hs_validator, token, "expired")) == "token expired"
    expect_error(hs_validator, token, "expired", cached=True)


def test_expired_with_leeway(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, leeway=30), clock=clock)
    token = mint_token(SECRET, "alice", ttl=60, now=NOW)
    clock.advance(60 + 10)  # expired 10 s ago, within the leeway
    assert validate(v, token).user == "alice"
    clock.advance(25)  # 35 s ago
    expect_error(v, token, "expired")


def test_leeway_from_duration_string(secret_file: Path) -> None:
    assert make_settings(secret_file=secret_file, leeway="2m").leeway == 120.0


def test_nbf(hs_validator: TokenValidator, secret_file: Path, clock: FakeClock) -> None:
    token = mint_token(SECRET, "alice", now=NOW, claims={"nbf": NOW + 100})
    exc = expect_error(hs_validator, token, "not_yet_valid")
    assert str(exc) == "token not yet valid"
    clock.advance(100)
    assert validate(hs_validator, token).user == "alice"
    lenient = TokenValidator(make_settings(secret_file=secret_file, leeway=30), clock=FakeClock())
    assert validate(lenient, mint_token(SECRET, "a", now=NOW, claims={"nbf": NOW + 20})).user


def test_iat_in_future(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, leeway=30), clock=clock)
    assert validate(v, mint_token(SECRET, "a", now=NOW + 20)).user == "a"
    expect_error(v, mint_token(SECRET, "a", now=NOW + 31), "not_yet_valid")


def test_exp_before_iat(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, leeway=30), clock=clock)
    claims = {"sub": "a", "iat": NOW + 20, "exp": NOW + 10}  # iat within leeway, exp < iat
    expect_error(v, craft_hs({"alg": "HS256"}, claims, SECRET), "claims")
    claims = {"sub": "a", "iat": NOW - 5, "exp": NOW + 60}
    assert validate(v, craft_hs({"alg": "HS256"}, claims, SECRET)).user == "a"


def test_max_ttl(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, max_ttl="1h"), clock=clock)
    assert validate(v, mint_token(SECRET, "a", ttl=3600, now=NOW)).user == "a"
    exc = expect_error(v, mint_token(SECRET, "a", ttl=3601, now=NOW), "ttl")
    assert str(exc) == "token lifetime exceeds the configured maximum"
    expect_error(v, mint_token(SECRET, "a", ttl=86400 * 365, now=NOW), "ttl")
    short = TokenValidator(make_settings(secret_file=secret_file, max_ttl=60), clock=clock)
    expect_error(short, mint_token(SECRET, "a", ttl=900, now=NOW), "ttl")


def test_audience(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, audience="pgguard"), clock=clock)
    exc = expect_error(v, mint_token(SECRET, "a", now=NOW), "audience")  # no aud at all
    assert "audience" in str(exc)
    exc = expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"aud": "other"}), "audience")
    assert str(exc) == "token audience mismatch"
    expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"aud": ["x", "y"]}), "audience")
    expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"aud": [1]}), "audience")
    expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"aud": {"a": 1}}), "audience")
    assert validate(v, mint_token(SECRET, "a", now=NOW, claims={"aud": "pgguard"})).user == "a"
    assert validate(v, mint_token(SECRET, "a", now=NOW, claims={"aud": ["x", "pgguard"]})).user
    # Not configured: aud is not checked.
    lax = TokenValidator(make_settings(secret_file=secret_file), clock=clock)
    assert validate(lax, mint_token(SECRET, "a", now=NOW, claims={"aud": "anything"})).user


def test_issuer(secret_file: Path, clock: FakeClock) -> None:
    iss = "https://idp.example.com/realms/dev"
    v = TokenValidator(make_settings(secret_file=secret_file, issuer=iss), clock=clock)
    assert validate(v, mint_token(SECRET, "a", now=NOW, claims={"iss": iss})).user == "a"
    exc = expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"iss": iss + "x"}), "issuer")
    assert str(exc) == "token issuer mismatch"
    expect_error(v, mint_token(SECRET, "a", now=NOW), "issuer")
    expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"iss": [iss]}), "issuer")


# --------------------------------------------------------------------------- header / shape


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "http://127.0.0.1:1/jwks.json"},
        {"x5u": "http://127.0.0.1:1/cert.pem"},
        {"jwk": {"kty": "oct", "k": "c2VjcmV0"}},
        {"x5c": ["MIIB"]},
        {"crit": ["exp"]},
    ],
)
def test_dangerous_headers_refused(hs_validator: TokenValidator, extra: dict[str, Any]) -> None:
    token = jws.sign(claims_at(), SECRET, headers=extra, algorithm="HS256")
    exc = expect_error(hs_validator, token, "header")
    assert next(iter(extra)) in str(exc)


def test_jku_is_never_fetched(
    idp: FakeIdP, hs_validator: TokenValidator, rsa_key: rsa.RSAPrivateKey
) -> None:
    idp.set_jwks("/evil.json", to_jwk(rsa_key, "evil"))
    token = mint_token(
        private_pem(rsa_key),
        "a",
        algorithm="RS256",
        now=NOW,
        headers={"jku": idp.base + "/evil.json", "kid": "evil"},
    )
    expect_error(hs_validator, token, "header")
    assert idp.hits["/evil.json"] == 0


def test_embedded_jwk_header_refused_even_when_rs256_allowed(
    rsa_pem_file: Path, rsa_key2: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    v = TokenValidator(
        make_settings(algorithms=["RS256"], public_key_file=rsa_pem_file), clock=clock
    )
    token = mint_token(
        private_pem(rsa_key2),
        "a",
        algorithm="RS256",
        now=NOW,
        headers={"jwk": to_jwk(rsa_key2, None)},
    )
    expect_error(v, token, "header")


def test_typ_and_cty(hs_validator: TokenValidator) -> None:
    for typ in ("JWT", "jwt", "at+jwt", "application/at+jwt"):
        assert validate(hs_validator, craft_hs({"alg": "HS256", "typ": typ}, claims_at(), SECRET))
    expect_error(
        hs_validator, craft_hs({"alg": "HS256", "typ": "logout+jwt"}, claims_at(), SECRET), "header"
    )
    expect_error(
        hs_validator, craft_hs({"alg": "HS256", "cty": "JWT"}, claims_at(), SECRET), "header"
    )
    expect_error(hs_validator, craft_hs({"alg": "HS256", "kid": 5}, claims_at(), SECRET), "header")


def test_too_large(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, max_token_bytes=1024), clock=clock)
    big = mint_token(SECRET, "a", now=NOW, claims={"pad": "x" * 2000})
    exc = expect_error(v, big, "too_large")
    assert "1024" in str(exc)
    expect_error(v, "A" * 5000, "too_large")
    expect_error(v, "é" * 600, "too_large")  # 600 characters, 1200 bytes
    # The default limit (8 KiB) is applied too.
    default = TokenValidator(make_settings(secret_file=secret_file), clock=clock)
    expect_error(default, mint_token(SECRET, "a", now=NOW, claims={"pad": "x" * 9000}), "too_large")
    assert validate(v, mint_token(SECRET, "a", now=NOW, claims={"pad": "x" * 100})).user == "a"


def test_jwe_refused(hs_validator: TokenValidator) -> None:
    header = b64json({"alg": "dir", "enc": "A256GCM"})
    jwe = f"{header}..{b64(b'iv' * 6)}.{b64(b'ciphertext')}.{b64(b'tag' * 5)}"
    exc = expect_error(hs_validator, jwe, "malformed")
    assert "JWE" in str(exc)
    # A 3-part token carrying JWE header fields.
    enc = craft_hs({"alg": "HS256", "enc": "A256GCM"}, claims_at(), SECRET)
    expect_error(hs_validator, enc, "header")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e.f",
        "!!!.???.***",
        f"{b64(b'not json')}.{b64json({'sub': 'a'})}.c2ln",
        f"{b64json(['alg', 'HS256'])}.{b64json({'sub': 'a'})}.c2ln",
        f".{b64json({'sub': 'a'})}.c2ln",
        f"{b64json({'alg': 'HS256'})}..c2ln",
        f"{b64json({'alg': 'HS256'})}.{b64json({'sub': 'a'})}.c2ln=",
        f" {b64json({'alg': 'HS256'})}.{b64json({'sub': 'a'})}.c2ln",
        f"{b64json({'alg': 'HS256'})}.{b64json({'sub': 'é'})}.c2ln\u00e9",
        f"{DUP_ALG_HEADER}.{b64json({'sub': 'a'})}.c2ln",
    ],
)
def test_malformed(hs_validator: TokenValidator, token: str) -> None:
    expect_error(hs_validator, token, "malformed")


def test_not_a_string(hs_validator: TokenValidator) -> None:
    expect_error(hs_validator, b"abc.def.ghi", "malformed")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- algorithm confusion


def test_algorithm_confusion_rs256_only(
    rsa_pem_file: Path, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    """An HS256 token MACed with the RSA public key PEM is refused when only RS256 is allowed."""
    v = TokenValidator(
        make_settings(algorithms=["RS256"], public_key_file=rsa_pem_file), clock=clock
    )
    pem = public_pem(rsa_key)
    forged = craft_hs({"alg": "HS256", "typ": "JWT"}, claims_at(sub="root"), pem)
    expect_error(v, forged, "algorithm", secrets=(pem.decode(),))
    expect_error(v, forged, "algorithm", cached=True)


def test_algorithm_confusion_both_allowed(
    rsa_pem_file: Path, rsa_key: rsa.RSAPrivateKey, secret_file: Path, clock: FakeClock
) -> None:
    v = TokenValidator(
        make_settings(
            algorithms=["HS256", "RS256"], public_key_file=rsa_pem_file, secret_file=secret_file
        ),
        clock=clock,
    )
    pem = public_pem(rsa_key)
    for key in (pem, pem.strip(), pem.decode().replace("\n", "\r\n").encode()):
        forged = craft_hs({"alg": "HS256"}, claims_at(sub="root"), key)
        expect_error(v, forged, "signature", secrets=(SECRET, pem.decode()))
    # The legitimate tokens of both kinds still work.
    assert validate(v, mint_token(SECRET, "a", now=NOW)).user == "a"
    rs = mint_token(private_pem(rsa_key), "b", algorithm="RS256", now=NOW)
    assert validate(v, rs).user == "b"
    # And an RS256 token is never checked against the secret.
    header = b64json({"alg": "RS256"})
    payload = b64json(claims_at(sub="root"))
    mac = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    expect_error(v, f"{header}.{payload}.{b64(mac)}", "signature")


def test_algorithm_confusion_jwks(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, secret_file: Path, clock: FakeClock
) -> None:
    """Neither the JWK JSON nor an 'oct' key from a JWKS can serve as an HMAC secret."""
    jwk = to_jwk(rsa_key, "k1")
    oct_secret = b"jwks-oct-secret-0123456789abcdef"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk, {"kty": "oct", "kid": "o", "k": b64(oct_secret)}]}))
    v = TokenValidator(
        make_settings(algorithms=["HS256", "RS256"], jwks_file=path, secret_file=secret_file),
        clock=clock,
    )
    for key in (json.dumps(jwk).encode(), oct_secret, path.read_bytes()):
        for kid in ("k1", "o"):
            forged = craft_hs({"alg": "HS256", "kid": kid}, claims_at(sub="root"), key)
            expect_error(v, forged, "signature")


def test_pem_as_secret_is_a_config_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(public_pem(rsa_key))
    with pytest.raises(IdentityConfigError) as info:
        TokenValidator(make_settings(secret_file=path), clock=clock)
    assert "BEGIN" not in str(info.value)


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize(
    ("path", "claims", "expected"),
    [
        ("groups", {"groups": ["a", "b"]}, ("a", "b")),
        ("cognito:groups", {"cognito:groups": ["admins"], "groups": ["x"]}, ("admins",)),
        ("realm_access.roles", {"realm_access": {"roles": ["dba", "dev"]}}, ("dba", "dev")),
        ("https://example.com/roles", {"https://example.com/roles": ["r"]}, ("r",)),
        ("a.b.c", {"a": {"b": {"c": ["deep"]}}}, ("deep",)),
        ("groups", {"groups": "single"}, ("single",)),
        ("groups", {"groups": ["a", "a", "", "b"]}, ("a", "b")),
        ("groups", {}, ()),
        ("realm_access.roles", {"realm_access": "oops"}, ()),
        ("realm_access.roles", {"realm_access": {}}, ()),
    ],
)
def test_groups_claim_paths(
    secret_file: Path,
    clock: FakeClock,
    path: str,
    claims: dict[str, Any],
    expected: tuple[str, ...],
) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file, groups_claim=path), clock=clock)
    assert validate(v, mint_token(SECRET, "a", now=NOW, claims=claims)).groups == expected


@pytest.mark.parametrize("value", [[1, 2], {"a": "b"}, 5, ["ok", None]])
def test_groups_claim_malformed(secret_file: Path, clock: FakeClock, value: Any) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file), clock=clock)
    expect_error(v, mint_token(SECRET, "a", now=NOW, claims={"groups": value}), "claims")


def test_claim_at_path() -> None:
    claims = {"a": {"b": 1}, "a.b": 2, "x": [1]}
    assert claim_at_path(claims, "a.b") == 2
    assert claim_at_path({"a": {"b": 1}}, "a.b") == 1
    assert claim_at_path(claims, "x.y") is None
    assert claim_at_path(claims, "missing") is None


# --------------------------------------------------------------------------- mint_token


def test_mint_round_trip(secret_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(
        make_settings(
            secret_file=secret_file, groups_claim="realm_access.roles", audience="pgguard"
        ),
        clock=clock,
    )
    token = mint_token(
        SECRET,
        "alice",
        groups=("ai-agents",),
        ttl=600,
        claims={"aud": "pgguard", "agent": "cursor", "jti": "fixed-jti"},
        now=NOW + 0.7,
        groups_claim="realm_access.roles",
    )
    ident = validate(v, token)
    assert ident.groups == ("ai-agents",)
    assert ident.claims["realm_access"] == {"roles": ["ai-agents"]}
    assert (ident.user, ident.agent, ident.jti) == ("alice", "cursor", "fixed-jti")
    assert ident.expires_at - ident.issued_at == 600
    assert ident.issued_at == NOW
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    # Distinct jti per token by default.
    a, b = (validate(v, mint_token(SECRET, "a", now=NOW, claims={"aud": "pgguard"})) for _ in "ab")
    assert a.jti != b.jti


def test_mint_cognito_groups_and_kid(secret_file: Path, clock: FakeClock) -> None:
    token = mint_token(
        SECRET, "a", groups=["g"], groups_claim="cognito:groups", now=NOW, headers={"kid": "dev"}
    )
    v = TokenValidator(
        make_settings(secret_file=secret_file, groups_claim="cognito:groups"), clock=clock
    )
    ident = validate(v, token)
    assert ident.groups == ("g",)
    assert "cognito:groups" in ident.claims


def test_mint_uses_current_time(secret_file: Path) -> None:
    v = TokenValidator(make_settings(secret_file=secret_file))
    ident = validate(v, mint_token(SECRET, "now", ttl=60))
    assert abs(ident.issued_at - time.time()) < 5


def test_mint_refuses_bad_input(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "a", algorithm="none")
    with pytest.raises(ValueError):
        mint_token(SECRET, "", now=NOW)
    with pytest.raises(ValueError):
        mint_token("", "a", now=NOW)
    with pytest.raises(ValueError):
        mint_token(SECRET, "a", ttl=0, now=NOW)
    with pytest.raises(ValueError):
        mint_token(public_pem(rsa_key).decode(), "a", now=NOW)  # PEM as HMAC secret
    with pytest.raises(ValueError):
        mint_token(SECRET, "a", algorithm="RS256", now=NOW)  # not a private key


# --------------------------------------------------------------------------- JWKS over HTTP


def _rs(key: rsa.RSAPrivateKey, kid: str | None, now: float, sub: str = "u") -> str:
    """An RS256 token signed with an already-loaded key (reloading PEM per token is slow)."""
    headers = {"kid": kid} if kid is not None else None
    signer = jwk.construct(key, "RS256")
    return str(jws.sign(claims_at(now, sub=sub), signer, headers=headers, algorithm="RS256"))


def _unknown_kid(kid: str, now: float) -> str:
    """An RS256 token naming a kid nobody published (refused before any signature check)."""
    return f"{b64json({'alg': 'RS256', 'kid': kid})}.{b64json(claims_at(now))}.{b64(b'x' * 256)}"


def _oidc(idp: FakeIdP, *keys: dict[str, Any]) -> None:
    idp.set_json(
        "/.well-known/openid-configuration",
        {"issuer": idp.base, "jwks_uri": idp.base + "/protocol/openid-connect/certs"},
    )
    idp.set_jwks("/protocol/openid-connect/certs", *keys)


def test_oidc_discovery_kid_rotation_and_rate_limit(
    idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    certs = "/protocol/openid-connect/certs"
    _oidc(idp, to_jwk(rsa_key, "k1", use="sig", alg="RS256"))
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base, issuer=idp.base, leeway=0),
        clock=clock,
    )
    assert idp.hits[certs] == 0  # lazily fetched

    # Before any fetch, the sync path has no key and does not fetch.
    t1 = mint_token(
        private_pem(rsa_key), "u", algorithm="RS256", now=clock(),
        claims={"iss": idp.base}, headers={"kid": "k1"},
    )  # fmt: skip
    expect_error(v, t1, "key", cached=True)
    assert idp.hits[certs] == 0

    assert validate(v, t1).user == "u"
    assert idp.hits["/"] == 1  # the issuer URL itself is not a JWKS...
    assert idp.hits["/.well-known/openid-configuration"] == 1  # ...so discovery is used
    assert idp.hits[certs] == 1
    assert validate(v, t1).user == "u"
    assert v.validate_cached_keys(t1).user == "u"
    assert idp.hits[certs] == 1  # cached

    def k2_token() -> str:
        return mint_token(
            private_pem(rsa_key2), "u", algorithm="RS256", now=clock(),
            claims={"iss": idp.base}, headers={"kid": "k2"},
        )  # fmt: skip

    # The IdP has not published k2 yet, and we fetched less than 30 s ago: no refetch.
    expect_error(v, k2_token(), "key")
    assert idp.hits[certs] == 1
    # Rotation: the IdP publishes k2 (and still k1).
    idp.set_jwks(certs, to_jwk(rsa_key, "k1", alg="RS256"), to_jwk(rsa_key2, "k2", alg="RS256"))
    expect_error(v, k2_token(), "key")  # still inside the 30 s window
    expect_error(v, k2_token(), "key", cached=True)
    assert idp.hits[certs] == 1
    clock.advance(31)
    assert validate(v, k2_token()).user == "u"  # unknown kid -> one refetch
    assert idp.hits[certs] == 2
    assert v.validate_cached_keys(k2_token()).user == "u"

    # A flood of tokens with unknown kids cannot make us hammer the IdP.
    for i in range(50):
        expect_error(v, _unknown_kid(f"bogus-{i}", clock()), "key")
        clock.advance(0.5)  # 25 s in total
    assert idp.hits[certs] == 2
    clock.advance(6)
    expect_error(v, _unknown_kid("bogus-x", clock()), "key")
    assert idp.hits[certs] == 3  # one more fetch once the window has passed
    for i in range(10):
        expect_error(v, _unknown_kid(f"bogus-y{i}", clock()), "key")
    assert idp.hits[certs] == 3
    assert idp.hits["/.well-known/openid-configuration"] == 1  # discovery is remembered

    # k1 is retired; once the cache expires (jwks_cache_ttl, 300 s) it stops working.
    idp.set_jwks(certs, to_jwk(rsa_key2, "k2", alg="RS256"))
    t1_late = mint_token(
        private_pem(rsa_key), "u", algorithm="RS256", now=clock(),
        claims={"iss": idp.base}, headers={"kid": "k1"},
    )  # fmt: skip
    assert validate(v, t1_late).user == "u"  # still cached
    clock.advance(301)
    t1_later = mint_token(
        private_pem(rsa_key), "u", algorithm="RS256", now=clock(),
        claims={"iss": idp.base}, headers={"kid": "k1"},
    )  # fmt: skip
    expect_error(v, t1_later, "key")
    assert idp.hits[certs] == 4
    assert validate(v, k2_token()).user == "u"
    assert idp.hits[certs] == 4


def test_discovery_document_url(
    idp: FakeIdP, ec_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    idp.set_json("/tenant/config", {"jwks_uri": "/tenant/keys"})  # relative jwks_uri
    idp.set_jwks("/tenant/keys", to_jwk(ec_key, "e1"))
    v = TokenValidator(
        make_settings(algorithms=["ES256"], jwks_url=idp.base + "/tenant/config"), clock=clock
    )
    token = mint_token(private_pem(ec_key), "x", algorithm="ES256", now=NOW, headers={"kid": "e1"})
    assert validate(v, token).user == "x"
    assert (idp.hits["/tenant/config"], idp.hits["/tenant/keys"]) == (1, 1)
    assert idp.hits["/tenant/config/.well-known/openid-configuration"] == 0


def test_well_known_url_given_directly(
    idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    _oidc(idp, to_jwk(rsa_key, "k1"))
    v = TokenValidator(
        make_settings(
            algorithms=["RS256"], jwks_url=idp.base + "/.well-known/openid-configuration"
        ),
        clock=clock,
    )
    assert validate(v, _rs(rsa_key, "k1", NOW)).user == "u"
    assert idp.hits["/"] == 0


def test_direct_jwks_url(idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, clock: FakeClock) -> None:
    idp.set_jwks("/keys/jwks.json", to_jwk(rsa_key, "k1"))
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base + "/keys/jwks.json"), clock=clock
    )
    assert validate(v, _rs(rsa_key, "k1", NOW)).user == "u"
    assert validate(v, _rs(rsa_key, None, NOW)).user == "u"  # no kid: matching keys tried
    assert dict(idp.hits) == {"/keys/jwks.json": 1}


def test_concurrent_cold_start_fetches_once(
    idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    idp.set_jwks("/jwks", to_jwk(rsa_key, "k1"))
    idp.delay = 0.2
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base + "/jwks"), clock=clock
    )
    tokens = [_rs(rsa_key, "k1", NOW, sub=f"user{i}") for i in range(20)]
    users: list[str] = []

    async def one(token: str) -> None:
        users.append((await v.validate(token)).user)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for token in tokens:
                tg.start_soon(one, token)

    anyio.run(main)
    assert sorted(users) == sorted(f"user{i}" for i in range(20))
    assert idp.hits["/jwks"] == 1


def test_idp_failure_is_rate_limited_and_stale_keys_survive(
    idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    idp.set_json("/jwks", {"error": "boom"}, status=500)
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base + "/jwks"), clock=clock
    )
    exc = expect_error(v, _rs(rsa_key, "k1", clock()), "key")
    assert "127.0.0.1" not in str(exc)  # the client is not told about our IdP
    assert idp.hits["/jwks"] == 1
    for _ in range(5):
        expect_error(v, _rs(rsa_key, "k1", clock()), "key")
    assert idp.hits["/jwks"] == 1
    assert anyio.run(v.refresh_keys) is False

    idp.set_jwks("/jwks", to_jwk(rsa_key, "k1"))
    clock.advance(30)
    assert validate(v, _rs(rsa_key, "k1", clock())).user == "u"
    assert idp.hits["/jwks"] == 2

    # The IdP goes down; after the cache TTL the old keys are still used.
    idp.set_json("/jwks", "not a jwks", status=200)
    clock.advance(400)
    assert validate(v, _rs(rsa_key, "k1", clock())).user == "u"
    assert idp.hits["/jwks"] == 3
    assert validate(v, _rs(rsa_key, "k1", clock())).user == "u"
    assert idp.hits["/jwks"] == 3  # and the failing IdP is not asked again at once


def test_refresh_keys_prefetches(
    idp: FakeIdP, rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    idp.set_jwks("/jwks", to_jwk(rsa_key, "k1"))
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base + "/jwks"), clock=clock
    )
    assert anyio.run(v.refresh_keys) is True
    assert v.validate_cached_keys(_rs(rsa_key, "k1", NOW)).user == "u"
    assert idp.hits["/jwks"] == 1


def test_jwks_url_with_unusable_keys(idp: FakeIdP, rsa_key: rsa.RSAPrivateKey) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    idp.set_jwks("/jwks", to_jwk(small, "small"), {"kty": "oct", "kid": "o", "k": "c2VjcmV0"})
    v = TokenValidator(
        make_settings(algorithms=["RS256"], jwks_url=idp.base + "/jwks"), clock=FakeClock()
    )
    expect_error(v, _rs(small, "small", NOW), "key")


# --------------------------------------------------------------------------- configuration


def test_config_errors(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGGUARD_JWT_SECRET", raising=False)
    with pytest.raises(IdentityConfigError, match="PGGUARD_JWT_SECRET"):
        TokenValidator(IdentitySettings())  # HS256 allowed, no secret
    with pytest.raises(IdentityConfigError, match="secret_file"):
        TokenValidator(make_settings(secret_file=tmp_path / "missing"))
    with pytest.raises(IdentityConfigError, match="public key"):
        TokenValidator(make_settings(algorithms=["RS256"]))
    with pytest.raises(IdentityConfigError, match="jwks_url"):
        TokenValidator(make_settings(algorithms=["RS256"], jwks_url="file:///etc/passwd"))
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a key")
    with pytest.raises(IdentityConfigError, match="public_key_file"):
        TokenValidator(make_settings(algorithms=["RS256"], public_key_file=bad_pem))
    small = tmp_path / "small.pem"
    small.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(IdentityConfigError, match="too small"):
        TokenValidator(make_settings(algorithms=["RS256"], public_key_file=small))
    bad_jwks = tmp_path / "jwks.json"
    bad_jwks.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(IdentityConfigError, match="no usable"):
        TokenValidator(make_settings(algorithms=["RS256"], jwks_file=bad_jwks))
    bad_jwks.write_text("{")
    with pytest.raises(IdentityConfigError, match="JSON"):
        TokenValidator(make_settings(algorithms=["RS256"], jwks_file=bad_jwks))


def test_hs_token_refused_when_only_rs_keys(rsa_pem_file: Path, clock: FakeClock) -> None:
    v = TokenValidator(
        make_settings(algorithms=["RS256"], public_key_file=rsa_pem_file), clock=clock
    )
    expect_error(v, mint_token(SECRET, "a", now=NOW), "algorithm")


# --------------------------------------------------------------------------- errors


def test_token_error_contract() -> None:
    exc = TokenError("signature", "token signature invalid")
    assert (exc.reason, exc.sqlstate, str(exc)) == ("signature", "28P01", "token signature invalid")
    assert TokenError("expired", "token expired").sqlstate == "28000"
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.reason, str(copy)) == (exc.reason, str(exc))
    assert set(TOKEN_ERROR_REASONS) == {
        "malformed", "too_large", "algorithm", "header", "signature", "expired",
        "not_yet_valid", "claims", "audience", "issuer", "ttl", "key",
    }  # fmt: skip


def test_errors_never_leak(hs_validator: TokenValidator, clock: FakeClock) -> None:
    """Every refusal path: the message never quotes the token or the secret."""
    tokens: list[Callable[[], str]] = [
        lambda: mint_token(OTHER_SECRET, SECRET, now=NOW),
        lambda: craft_hs({"alg": SECRET}, claims_at(), SECRET),
        lambda: craft_hs({"alg": "HS256", "kid": SECRET * 10}, claims_at(), SECRET),
        lambda: craft_hs({"alg": "HS256", "typ": SECRET}, claims_at(), SECRET),
        lambda: craft_hs({"alg": "HS256"}, {**claims_at(), "sub": ["x", SECRET]}, SECRET),
        lambda: craft_hs({"alg": "HS256"}, {**claims_at(), "groups": [1, SECRET]}, SECRET),
        lambda: mint_token(SECRET, SECRET, now=NOW - 10_000),
    ]
    for make in tokens:
        with pytest.raises(TokenError) as info:
            validate(hs_validator, make())
        assert SECRET not in str(info.value)
        assert SECRET not in repr(info.value)
