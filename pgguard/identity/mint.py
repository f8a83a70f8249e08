"""Minting tokens with the configured dev key (``pgguard token mint``, the demo, tests)."""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jose import jwt

from .keys import KNOWN_ALGORITHMS, PSS_ALGORITHMS, PSS_HASHES


def _set_path(payload: dict[str, Any], path: str, value: Any) -> None:
    """Store ``value`` at a claim path: dots nest objects unless the path looks like a URL."""
    if "." not in path or "://" in path:
        payload[path] = value
        return
    *parents, leaf = path.split(".")
    node = payload
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _sign_pss(
    payload: Mapping[str, Any], pem: str, algorithm: str, headers: Mapping[str, Any]
) -> str:
    key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{algorithm} needs an RSA private key")
    hash_cls = PSS_HASHES[algorithm]
    header = {"alg": algorithm, "typ": "JWT", **headers}
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
        + "."
        + _b64(json.dumps(dict(payload), separators=(",", ":")).encode())
    )
    signature = key.sign(
        signing_input.encode("ascii"),
        padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls().digest_size),
        hash_cls(),
    )
    return signing_input + "." + _b64(signature)


def mint_token(
    secret: str,
    sub: str,
    *,
    groups: Sequence[str] = (),
    ttl: float = 900,
    claims: Mapping[str, Any] | None = None,
    algorithm: str = "HS256",
    now: float | None = None,
    groups_claim: str = "groups",
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A signed JWT for ``sub``, valid for ``ttl`` seconds from ``now``.

    ``secret`` is the HMAC secret for HS*, or a PEM private key for RS*/ES*/PS*. The token
    carries ``sub``, ``iat``, ``exp``, a random ``jti`` and, when given, ``groups`` at
    ``groups_claim`` (``realm_access.roles`` nests); ``claims`` are added last and win.
    ``headers`` are extra JOSE header fields (e.g. ``kid``).
    """
    if algorithm not in KNOWN_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    if not secret:
        raise ValueError("a signing secret or key is required")
    if not sub:
        raise ValueError("sub must not be empty")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    if isinstance(groups, str):
        groups = [groups]
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "exp": issued + max(1, int(ttl)),
        "jti": secrets.token_urlsafe(16),
    }
    if groups:
        _set_path(payload, groups_claim, list(groups))
    if claims:
        payload.update(claims)
    extra = dict(headers or {})
    if algorithm in PSS_ALGORITHMS:
        return _sign_pss(payload, secret, algorithm, extra)
    try:
        token: str = jwt.encode(payload, secret, algorithm=algorithm, headers=extra or None)
    except Exception as exc:  # jose wraps key problems in JWSError/JWKError
        raise ValueError(f"cannot sign a {algorithm} token with the given key") from exc
    return token
