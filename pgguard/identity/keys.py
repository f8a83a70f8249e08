"""Verification keys: PEM files, JWK sets (file or URL, with OIDC discovery), HMAC secrets.

Asymmetric keys are parsed here with ``cryptography`` (public parts only) and handed to
python-jose as ready-made key objects for exactly one algorithm, so that jose never has to
guess a key's type from the token. Symmetric (``oct``) JWKs are never accepted: HS* tokens are
verified with the configured secret only.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.client import HTTPMessage
from typing import IO, Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jose import jwk
from jose.backends.base import Key as JoseKey

log = logging.getLogger("pgguard.identity")

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512"})
PSS_ALGORITHMS: Final = frozenset({"PS256", "PS384", "PS512"})
EC_ALGORITHMS: Final[Mapping[str, str]] = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
ASYMMETRIC_ALGORITHMS: Final = RSA_ALGORITHMS | PSS_ALGORITHMS | frozenset(EC_ALGORITHMS)
KNOWN_ALGORITHMS: Final = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS

MIN_RSA_BITS: Final = 2048
MAX_JWKS_KEYS: Final = 100
MAX_JWKS_BYTES: Final = 1024 * 1024

_CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_NAMES: Final[Mapping[str, str]] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}
PSS_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
    "PS512": hashes.SHA512,
}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)

PublicKeyObject = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class KeyLoadError(ValueError):
    """Key material could not be used (the message names the source, never key bytes)."""


class FetchError(Exception):
    """A JWKS / discovery document could not be fetched or used."""


class _PSSKey(JoseKey):  # type: ignore[misc]
    """RSASSA-PSS verification (PS256/384/512), which python-jose does not implement.

    RFC 7518 §3.5: MGF1 with the same hash, salt length equal to the hash output size.
    """

    def __init__(self, key: rsa.RSAPublicKey, algorithm: str) -> None:
        self._key = key
        self._hash = PSS_HASHES[algorithm]

    def verify(self, msg: bytes, sig: bytes) -> bool:
        digest = self._hash()
        try:
            self._key.verify(
                sig,
                msg,
                padding.PSS(mgf=padding.MGF1(self._hash()), salt_length=digest.digest_size),
                digest,
            )
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One trusted asymmetric verification key."""

    key: PublicKeyObject
    kid: str | None = None
    alg: str | None = None  # the JWK's own "alg" restriction, if any
    source: str = ""

    @property
    def kty(self) -> str:
        return "RSA" if isinstance(self.key, rsa.RSAPublicKey) else "EC"

    @property
    def crv(self) -> str | None:
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return _CURVE_NAMES.get(self.key.curve.name)
        return None

    def supports(self, alg: str) -> bool:
        """True if this key may verify a token signed with ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg in RSA_ALGORITHMS or alg in PSS_ALGORITHMS:
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg in EC_ALGORITHMS:
            return isinstance(self.key, ec.EllipticCurvePublicKey) and (
                self.crv == EC_ALGORITHMS[alg]
            )
        return False  # HS* never with a public key

    def verifier(self, alg: str) -> Any:
        """A python-jose key object bound to ``alg`` (call only when ``supports(alg)``)."""
        if not self.supports(alg):
            raise ValueError(f"key does not support {alg}")
        if alg in PSS_ALGORITHMS:
            assert isinstance(self.key, rsa.RSAPublicKey)
            return _PSSKey(self.key, alg)
        return jwk.construct(self.key, alg)


def hmac_verifier(secret: bytes, alg: str) -> Any:
    """A python-jose HMAC key for ``alg``; jose refuses PEM/SSH-looking secrets."""
    if alg not in HMAC_ALGORITHMS:
        raise ValueError(f"{alg} is not an HMAC algorithm")
    return jwk.construct(secret, alg)


def _check_public_key(key: Any, source: str) -> PublicKeyObject:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(
                f"{source}: RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})"
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVE_NAMES:
            raise KeyLoadError(f"{source}: unsupported elliptic curve {key.curve.name}")
        return key
    raise KeyLoadError(f"{source}: unsupported key type (only RSA and EC keys are supported)")


def load_pem_keys(data: bytes, source: str) -> list[PublicKey]:
    """Every public key in a PEM file: public keys, certificates, or private keys (public part)."""
    keys: list[PublicKey] = []
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise KeyLoadError(f"{source}: no PEM key or certificate found")
    for block in blocks:
        label = block.group(1).decode("ascii")
        pem = block.group(0)
        try:
            if label == "CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(pem).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = serialization.load_pem_public_key(pem)
            elif label in ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"):
                log.warning(
                    "%s holds a private key; pgguard only needs the public key to verify tokens",
                    source,
                )
                key = serialization.load_pem_private_key(pem, password=None).public_key()
            elif label in ("X509 CRL", "CERTIFICATE REQUEST", "EC PARAMETERS"):
                continue
            else:
                raise KeyLoadError(f"{source}: unsupported PEM block {label!r}")
        except KeyLoadError:
            raise
        except Exception as exc:
            raise KeyLoadError(f"{source}: cannot load PEM block {label!r}") from exc
        keys.append(PublicKey(_check_public_key(key, source), source=source))
    if not keys:
        raise KeyLoadError(f"{source}: no usable public key found")
    return keys


def _b64url_int(value: Any, name: str) -> int:
    if not isinstance(value, str) or not value or not re.fullmatch(r"[A-Za-z0-9_-]+=*", value):
        raise KeyLoadError(f"JWK member {name!r} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise KeyLoadError(f"JWK member {name!r} is not base64url") from exc
    return int.from_bytes(raw, "big")


def public_key_from_jwk(data: Mapping[str, Any], source: str = "JWK") -> PublicKey:
    """An RSA or EC signing key from one JWK (private members, if any, are ignored)."""
    kid = data.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyLoadError(f"{source}: 'kid' must be a string")
    use = data.get("use")
    if use is not None and use != "sig":
        raise KeyLoadError(f"{source}: key {kid!r} is not a signing key (use={use!r})")
    ops = data.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise KeyLoadError(f"{source}: key {kid!r} is not for verification (key_ops)")
    alg = data.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise KeyLoadError(f"{source}: key {kid!r} has an unsupported alg")
    kty = data.get("kty")
    key: Any
    if kty == "RSA":
        n = _b64url_int(data.get("n"), "n")
        e = _b64url_int(data.get("e"), "e")
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise KeyLoadError(f"{source}: key {kid!r} is not a valid RSA key") from exc
        if alg is not None and alg in EC_ALGORITHMS:
            raise KeyLoadError(f"{source}: key {kid!r}: alg does not match kty")
    elif kty == "EC":
        crv = data.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise KeyLoadError(f"{source}: key {kid!r} has an unsupported curve")
        curve = _CURVES[crv]()
        x = _b64url_int(data.get("x"), "x")
        y = _b64url_int(data.get("y"), "y")
        try:
            key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError as exc:
            raise KeyLoadError(f"{source}: key {kid!r} is not a valid EC point") from exc
        if alg is not None and EC_ALGORITHMS.get(alg) != crv:
            raise KeyLoadError(f"{source}: key {kid!r}: alg does not match crv")
    elif kty == "oct":
        raise KeyLoadError(
            f"{source}: key {kid!r} is symmetric; HS* tokens are only verified with the "
            "configured secret"
        )
    else:
        raise KeyLoadError(f"{source}: key {kid!r} has an unsupported kty")
    return PublicKey(_check_public_key(key, source), kid=kid, alg=alg, source=source)


def load_jwks(document: Any, source: str) -> list[PublicKey]:
    """The usable keys of a JWK Set; unusable entries are skipped with a warning."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise KeyLoadError(f"{source}: not a JWK Set (no 'keys' list)")
    entries: list[Any] = document["keys"]
    if len(entries) > MAX_JWKS_KEYS:
        log.warning(
            "%s: only the first %d of %d keys are used", source, MAX_JWKS_KEYS, len(entries)
        )
    keys: list[PublicKey] = []
    for entry in entries[:MAX_JWKS_KEYS]:
        if not isinstance(entry, Mapping):
            log.warning("%s: skipping a key that is not a JSON object", source)
            continue
        try:
            keys.append(public_key_from_jwk(entry, source))
        except KeyLoadError as exc:
            log.warning("skipping key: %s", exc)
    return keys


