"""Large frames through a real broker on tcp://, unix:// and tls://: the in-place read path.

The broker reads a frame of 32 KiB or more into a buffer of its own size
(PacketDecoder's direct_from, through the transport's get_buffer). These check,
over loopback sockets, that such frames arrive whole and exact however they are
cut into reads, mixed with small ones, in both codecs, and that a declared length
over max_frame_bytes still closes only that connection, with its log line.
tests/test_framing_direct.py checks the decoder itself at every byte boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog

import transports
from reasonbroker.core.framing import HEADER_BYTES
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Codec,
    Hello,
    Packet,
    Ping,
    Pong,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    encode,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from tests.rawpeer import WAIT_S, RawPeer
from tests.test_tls import _certificate, _write

BIG = 100_000  # well over the broker's 32 KiB threshold, in several 64 KiB reads
LIMIT = 512 * 1024


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("big frames CA", ca_key, None)
    ca, _ = _write(directory, "ca", ca_key, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    cert, keyfile = _write(
        directory, "server", key, _certificate("127.0.0.1", key, (ca_key, ca_cert), server=True)
    )
    return ca, cert, keyfile


class Net:
    """A broker on one transport and a way to open raw peers to it."""

    def __init__(self, broker: Broker, client_ssl: ssl.SSLContext | None) -> None:
        self.broker = broker
        self._ssl = client_ssl

    async def peer(self, role: str, codec: Codec = Codec.MSGPACK) -> RawPeer:
        url = self.broker.address(role)
        if self._ssl is None:
            return await RawPeer.connect(url, codec)
        reader, writer = await transports.connect(url, ssl=self._ssl)
        return RawPeer(reader, writer, codec)

    async def worker(self, capacity: int = 4, codec: Codec = Codec.MSGPACK) -> RawPeer:
        w = await self.peer("worker", codec)
        w.send(Hello(role=Role.WORKER, name="w"))
        await w.recv_type(Hello)
        w.send(Register(capacity), Ping())
        await w.recv_type(Pong)
        return w

    async def client(self, codec: Codec = Codec.MSGPACK) -> RawPeer:
        c = await self.peer("client", codec)
        c.send(Hello(role=Role.CLIENT))
        await c.recv_type(Hello)
        return c


@contextlib.asynccontextmanager
async def serving(scheme: str, pki_files: tuple[str, str, str]) -> AsyncIterator[Net]:
    limits = Limits(max_frame_bytes=LIMIT, max_buffered_input_bytes=64 * LIMIT)
    with tempfile.TemporaryDirectory(prefix="rb") as tmp:
        client_ssl = None
        if scheme == "tls":
            ca, cert, key = pki_files
            listeners = tuple(
                ListenerConfig("tls://127.0.0.1:0", role, cert, key)
                for role in (ListenerRole.CLIENTS, ListenerRole.WORKERS)
            )
            client_ssl = transports.client_context(cafile=ca)
        elif scheme == "unix":
            listeners = tuple(
                ListenerConfig(f"unix://{Path(tmp) / name}.sock", role)
                for name, role in (("c", ListenerRole.CLIENTS), ("w", ListenerRole.WORKERS))
            )
        else:
            listeners = tuple(
                ListenerConfig("tcp://127.0.0.1:0", role)
                for role in (ListenerRole.CLIENTS, ListenerRole.WORKERS)
            )
        async with Broker(Config(listeners=listeners, limits=limits)) as b:
            yield Net(b, client_ssl)


Test = Callable[[Net], Coroutine[Any, Any, None]]


@pytest.fixture(params=["tcp", "unix", "tls"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def on_net(
    request: pytest.FixtureRequest, scheme: str, pki_files: tuple[str, str, str]
) -> Callable[[Test], None]:
    """Run a test against a broker on `scheme`, on asyncio's loop and on uvloop's
    (the daemon's): their BufferedProtocol support, plain and under TLS, is not
    the same code."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop

    async def main(test: Test) -> None:
        async with serving(scheme, pki_files) as net:
            await test(net)

    def run(test: Test) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main(test))

    return run


async def until(cond: Callable[[], bool]) -> None:
    """Wait for broker state no packet announces (bounded by WAIT_S)."""
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.001)


def _holds(broker: Broker, held: int) -> bool:
    return broker.buffered_input == held


def payload(n: int, size: int = BIG) -> str:
    """A string payload (both codecs carry one) that differs at every position."""
    return "".join(chr(0x41 + (n + i) % 26) for i in range(size))


