"""What an adapter implements: `Client`, one load-generator connection (it sends jobs
and reports answers to the generator, `loadgen.Gen`), and `Worker`, one echo-worker
connection (it answers jobs with `work`, or holds the answers until released).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ..loadgen import Gen


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Client(asyncio.Protocol):
    """One generator connection. Subclasses are the protocol adapters: `send` and parsing."""

    def __init__(self, gen: Gen, payload: bytes) -> None:
        self.gen = gen
        self.payload = payload
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = gen.loop.create_future()
        self.buf = bytearray()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        self.on_connect()

    def on_connect(self) -> None:
        self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closing:
            self.gen.fail(f"{type(self).__name__}: connection lost ({exc or 'closed by peer'})")

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def send(self, stamps: list[float]) -> None:
        raise NotImplementedError


def work(payload: Any) -> Any:
    """The job itself, identical for every system: echo."""
    return payload


class Worker(asyncio.Protocol):
    def __init__(self, capacity: int, hold: bool) -> None:
        loop = asyncio.get_running_loop()
        self.capacity = capacity
        self.hold = hold  # scale mode: keep answers until `release`
        self.held: list[bytes] = []
        self.jobs = 0
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        self.handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def answer(self, out: list[bytes]) -> None:
        if self.hold:
            self.held += out
        elif out:
            self.write(b"".join(out))

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        if held:
            self.write(b"".join(held))
        self.after_release()

    def after_release(self) -> None:
        pass

    def handshake(self) -> None:
        raise NotImplementedError