def strict_json(data: bytes) -> Any:
    """json.loads that refuses duplicate object keys and NaN/Infinity."""

    def pairs(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for k, v in items:
            if k in obj:
                raise ValueError("duplicate key in JSON object")
            obj[k] = v
        return obj

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to http."""

    max_redirections = 5

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url).scheme
        new = urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise urllib.error.HTTPError(newurl, code, "refused redirect", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_url(url: str, what: str = "identity.jwks_url") -> None:
    """Refuse anything but an absolute http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KeyLoadError(f"{what} must be an absolute http:// or https:// URL")


def _looks_like_jwks_url(url: str) -> bool:
    path = urllib.parse.urlsplit(url).path.rstrip("/").lower()
    return path.endswith(".json") or path.endswith("jwks")


class JWKSFetcher:
    """Blocking fetch of a JWK Set from a JWKS URL or an OIDC issuer (run it in a thread).

    ``url`` may be a JWKS URL, a discovery document URL (anything with ``jwks_uri``) or an
    issuer, in which case ``<issuer>/.well-known/openid-configuration`` is consulted. The
    resolved JWKS location is remembered; it is looked up again after a failed fetch.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        check_url(url)
        self.url = url
        self.timeout = timeout
        self._jwks_uri: str | None = url if _looks_like_jwks_url(url) else None
        self._opener = urllib.request.build_opener(_SafeRedirects())
        if urllib.parse.urlsplit(url).scheme == "http":
            host = urllib.parse.urlsplit(url).hostname or ""
            if host not in ("localhost", "127.0.0.1", "::1"):
                log.warning(
                    "identity.jwks_url uses plain http; keys fetched over the network without TLS "
                    "can be forged in transit"
                )

    def _get_json(self, url: str) -> Any:
        request = urllib.request.Request(
            url, headers={"Accept": "application/json", "User-Agent": "pgguard"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = getattr(response, "status", 200)
                if status != 200:
                    raise FetchError(f"{url}: HTTP {status}")
                body = response.read(MAX_JWKS_BYTES + 1)
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"{url}: {reason}") from None
        if len(body) > MAX_JWKS_BYTES:
            raise FetchError(f"{url}: response larger than {MAX_JWKS_BYTES} bytes")
        try:
            return strict_json(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FetchError(f"{url}: response is not JSON") from None

    def _keys_from(self, document: Any, url: str) -> list[PublicKey]:
        try:
            keys = load_jwks(document, url)
        except KeyLoadError as exc:
            raise FetchError(str(exc)) from None
        if not keys:
            raise FetchError(f"{url}: JWK Set has no usable signing keys")
        return keys

    def _follow(self, base: str, document: Mapping[str, Any]) -> list[PublicKey]:
        target = document.get("jwks_uri")
        if not isinstance(target, str) or not target:
            raise FetchError(f"{base}: jwks_uri is not a string")
        jwks_uri = urllib.parse.urljoin(base, target)
        try:
            check_url(jwks_uri, "jwks_uri")
        except KeyLoadError:
            raise FetchError(f"{base}: jwks_uri is not an http(s) URL") from None
        if urllib.parse.urlsplit(base).scheme == "https" and not jwks_uri.startswith("https:"):
            raise FetchError(f"{base}: refusing a plain-http jwks_uri from an https issuer")
        keys = self._keys_from(self._get_json(jwks_uri), jwks_uri)
        self._jwks_uri = jwks_uri
        return keys

    def fetch(self) -> list[PublicKey]:
        """The current keys; raises FetchError."""
        if self._jwks_uri is not None:
            try:
                document = self._get_json(self._jwks_uri)
                if (
                    isinstance(document, Mapping)
                    and "keys" not in document
                    and ("jwks_uri" in document)
                ):
                    return self._follow(self._jwks_uri, document)
                return self._keys_from(document, self._jwks_uri)
            except FetchError:
                if self._jwks_uri != self.url or not _looks_like_jwks_url(self.url):
                    self._jwks_uri = None  # discover again next time
                raise
        candidates = [self.url]
        if "/.well-known/" not in urllib.parse.urlsplit(self.url).path:
            candidates.append(self.url.rstrip("/") + "/.well-known/openid-configuration")
        problems: list[str] = []
        for url in candidates:
            try:
                document = self._get_json(url)
                if isinstance(document, Mapping) and "keys" in document:
                    keys = self._keys_from(document, url)
                    self._jwks_uri = url
                    return keys
                if isinstance(document, Mapping) and "jwks_uri" in document:
                    return self._follow(url, document)
                problems.append(f"{url}: neither a JWK Set nor a discovery document")
            except FetchError as exc:
                problems.append(str(exc))
        raise FetchError("; ".join(problems))
