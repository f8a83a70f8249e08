"""Identity: JWT validation, key sources and the identity model (SPEC §2).

Pure logic; the only I/O is reading key files and fetching a JWKS / OIDC discovery URL.
"""

from .keys import KNOWN_ALGORITHMS
from .mint import mint_token
from .model import TOKEN_ERROR_REASONS, Identity, IdentityConfigError, TokenError, TokenErrorReason
from .validator import TokenValidator, claim_at_path

__all__ = [
    "KNOWN_ALGORITHMS",
    "TOKEN_ERROR_REASONS",
    "Identity",
    "IdentityConfigError",
    "TokenError",
    "TokenErrorReason",
    "TokenValidator",
    "claim_at_path",
    "mint_token",
]
