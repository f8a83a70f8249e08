"""Client side of upstream password authentication: MD5 and SCRAM-SHA-256 (RFC 5802/7677).

Sans-IO: each step takes the server's bytes and returns the bytes to send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import unicodedata

from pgguard.protocol.messages import ProtocolError


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def _saslprep(password: str) -> str:
    # PostgreSQL falls back to the raw bytes when SASLprep fails; NFKC covers the common case.
    try:
        return unicodedata.normalize("NFKC", password)
    except (TypeError, ValueError):
        return password


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class AuthFailed(Exception):
    """The upstream server's authentication exchange is not acceptable."""


class ScramClient:
    """One SCRAM-SHA-256 exchange, without channel binding."""

    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, password: str, nonce: str | None = None, username: str = "") -> None:
        # PostgreSQL ignores the SCRAM user name (the startup packet has it); RFC vectors use one.
        self._password = _saslprep(password).encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = f"n={username},r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode()
            parts = dict(item.split("=", 1) for item in text.split(","))
            nonce = parts["r"]
            salt = base64.b64decode(parts["s"], validate=True)
            iterations = int(parts["i"])
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise AuthFailed("malformed SCRAM server-first message") from exc
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthFailed("SCRAM server nonce does not extend the client nonce")
        if not 1 <= iterations <= 10_000_000:
            raise AuthFailed("SCRAM iteration count out of range")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        final_without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join((self._client_first_bare, text, final_without_proof)).encode()
        client_signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        server_key = _hmac(salted, b"Server Key")
        self._server_signature = _hmac(server_key, auth_message)
        return f"{final_without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        try:
            text = server_final.decode()
        except UnicodeDecodeError as exc:
            raise AuthFailed("malformed SCRAM server-final message") from exc
        if text.startswith("e="):
            raise AuthFailed(f"SCRAM error from server: {text[2:]}")
        if not text.startswith("v="):
            raise AuthFailed("malformed SCRAM server-final message")
        try:
            signature = base64.b64decode(text[2:].split(",")[0], validate=True)
        except ValueError as exc:
            raise AuthFailed("malformed SCRAM server signature") from exc
        if not self._server_signature or not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("SCRAM server signature mismatch: the upstream is not who it claims")


__all__ = ["AuthFailed", "ProtocolError", "ScramClient", "md5_password"]
