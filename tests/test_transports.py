"""Tests for transports/: URL parsing, and tcp/unix listeners over real loopback sockets.

Every socket scenario runs twice: on asyncio's default loop (through
pytest-asyncio) and on uvloop, which the broker runs in production and whose
transports differ in the details (server close, socket objects, unix sockets).
Synchronisation is always an awaited event or future set by a handler, never a
sleep; each wait is bounded so a hang fails with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from transports import (
    SCHEMES,
    Listener,
    Stream,
    TcpEndpoint,
    UnixEndpoint,
    connect,
    listener_for,
    parse_url,
)

WAIT_S = 10.0
# Far more than loopback kernel buffers hold (a few MiB at most), so a peer
# that does not read leaves most of it queued in the transport.
BIG = 32 * 1024 * 1024


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = _ipv6_loopback_works()


# --- helpers -----------------------------------------------------------------


class Recorder:
    """A StreamHandler that keeps what it receives (echoing it if asked) and
    lets a test await both more bytes and the connection's end."""

    def __init__(self, stream: Stream, *, echo: bool = False) -> None:
        self.stream = stream
        self.echo = echo
        self.received = bytearray()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._grew = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.stream.write(data)
        self._grew.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)

    async def wait_for_bytes(self, count: int) -> bytes:
        async with asyncio.timeout(WAIT_S):
            while len(self.received) < count:
                self._grew.clear()
                await self._grew.wait()
        return bytes(self.received)

    async def wait_lost(self) -> BaseException | None:
        async with asyncio.timeout(WAIT_S):
            return await self.lost


class Server:
    """Accepts streams into Recorders and queues them for the test to take."""

    def __init__(self, listener: Listener, *, echo: bool) -> None:
        self.listener = listener
        self.echo = echo
        self.recorders: list[Recorder] = []
        self._accepted: asyncio.Queue[Recorder] = asyncio.Queue()

    def on_stream(self, stream: Stream) -> None:
        recorder = Recorder(stream, echo=self.echo)
        stream.set_handler(recorder)
        self.recorders.append(recorder)
        self._accepted.put_nowait(recorder)

    async def next_stream(self) -> Recorder:
        async with asyncio.timeout(WAIT_S):
            return await self._accepted.get()


