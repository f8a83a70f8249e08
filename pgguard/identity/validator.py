"""JWT validation: python-jose for the signature, wrapped so that it fails closed (SPEC §2).

Order of checks: size → shape (compact JWS, 3 parts) → header (allow-listed ``alg``, no
``jku``/``x5u``/``jwk``/``x5c``/``crit``, no JWE) → key selection by algorithm family (HS* only
with the secret, RS*/PS*/ES* only with public keys) → signature → claims (``exp``, ``iat``,
``sub`` and the user claim required; ``nbf``; ``aud``/``iss`` when configured; lifetime).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import anyio.to_thread
from jose import jws

from pgguard.config import IdentitySettings

from .keys import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    KNOWN_ALGORITHMS,
    FetchError,
    JWKSFetcher,
    KeyLoadError,
    PublicKey,
    hmac_verifier,
    load_jwks,
    load_pem_keys,
    strict_json,
)
from .model import Identity, IdentityConfigError, TokenError

log = logging.getLogger("pgguard.identity")

#: Headers that would let the token choose its own key, or that we cannot honour.
REFUSED_HEADERS: Final = ("jku", "x5u", "jwk", "x5c", "crit")
#: Headers that only make sense for JWE (or compressed payloads).
_JWE_HEADERS: Final = ("enc", "zip", "epk", "apu", "apv", "iv", "tag", "p2s", "p2c")
_ACCEPTED_TYP: Final = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_MAX_KID = 256
_MAX_CANDIDATE_KEYS = 20
# NumericDate values beyond this (year ~2286) are refused rather than compared.
_MAX_NUMERIC_DATE = 1e10
_STRING_CLAIMS: Final = ("email", "agent", "prompt_id", "jti")

_MISSING: Final = object()


def claim_at_path(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at ``path``, or None.

    A key present verbatim wins (``cognito:groups``, ``https://example.com/roles``); otherwise
    dots walk nested objects (``realm_access.roles``).
    """
    if path in claims:
        return claims[path]
    current: Any = claims
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True, slots=True)
class _Parsed:
    token: str
    header: Mapping[str, Any]
    alg: str
    kid: str | None


@dataclass(frozen=True, slots=True)
class _RemoteKeys:
    keys: tuple[PublicKey, ...]
    kids: frozenset[str]
    fetched_at: float


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and abs(value) <= _MAX_NUMERIC_DATE


