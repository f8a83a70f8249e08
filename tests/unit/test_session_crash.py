"""A bug in one session (at its start or while it runs) gives its client a PostgreSQL-style
error and a closed connection, never a silent socket; the gateway keeps serving."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from pgguard.config import Settings
from pgguard.proxy import server
from pgguard.proxy.server import Gateway, Side, fatal_bytes

INTERNAL_ERROR = fatal_bytes("XX000", "pgguard: internal error")


class Transport:
    """Just what Side uses of an asyncio transport."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Gateway:
    monkeypatch.setenv("PGGUARD_JWT_SECRET", "s" * 40)
    return Gateway(Settings())


def serve(gateway: Gateway) -> Transport:
    transport = Transport()
    side = Side("client")
    side.connection_made(transport)  # type: ignore[arg-type]
    asyncio.run(gateway._serve_client(side))
    return transport


def test_a_session_that_cannot_start_answers_with_an_internal_error(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug in setting up the session")

    monkeypatch.setattr(server, "Session", broken)
    transport = serve(gateway)
    assert transport.written == INTERNAL_ERROR
    assert transport.closed
    assert gateway.sessions == set()


def test_a_session_that_crashes_answers_with_an_internal_error(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crashing:
        def __init__(self, *_args: Any) -> None:
            self.info = types.SimpleNamespace(session_id="s1")
            self.upstream = None

        async def run(self) -> None:
            raise RuntimeError("a bug while relaying")

    monkeypatch.setattr(server, "Session", Crashing)
    transport = serve(gateway)
    assert transport.written == INTERNAL_ERROR
    assert transport.closed
    assert gateway.sessions == set()
