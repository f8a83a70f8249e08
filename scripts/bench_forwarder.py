#!/usr/bin/env python3
"""The smallest TCP forwarder in Python: the "floor" target of scripts/bench.py.

Every accepted connection gets its own upstream connection; bytes from one side are written
to the other as they arrive, with no framing and no parsing. Client bytes that arrive
before the upstream is connected are buffered and written once it is. When either side
closes (or the upstream cannot be reached), both are closed. TCP_NODELAY is set on both
sockets. There is no back-pressure and no authentication: a PostgreSQL client going
through it authenticates with PostgreSQL itself.

It runs on uvloop with asyncio Protocols, as pgguard's relay does, so its CPU time per
transaction is what Python and uvloop cost for a pass-through before any protocol work.

Usage::

    python scripts/bench_forwarder.py --listen-port 6000 --upstream-host 127.0.0.1 \\
        --upstream-port 5432
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import cast

import uvloop


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    """The upstream side of one forwarded connection."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    """The client side: connects upstream on accept, then forwards both ways."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False
        self.connecting: asyncio.Task[None] | None = None  # a reference keeps the task alive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        self.connecting = asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        except OSError:
            self.close()
            return
        if self.closed:  # the client left while we were connecting
            upstream.close()
            return
        if self.pending:
            upstream.write(b"".join(self.pending))
            self.pending.clear()
        self.upstream = upstream

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Bytes from upstream, to the client."""
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # flushes what is already written, then closes
        if self.upstream is not None:
            self.upstream.close()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(args.upstream_host, args.upstream_port),
        args.listen_host,
        args.listen_port,
        backlog=1024,
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Minimal TCP forwarder (uvloop, Protocols).")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