@contextlib.asynccontextmanager
async def serving(
    url: str, *, echo: bool = False, unix_mode: int | None = None
) -> AsyncIterator[Server]:
    listener = listener_for(url, unix_mode=unix_mode)
    server = Server(listener, echo=echo)
    await listener.start(server.on_stream)
    try:
        yield server
    finally:
        await listener.close()
        for recorder in server.recorders:
            recorder.stream.abort()


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await connect(url)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sends until it closes (a reset ends it too)."""
    chunks: list[bytes] = []
    async with asyncio.timeout(WAIT_S):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(1 << 20):
                chunks.append(chunk)
    return b"".join(chunks)


def unix_path(url: str) -> str:
    endpoint = parse_url(url)
    assert isinstance(endpoint, UnixEndpoint)
    return endpoint.path


@contextlib.contextmanager
def bind_url(kind: str) -> Iterator[str]:
    """A URL to listen on: loopback port 0, or a socket in a short fresh temp dir
    (AF_UNIX paths are limited to ~107 bytes, so not pytest's deep tmp_path)."""
    if kind == "tcp":
        yield "tcp://127.0.0.1:0"
    elif kind == "tcp6":
        yield "tcp://[::1]:0"
    else:
        with tempfile.TemporaryDirectory(prefix="rb", dir="/tmp") as directory:
            yield f"unix://{directory}/b.sock"


def make_stale_socket_file(path: str) -> None:
    """Leave a socket file nobody listens on, as a killed broker would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
        dead.listen()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def write_file(path: str, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)


def file_exists(path: str) -> bool:
    return os.path.lexists(path)


def read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


Scenario = Callable[[str], Coroutine[Any, Any, None]]
CASES: list[Any] = []


def scenario(*kinds: str) -> Callable[[Scenario], Scenario]:
    """Register a socket scenario to run on each listed transport and each loop."""

    def register(function: Scenario) -> Scenario:
        for kind in kinds:
            marks = []
            if kind == "tcp6":
                marks.append(pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback"))
            CASES.append(
                pytest.param(function, kind, id=f"{function.__name__}-{kind}", marks=marks)
            )
        return function

    return register


# --- URL parsing (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:0", TcpEndpoint("tcp://127.0.0.1:0", "127.0.0.1", 0)),
        ("tcp://localhost:7000", TcpEndpoint("tcp://localhost:7000", "localhost", 7000)),
        ("tcp://[::1]:65535", TcpEndpoint("tcp://[::1]:65535", "::1", 65535)),
        ("TCP://0.0.0.0:1", TcpEndpoint("TCP://0.0.0.0:1", "0.0.0.0", 1)),
        ("unix:///tmp/rb.sock", UnixEndpoint("unix:///tmp/rb.sock", "/tmp/rb.sock")),
        ("unix:///tmp/a b?c#d", UnixEndpoint("unix:///tmp/a b?c#d", "/tmp/a b?c#d")),
    ],
)
def test_parse_url_accepts(url: str, expected: object) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:7000",
        "http://127.0.0.1:80",
        "://127.0.0.1:80",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://:7000",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:-1",
        "tcp://127.0.0.1:80/path",
        "tcp://user@host:80",
        "tcp://::1:7000",
        "tcp://[::1:7000",
        "tcp://[::1]7000",
        "tcp://[not-v6]:7000",
        "unix:relative/path",
        "unix://relative/path",
        "unix://",
    ],
)
def test_bad_urls_raise_value_error_naming_the_url(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        parse_url(url)
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        listener_for(url)


async def test_connect_with_bad_url_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'udp'"):
        await connect("udp://127.0.0.1:9")


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "unix:///tmp/rb.sock"])
async def test_plaintext_schemes_refuse_an_ssl_context(url: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ValueError, match="tls://"):
        listener_for(url, ssl=context)
    with pytest.raises(ValueError, match="tls://"):
        await connect(url, ssl=context)


def test_registry_is_one_dict_of_schemes() -> None:
    assert set(SCHEMES) == {"tcp", "unix", "tls"}


def test_address_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = listener_for("tcp://127.0.0.1:0").address


# --- socket scenarios, every transport ------------------------------------------


@scenario("tcp", "tcp6", "unix")
async def address_is_connectable_and_resolved(url: str) -> None:
    async with serving(url, echo=True) as server:
        address = server.listener.address
        requested, bound = parse_url(url), parse_url(address)
        if isinstance(requested, TcpEndpoint):
            assert isinstance(bound, TcpEndpoint)
            assert bound.host == requested.host
            assert bound.port != 0
            assert re.fullmatch(r"tcp://(127\.0\.0\.1|\[::1\]):[0-9]+", address)
        else:
            assert address == url
        async with client(address) as (reader, writer):
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"


@scenario("tcp", "tcp6", "unix")
async def echo_round_trip(url: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: many reads on both sides
    async with serving(url, echo=True) as server, client(server.listener.address) as (r, w):
        w.write(payload)
        async with asyncio.timeout(WAIT_S):
            assert await r.readexactly(len(payload)) == payload
        recorder = await server.next_stream()
        assert bytes(recorder.received) == payload


@scenario("tcp", "tcp6", "unix")
async def peer_string_format(url: str) -> None:
    async with serving(url) as server, client(server.listener.address) as (_, writer):
        recorder = await server.next_stream()
        if url.startswith("unix:"):
            assert recorder.stream.peer == f"unix:{unix_path(url)}"
        else:
            host, port = writer.get_extra_info("sockname")[:2]
            expected = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            assert recorder.stream.peer == expected
            assert re.fullmatch(r"(127\.0\.0\.1|\[::1\]):[0-9]+", recorder.stream.peer)


@scenario("tcp", "unix")
async def writelines_keeps_order(url: str) -> None:
    chunks = [bytes([i]) * (i * 37 % 1000) for i in range(256)]
    async with serving(url) as server, client(server.listener.address) as (reader, _):
        stream = (await server.next_stream()).stream
        stream.write(b"<")
        stream.writelines(chunks)
        stream.writelines([])
        stream.write(b">")
        stream.close()
        assert await read_to_eof(reader) == b"<" + b"".join(chunks) + b">"


@scenario("tcp", "tcp6", "unix")
async def connection_lost_when_peer_closes(url: str) -> None:
    async with serving(url) as server:
        async with client(server.listener.address) as (_, writer):
            recorder = await server.next_stream()
            writer.write(b"bye")
        # client() has closed the connection: a clean close reports no error.
        assert await recorder.wait_lost() is None
        assert recorder.stream.is_closing()
        assert bytes(recorder.received) == b"bye"


def use_every_method(stream: Stream) -> None:
    """Call everything a broker might call on a stream whose connection is gone."""
    stream.write(b"late reply")
    stream.writelines([b"late", b"reply"])
    stream.pause_reading()
    stream.resume_reading()
    stream.close()
    stream.abort()
    assert stream.write_buffer_size() == 0
    assert stream.is_closing()


@scenario("tcp", "unix")
async def stream_is_inert_after_peer_closes(url: str) -> None:
    async with serving(url) as server:
        async with client(server.listener.address):
            recorder = await server.next_stream()
        assert await recorder.wait_lost() is None
        # uvloop's transport raises RuntimeError if written after it closed.
        use_every_method(recorder.stream)


@scenario("tcp", "unix")
async def write_buffer_grows_when_peer_does_not_read(url: str) -> None:
    async with serving(url) as server, client(server.listener.address):
        stream = (await server.next_stream()).stream
        assert stream.write_buffer_size() == 0
        stream.write(b"x" * BIG)
        queued = stream.write_buffer_size()
        assert 0 < queued <= BIG
        stream.writelines([b"y" * 1000, b"z" * 24])
        assert stream.write_buffer_size() > queued


@scenario("tcp", "unix")
async def close_flushes_queued_bytes(url: str) -> None:
    payload = os.urandom(1024) * (BIG // 1024)
    async with serving(url) as server, client(server.listener.address) as (reader, _):
        recorder = await server.next_stream()
        recorder.stream.write(payload)
        assert recorder.stream.write_buffer_size() > 0  # so close() has something to flush
        recorder.stream.close()
        assert recorder.stream.is_closing()
        assert await read_to_eof(reader) == payload
        assert await recorder.wait_lost() is None
        # asyncio 3.11's transport raises AttributeError if used after a
        # flushed close(); the Stream must not.
        use_every_method(recorder.stream)


@scenario("tcp", "unix")
async def abort_drops_queued_bytes(url: str) -> None:
    async with serving(url) as server, client(server.listener.address) as (reader, _):
        recorder = await server.next_stream()
        recorder.stream.write(b"x" * BIG)
        queued = recorder.stream.write_buffer_size()
        assert queued > 0
        recorder.stream.abort()
        assert recorder.stream.is_closing()
        received = await read_to_eof(reader)
        assert len(received) <= BIG - queued
        await recorder.wait_lost()


@scenario("tcp", "tcp6", "unix")
async def listener_close_keeps_existing_streams(url: str) -> None:
    async with serving(url, echo=True) as server:
        address = server.listener.address
        async with client(address) as (reader, writer):
            await server.next_stream()
            await server.listener.close()
            await server.listener.close()  # idempotent
            with pytest.raises(OSError):
                async with client(address):
                    pass
            if url.startswith("unix:"):
                assert not file_exists(unix_path(url))
            writer.write(b"still here")
            async with asyncio.timeout(WAIT_S):
                assert await reader.readexactly(10) == b"still here"


@scenario("tcp", "unix")
async def pause_reading_holds_data_until_resume(url: str) -> None:
    async with serving(url, echo=True) as server, client(server.listener.address) as (_, w):
        paused = await server.next_stream()
        paused.stream.pause_reading()
        w.write(b"held")
        await w.drain()
        # A round trip on a second connection takes at least one full loop
        # iteration after "held" reached the kernel: had reading not been
        # paused, it would have been delivered by then.
        async with client(server.listener.address) as (r2, w2):
            w2.write(b"sync")
            async with asyncio.timeout(WAIT_S):
                assert await r2.readexactly(4) == b"sync"
        assert paused.received == b""
        paused.stream.resume_reading()
        assert await paused.wait_for_bytes(4) == b"held"


@scenario("tcp", "unix")
async def handler_not_set_is_reported_as_a_bug(url: str) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    streams: list[Stream] = []
    listener = listener_for(url)
    await listener.start(streams.append)  # never calls set_handler
    try:
        async with client(listener.address) as (reader, _):
            assert await read_to_eof(reader) == b""  # the stream was dropped
        assert len(streams) == 1
        assert streams[0].is_closing()
        errors = [context.get("exception") for context in reported]
        assert any(
            isinstance(error, RuntimeError) and "set_handler" in str(error) for error in errors
        ), reported
    finally:
        await listener.close()
        loop.set_exception_handler(None)


@scenario("tcp", "unix")
async def on_stream_may_refuse_by_closing(url: str) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def refuse(stream: Stream) -> None:
        stream.write(b"busy")
        stream.close()

    listener = listener_for(url)
    await listener.start(refuse)
    try:
        async with client(listener.address) as (reader, _):
            assert await read_to_eof(reader) == b"busy"
        assert reported == []
    finally:
        await listener.close()
        loop.set_exception_handler(None)


# --- tcp only --------------------------------------------------------------------


@scenario("tcp", "tcp6")
async def tcp_sockets_get_nodelay_and_keepalive(url: str) -> None:
    async with serving(url) as server, client(server.listener.address) as (_, writer):
        accepted = (await server.next_stream()).stream.get_extra_info("socket")
        for sock in (accepted, writer.get_extra_info("socket")):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


@scenario("tcp", "tcp6")
async def tcp_bind_failure_names_the_url(url: str) -> None:
    async with serving(url) as server:
        taken = server.listener.address
        second = listener_for(taken)
        with pytest.raises(OSError, match=re.escape(f"cannot listen on {taken}")) as caught:
            await second.start(server.on_stream)
        assert caught.value.errno == errno.EADDRINUSE


# --- unix only -------------------------------------------------------------------


@scenario("unix")
async def unix_stale_socket_is_replaced(url: str) -> None:
    path = unix_path(url)
    make_stale_socket_file(path)
    # Connecting to the stale file would be refused; an echo proves it was replaced.
    async with serving(url, echo=True) as server, client(url) as (reader, writer):
        writer.write(b"fresh")
        async with asyncio.timeout(WAIT_S):
            assert await reader.readexactly(5) == b"fresh"
        assert len(server.recorders) == 1


@scenario("unix")
async def unix_live_socket_raises_address_in_use(url: str) -> None:
    async with serving(url, echo=True):
        intruder = listener_for(url)
        with pytest.raises(OSError, match="address in use") as caught:
            await intruder.start(lambda stream: None)
        assert caught.value.errno == errno.EADDRINUSE
        assert url in str(caught.value)
        # The running listener kept its socket file and still serves.
        async with client(url) as (reader, writer):
            writer.write(b"ok")
            async with asyncio.timeout(WAIT_S):
                assert await reader.readexactly(2) == b"ok"


@scenario("unix")
async def unix_non_socket_file_raises(url: str) -> None:
    path = unix_path(url)
    write_file(path, b"precious")
    with pytest.raises(OSError, match="not a socket") as caught:
        await listener_for(url).start(lambda stream: None)
    assert url in str(caught.value)
    assert read_file(path) == b"precious"


@scenario("unix")
async def unix_mode_is_applied(url: str) -> None:
    for mode in (0o600, 0o660):
        async with serving(url, unix_mode=mode):
            assert stat.S_IMODE(os.stat(unix_path(url)).st_mode) == mode


@scenario("unix")
async def unix_close_unlinks_only_its_own_socket(url: str) -> None:
    path = unix_path(url)
    async with serving(url):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not file_exists(path)

    async with serving(url):
        # Someone replaced the file while we were listening: not ours to remove.
        os.unlink(path)
        write_file(path, b"someone else's")
    assert read_file(path) == b"someone else's"


@scenario("unix")
async def unix_connect_to_missing_path_names_the_url(url: str) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"cannot connect to {url}")):
        await connect(url)


# --- run every scenario on both loops ---------------------------------------------


@pytest.mark.parametrize(("run", "kind"), CASES)
async def test_on_asyncio(run: Scenario, kind: str) -> None:
    with bind_url(kind) as url:
        await run(url)


@pytest.mark.parametrize(("run", "kind"), CASES)
def test_on_uvloop(run: Scenario, kind: str) -> None:
    with bind_url(kind) as url, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(url))