async def send_in_pieces(peer: RawPeer, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        peer.send_bytes(data[i : i + piece])
        await peer.writer.drain()


async def job(
    c: RawPeer, w: RawPeer, variables: str, result: str, piece: int | None = None
) -> None:
    """One job whose RUN the client writes in `piece`-byte writes (None: one write),
    and whose RESULT the worker writes the same way."""
    cookie = new_cookie()
    run = encode(Run(cookie, "echo", variables), c.codec)
    await (send_in_pieces(c, run, piece) if piece else _send(c, run))
    got = await w.recv_type(Run)
    assert got.variables == variables
    answer = encode(Result(got.cookie, ResultCode.OK, result=result), w.codec)
    await (send_in_pieces(w, answer, piece) if piece else _send(w, answer))
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, result)


async def _send(peer: RawPeer, data: bytes) -> None:
    peer.send_bytes(data)
    await peer.writer.drain()


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("piece", [None, 997, 16 * 1024], ids=["whole", "997B", "16KiB"])
def test_big_frames_in_many_reads_arrive_whole(
    on_net: Callable[[Test], None], codec: Codec, piece: int | None
) -> None:
    on_net(functools.partial(_many_reads, codec=codec, piece=piece))


async def _many_reads(net: Net, codec: Codec, piece: int | None) -> None:
    c, w = await net.client(codec), await net.worker(codec=codec)
    # Big ones in a row (the later ones read into a buffer guessed from the first),
    # then a small one (a wrong guess), then big ones of other lengths.
    for n, size in enumerate([BIG, BIG, BIG, 10, BIG + 1, 40_000, 3 * BIG]):
        await job(c, w, payload(n, size), payload(n + 1, size), piece)
    assert net.broker.protocol_errors == 0
    assert net.broker.buffered_input == 0


def test_a_big_frame_split_at_boundaries_across_reads(on_net: Callable[[Test], None]) -> None:
    on_net(_split_reads)


async def _split_reads(net: Net) -> None:
    # Each split is a read boundary for sure: the rest is sent only once the
    # broker holds the first part. Every point in the header and the frame's
    # head, the last bytes, and some in between.
    c, w = await net.client(), await net.worker()
    run = Run(new_cookie(), "echo", payload(0, 40_000))
    data = encode(run)
    points = [*range(1, 80), *range(len(data) - 40, len(data)), *range(80, len(data), 4099)]
    for k in points:
        c.send_bytes(data[:k])
        # From the header on, the whole frame's length is reserved.
        held = len(data) if k >= HEADER_BYTES else k
        await until(functools.partial(_holds, net.broker, held))
        c.send_bytes(data[k:])
        got = await w.recv_type(Run)
        assert got.variables == run.variables, k
        w.send(Result(got.cookie, ResultCode.OK, result="ok"))
        assert (await c.recv_type(Result)).result == "ok"
    assert net.broker.buffered_input == 0


def test_big_and_small_frames_mixed_in_one_write(on_net: Callable[[Test], None]) -> None:
    on_net(_mixed_frames)


async def _mixed_frames(net: Net) -> None:
    c, w = await net.client(), await net.worker(capacity=8)
    sizes = [BIG, 5, BIG, BIG, 70_000, 1, 40_000]
    runs = [Run(new_cookie(), "echo", payload(n, size)) for n, size in enumerate(sizes)]
    packets: list[Packet] = [Ping()]
    for run in runs:
        packets += [run, Ping()]
    c.send(*packets)  # one write: reads hold several frames, cut anywhere
    got = [await w.recv_type(Run) for _ in runs]
    assert [r.variables for r in got] == [r.variables for r in runs]
    assert [await c.recv_type(Pong) for _ in range(len(runs) + 1)]
    # The results come back the same way, in one write of frames big and small.
    w.send(*[Result(r.cookie, ResultCode.OK, result=r.variables) for r in reversed(got)])
    results = {}
    for _ in runs:
        res = await c.recv_type(Result)
        results[res.cookie] = res.result
    assert results == {r.cookie: r.variables for r in runs}


@pytest.mark.parametrize("after_big", [False, True], ids=["first", "after-big-frames"])
def test_a_declared_length_over_max_closes_only_that_connection(
    on_net: Callable[[Test], None], after_big: bool
) -> None:
    on_net(functools.partial(_over_max, after_big=after_big))


async def _over_max(net: Net, after_big: bool) -> None:
    c, w = await net.client(), await net.worker()
    bad = await net.client()
    if after_big:
        # Its next frame is then read into a buffer guessed from these.
        for n in range(2):
            await job(bad, w, payload(n), "ok")
    with structlog.testing.capture_logs() as logs:
        bad.send_bytes((LIMIT + 1).to_bytes(HEADER_BYTES, "big") + b"\x84" * 1000)
        assert await bad.closed_by_peer()
    assert [e["why"] for e in logs if e["event"] == "protocol_error"] == [
        f"frame length {LIMIT + 1} exceeds max_frame_bytes {LIMIT}"
    ]
    assert net.broker.protocol_errors == 1
    assert net.broker.buffered_input == 0
    await job(c, w, payload(7), payload(8), 4096)  # everyone else is still served