class TokenValidator:
    """Validates tokens against ``IdentitySettings``; one instance per process, thread-safe.

    Static key material (secret, PEM file, JWKS file) is loaded here; problems raise
    ``IdentityConfigError``. A JWKS/OIDC URL is fetched lazily by ``validate`` (in a worker
    thread), cached for ``jwks_cache_ttl`` and fetched again for an unknown ``kid`` (key
    rotation) at most once per ``jwks_refetch_interval`` seconds, whatever tokens arrive.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        clock: Callable[[], float] = time.time,
        jwks_refetch_interval: float = 30.0,
        http_timeout: float = 5.0,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._refetch_interval = jwks_refetch_interval
        self._allowed: frozenset[str] = frozenset(
            alg for alg in settings.algorithms if alg in KNOWN_ALGORITHMS
        )
        if not self._allowed:
            raise IdentityConfigError("identity.algorithms allows no signature algorithm")
        self._secret = self._load_secret()
        self._pem_keys: tuple[PublicKey, ...] = ()
        self._jwks_file_keys: tuple[PublicKey, ...] = ()
        if settings.public_key_file is not None:
            self._pem_keys = tuple(
                self._load_file(settings.public_key_file, "identity.public_key_file", pem=True)
            )
        if settings.jwks_file is not None:
            self._jwks_file_keys = tuple(
                self._load_file(settings.jwks_file, "identity.jwks_file", pem=False)
            )
        self._static_kids = frozenset(k.kid for k in self._jwks_file_keys if k.kid is not None)
        self._fetcher: JWKSFetcher | None = None
        if settings.jwks_url:
            try:
                self._fetcher = JWKSFetcher(settings.jwks_url, timeout=http_timeout)
            except KeyLoadError as exc:
                raise IdentityConfigError(str(exc)) from None
        self._remote: _RemoteKeys | None = None
        self._last_fetch_attempt: float | None = None
        self._fetching = False
        self._fetch_lock = threading.Lock()
        self._check_coverage()

    # ----------------------------------------------------------------- configuration

    def _load_secret(self) -> bytes | None:
        s = self.settings
        if not self._allowed & HMAC_ALGORITHMS:
            return None
        try:
            secret = s.secret()
        except OSError as exc:
            raise IdentityConfigError(
                f"identity.secret_file {s.secret_file}: cannot read ({exc.strerror})"
            ) from None
        if not secret:
            where = (
                f"identity.secret_file {s.secret_file}"
                if s.secret_file is not None
                else f"environment variable {s.secret_env}"
                if s.secret_env
                else "no secret_env or secret_file"
            )
            raise IdentityConfigError(
                f"identity.algorithms allows HS* but no secret is configured ({where} is empty)"
            )
        raw = secret.encode("utf-8")
        try:
            hmac_verifier(raw, "HS256")
        except Exception:
            raise IdentityConfigError(
                "the identity secret looks like an asymmetric key or certificate; "
                "HS* secrets must be random strings (use public_key_file for RS*/ES* keys)"
            ) from None
        if len(raw) < 32:
            log.warning("identity secret is shorter than 32 bytes; use a long random secret")
        return raw

    @staticmethod
    def _load_file(path: Any, what: str, *, pem: bool) -> list[PublicKey]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None
        source = f"{what} {path}"
        try:
            if pem:
                return load_pem_keys(data, source)
            try:
                document = strict_json(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise KeyLoadError(f"{source}: not valid JSON") from None
            keys = load_jwks(document, source)
        except KeyLoadError as exc:
            raise IdentityConfigError(str(exc)) from None
        if not keys:
            raise IdentityConfigError(f"{source}: no usable signing key")
        return keys

    def _check_coverage(self) -> None:
        static = self._pem_keys + self._jwks_file_keys
        asym = sorted(self._allowed & ASYMMETRIC_ALGORITHMS)
        if asym and not static and self._fetcher is None:
            raise IdentityConfigError(
                f"identity.algorithms allows {', '.join(asym)} but no public key is configured "
                "(set identity.public_key_file, identity.jwks_file or identity.jwks_url)"
            )
        if self._fetcher is None:
            for alg in asym:
                if not any(k.supports(alg) for k in static):
                    log.warning("identity: no configured key can verify %s tokens", alg)

    # ----------------------------------------------------------------- public API

    async def validate(self, token: str) -> Identity:
        """Validate ``token``; may fetch the JWKS (in a worker thread). Raises TokenError."""
        parsed = self._parse(token)
        if parsed.alg not in HMAC_ALGORITHMS and self._should_fetch(parsed.kid):
            await anyio.to_thread.run_sync(self._refresh_blocking, parsed.kid)
        return self._verify(parsed)

    def validate_cached_keys(self, token: str) -> Identity:
        """Validate ``token`` with keys already at hand; never fetches. Raises TokenError."""
        return self._verify(self._parse(token))

    async def refresh_keys(self) -> bool:
        """Fetch the JWKS now if a URL is configured (subject to the rate limit).

        Returns True if keys from the URL are cached (or no URL is configured).
        """
        if self._fetcher is None:
            return True
        if self._should_fetch(None):
            await anyio.to_thread.run_sync(self._refresh_blocking, None)
        return self._remote is not None

    # ----------------------------------------------------------------- parsing

    def _parse(self, token: str) -> _Parsed:
        limit = self.settings.max_token_bytes
        if not isinstance(token, str):
            raise TokenError("malformed", "token must be a string")
        if len(token) > limit or len(token.encode("utf-8", "surrogatepass")) > limit:
            raise TokenError("too_large", f"token too large (limit {limit} bytes)")
        if not token.isascii():
            raise TokenError("malformed", "token is not a well-formed JWT")
        parts = token.split(".")
        if len(parts) == 5:
            raise TokenError("malformed", "encrypted tokens (JWE) are not accepted")
        if len(parts) != 3:
            raise TokenError("malformed", "token is not a well-formed JWT (expected 3 parts)")
        if not all(_SEGMENT.fullmatch(p) for p in parts) or not parts[0] or not parts[1]:
            raise TokenError("malformed", "token is not a well-formed JWT")
        try:
            header = strict_json(_b64decode(parts[0]))
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            raise TokenError("malformed", "token header is not valid JSON") from None
        if not isinstance(header, dict):
            raise TokenError("malformed", "token header is not a JSON object")
        for name in _JWE_HEADERS:
            if name in header:
                raise TokenError("header", "encrypted tokens (JWE) are not accepted")
        for name in REFUSED_HEADERS:
            if name in header:
                raise TokenError("header", f"token header {name!r} is not allowed")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError("header", "token header has no algorithm")
        if alg not in self._allowed:
            named = f" {alg}" if alg in KNOWN_ALGORITHMS or alg.lower() == "none" else ""
            raise TokenError("algorithm", f"token algorithm{named} not allowed")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID):
            raise TokenError("header", "token header 'kid' is invalid")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            raise TokenError("header", "token type is not JWT")
        cty = header.get("cty")
        if cty is not None and (not isinstance(cty, str) or cty.lower() in _ACCEPTED_TYP):
            raise TokenError("header", "nested tokens are not accepted")
        if not parts[2]:
            raise TokenError("signature", "token signature invalid")
        return _Parsed(token=token, header=header, alg=alg, kid=kid)

    # ----------------------------------------------------------------- keys

    def _needs_refresh(self, kid: str | None, now: float) -> bool:
        remote = self._remote
        if remote is None or now - remote.fetched_at >= self.settings.jwks_cache_ttl:
            return True
        return kid is not None and kid not in remote.kids and kid not in self._static_kids

    def _fetch_allowed(self, now: float) -> bool:
        last = self._last_fetch_attempt
        return last is None or now - last >= self._refetch_interval or now < last

    def _should_fetch(self, kid: str | None) -> bool:
        if self._fetcher is None:
            return False
        now = self._clock()
        if not self._needs_refresh(kid, now):
            return False
        return self._fetching or self._fetch_allowed(now)

    def _refresh_blocking(self, kid: str | None) -> None:
        """Fetch the JWKS unless another thread just did (or the rate limit says no)."""
        fetcher = self._fetcher
        if fetcher is None:
            return
        with self._fetch_lock:
            now = self._clock()
            if not self._needs_refresh(kid, now) or not self._fetch_allowed(now):
                return
            self._last_fetch_attempt = now
            self._fetching = True
            try:
                keys = fetcher.fetch()
            except FetchError as exc:
                log.warning("identity: cannot fetch signing keys: %s", exc)
                return
            except Exception:
                log.exception("identity: unexpected error fetching signing keys")
                return
            finally:
                self._fetching = False
            self._remote = _RemoteKeys(
                keys=tuple(keys),
                kids=frozenset(k.kid for k in keys if k.kid is not None),
                fetched_at=self._clock(),
            )
            log.info("identity: loaded %d signing key(s) from %s", len(keys), fetcher.url)

    def _candidates(self, alg: str, kid: str | None) -> list[PublicKey]:
        remote = self._remote
        jwks = [
            k for k in (*self._jwks_file_keys, *(remote.keys if remote else ())) if k.supports(alg)
        ]
        if kid is not None:
            chosen = [k for k in jwks if k.kid == kid] or [k for k in jwks if k.kid is None]
        else:
            chosen = [k for k in jwks if k.kid is None] or jwks
        chosen += [k for k in self._pem_keys if k.supports(alg)]
        return chosen[:_MAX_CANDIDATE_KEYS]

    def _verifiers(self, parsed: _Parsed) -> list[Any]:
        alg = parsed.alg
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise TokenError("key", "no key configured for the token algorithm")
            return [hmac_verifier(self._secret, alg)]
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise TokenError("algorithm", "token algorithm not allowed")
        candidates = self._candidates(alg, parsed.kid)
        if not candidates:
            if self._fetcher is not None and self._remote is None:
                raise TokenError("key", "token signing keys are not available")
            raise TokenError("key", "token signing key not found")
        return [k.verifier(alg) for k in candidates]

    # ----------------------------------------------------------------- verification

    def _verify(self, parsed: _Parsed) -> Identity:
        verifiers = self._verifiers(parsed)
        try:
            payload = jws.verify(parsed.token, verifiers, algorithms=[parsed.alg])
        except Exception:
            raise TokenError("signature", "token signature invalid") from None
        try:
            claims = strict_json(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise TokenError("claims", "token claims are not valid JSON") from None
        if not isinstance(claims, dict):
            raise TokenError("claims", "token claims are not a JSON object")
        return self._check_claims(claims)

    def _check_claims(self, claims: dict[str, Any]) -> Identity:
        s = self.settings
        for name in ("exp", "iat"):
            if name not in claims:
                raise TokenError("claims", f"token missing required claim: {name}")
            if not _is_number(claims[name]):
                raise TokenError("claims", f"token claim {name} must be a NumericDate")
        if "nbf" in claims and not _is_number(claims["nbf"]):
            raise TokenError("claims", "token claim nbf must be a NumericDate")
        user = None
        for name in dict.fromkeys(("sub", s.user_claim)):
            value = claims.get(name) if name == "sub" else claim_at_path(claims, name)
            if value is None:
                raise TokenError("claims", f"token missing required claim: {name}")
            if not isinstance(value, str) or not value:
                raise TokenError("claims", f"token claim {name} must be a non-empty string")
            user = value
        assert user is not None

        now = self._clock()
        leeway = s.leeway
        exp, iat = claims["exp"], claims["iat"]
        if now >= exp + leeway:
            raise TokenError("expired", "token expired")
        if iat > now + leeway:
            raise TokenError("not_yet_valid", "token issued in the future")
        if "nbf" in claims and now + leeway < claims["nbf"]:
            raise TokenError("not_yet_valid", "token not yet valid")
        if exp < iat:
            raise TokenError("claims", "token expires before it was issued")
        if s.max_ttl > 0 and exp - iat > s.max_ttl:
            raise TokenError("ttl", "token lifetime exceeds the configured maximum")

        if s.issuer is not None:
            iss = claims.get("iss")
            if iss is None:
                raise TokenError("issuer", "token has no issuer claim")
            if iss != s.issuer:
                raise TokenError("issuer", "token issuer mismatch")
        if s.audience is not None:
            aud = claims.get("aud")
            if aud is None:
                raise TokenError("audience", "token has no audience claim")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise TokenError("audience", "token audience claim is malformed")
            if s.audience not in audiences:
                raise TokenError("audience", "token audience mismatch")

        strings: dict[str, str | None] = {}
        for name in _STRING_CLAIMS:
            value = claims.get(name)
            if value is not None and not isinstance(value, str):
                raise TokenError("claims", f"token claim {name} must be a string")
            strings[name] = value

        return Identity(
            user=user,
            email=strings["email"],
            groups=self._groups(claims),
            agent=strings["agent"],
            prompt_id=strings["prompt_id"],
            jti=strings["jti"],
            issued_at=float(iat),
            expires_at=float(exp),
            claims=MappingProxyType(dict(claims)),
        )

    def _groups(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        value = claim_at_path(claims, self.settings.groups_claim)
        if value is None:
            return ()
        items: Sequence[Any] = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(g, str) for g in items):
            raise TokenError(
                "claims", f"token claim {self.settings.groups_claim} must be a list of strings"
            )
        return tuple(dict.fromkeys(g for g in items if g))
