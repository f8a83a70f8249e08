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
    """Encode ``claims``; sign with HMAC-SHA256 when ``secret`` is given and ``alg`` is HS256,
    leave the signature empty for ``alg: none``."""
    hdr = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    if alg.lower() == "none" or secret is None:
        return signing_input + "."
    if alg != "HS256":
        raise ValueError("only HS256 and none are crafted here")
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)
