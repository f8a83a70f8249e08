"""The identity model and the errors the identity package raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

TokenErrorReason = Literal[
    "malformed",
    "too_large",
    "algorithm",
    "header",
    "signature",
    "expired",
    "not_yet_valid",
    "claims",
    "audience",
    "issuer",
    "ttl",
    "key",
]

#: Every value ``TokenError.reason`` can take (the label set of ``pgguard_auth_failures_total``).
TOKEN_ERROR_REASONS: Final[tuple[TokenErrorReason, ...]] = (
    "malformed",
    "too_large",
    "algorithm",
    "header",
    "signature",
    "expired",
    "not_yet_valid",
    "claims",
    "audience",
    "issuer",
    "ttl",
    "key",
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: the verified claims of one token."""

    user: str
    email: str | None
    groups: tuple[str, ...]
    agent: str | None
    prompt_id: str | None
    jti: str | None
    issued_at: float
    expires_at: float
    # A read-only view of every claim; left out of hash() (mappings are not hashable).
    claims: Mapping[str, Any] = field(hash=False, repr=False)

    def seconds_left(self, now: float) -> float:
        """Seconds until the token expires (negative once it has)."""
        return self.expires_at - now


class TokenError(Exception):
    """A token was refused.

    ``reason`` is a short machine label (see ``TOKEN_ERROR_REASONS``), ``str(exc)`` a message that
    is safe to send to the client: it never contains the token, a key or the secret.
    ``sqlstate`` is the SQLSTATE to answer with (``28P01`` for a bad signature, else ``28000``).
    """

    reason: TokenErrorReason
    message: str

    def __init__(self, reason: TokenErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def sqlstate(self) -> str:
        return "28P01" if self.reason == "signature" else "28000"

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"TokenError(reason={self.reason!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.message))


class IdentityConfigError(ValueError):
    """The identity configuration cannot work (missing secret, unreadable key file, ...).

    Raised when a ``TokenValidator`` is built, so that pgguard refuses to start rather than
    refusing every client. Messages name settings and files, never secret values.
    """
