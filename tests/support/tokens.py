"""Hand-made JWTs for negative tests (no dependency on pgguard or python-jose)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def std_claims(sub: str, *, ttl: int = 600, iat_offset: int = 0, **extra: Any) -> dict[str, Any]:
    now = int(time.time()) + iat_offset
    return {"sub": sub, "iat": now, "exp": now + ttl, **extra}


def craft(
    claims: dict[str, Any],
    *,
    secret: str | None,
    alg: str = "HS256",
    header: dict[str, Any] | None = None,
) -> str:
    """Encode ``claims``; sign with HMAC when ``secret`` is given (HS256/384/512), leave the
    signature empty for ``alg: none``."""
    hdr = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    if alg.lower() == "none" or secret is None:
        return signing_input + "."
    digests = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    if alg not in digests:
        raise ValueError("only HS256/HS384/HS512 and none are crafted here")
    sig = hmac.new(secret.encode(), signing_input.encode(), digests[alg]).digest()
    return signing_input + "." + b64url(sig)
