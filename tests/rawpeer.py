"""A protocol peer over a real socket that speaks raw packets, for loopback tests.

It reuses protocol.py for framing so tests exercise the broker, not a second
codec; `send_bytes` lets a test put anything at all on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import TypeVar

from reasonbroker.core.protocol import (
    Codec,
    Hello,
    Packet,
    PacketDecoder,
    Ping,
    Pong,
    Register,
    Role,
    encode,
)

# Loopback tests wait on real events; this bounds how long a broken broker can
# make one of them hang before it fails with a clear message.
WAIT_S = 10.0

P = TypeVar("P")


class RawPeer:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: Codec
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        self.decoder = PacketDecoder(64 * 1024 * 1024)
        self.inbox: list[Packet] = []

    @classmethod
    async def connect(
        cls, url: str, codec: Codec = Codec.MSGPACK, rcvbuf: int | None = None
    ) -> RawPeer:
        if url.startswith("unix://"):
            reader, writer = await asyncio.open_unix_connection(url.removeprefix("unix://"))
        else:
            host, _, port = url.removeprefix("tcp://").rpartition(":")
            host = host.strip("[]")
            if rcvbuf is None:
                reader, writer = await asyncio.open_connection(host, int(port))
            else:
                # A tiny receive buffer makes "a peer that stops reading" fill up fast.
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
                reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, codec)

    def send(self, *packets: Packet) -> None:
        self.writer.write(b"".join(encode(p, self.codec) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self) -> Packet:
        """The next packet; fails if the connection closes first."""
        async with asyncio.timeout(WAIT_S):
            while not self.inbox:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("closed by the broker while a packet was expected")
                self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def recv_type(self, kind: type[P]) -> P:
        packet = await self.recv()
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def closed_by_peer(self) -> bool:
        """True once the broker closes the connection (any packets before are kept)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    data = await self.reader.read(1 << 16)
                except ConnectionError:
                    return True
                if not data:
                    return True
                self.inbox.extend(self.decoder.feed(data))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def peers(*urls: str) -> AsyncIterator[list[RawPeer]]:
    opened = [await RawPeer.connect(u) for u in urls]
    try:
        yield opened
    finally:
        for p in opened:
            await p.close()


async def hello_worker(
    url: str, capacity: int = 1, pipelines: tuple[str, ...] | None = None
) -> RawPeer:
    """A worker that said HELLO; its PONG proves the broker processed its REGISTER."""
    w = await RawPeer.connect(url)
    w.send(Hello(role=Role.WORKER, name="w"))
    assert (await w.recv_type(Hello)).version
    w.send(Register(capacity, pipelines), Ping())
    await w.recv_type(Pong)
    return w


async def hello_client(url: str) -> RawPeer:
    c = await RawPeer.connect(url)
    c.send(Hello(role=Role.CLIENT, features=("started", "progress")))
    await c.recv_type(Hello)
    return c
