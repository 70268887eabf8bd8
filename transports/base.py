"""The transport-neutral pieces every scheme shares.

This module owns the interfaces the broker is written against -- `StreamHandler`
(what the broker implements), `Stream` (one accepted connection), `Listener`
(binds and accepts) and `Endpoint` (a parsed URL) -- plus the single
`asyncio.BufferedProtocol` subclass that tcp and unix listeners both use.
Nothing here knows about packets: bytes in, bytes out.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import socket
import ssl as _ssl
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, cast

__all__ = [
    "BACKLOG",
    "READ_BUFFER_BYTES",
    "Endpoint",
    "Listener",
    "OnStream",
    "Stream",
    "StreamHandler",
    "StreamProtocol",
]

# Thousands of clients may (re)connect at once after a broker restart; a short
# accept queue would make the kernel drop SYNs and stall them for a retransmit
# timeout. The kernel clamps this to net.core.somaxconn anyway.
BACKLOG = 4096

# One read's most, into a buffer a listener's streams share (each read is
# copied out at once). 64 KiB is what libuv asks for; a read more than twice
# that would be copied into a bytes object malloc maps afresh for each read.
READ_BUFFER_BYTES = 64 * 1024


class StreamHandler(Protocol):
    """What the broker attaches to a `Stream` to receive its events.

    Both methods run inside the event loop's I/O callbacks: they must not block
    and cannot await. An exception raised here is a bug; asyncio reports it and
    drops the connection.

    A handler may also choose where the next read goes, with two more methods
    (found by name, as asyncio's BufferedProtocol has them):
    ``get_buffer() -> memoryview | None`` -- a writable view the next bytes go
    into, or None for the stream's own buffer and ``data_received`` -- and
    ``buffer_updated(nbytes)``, called when ``nbytes`` of them were put in that
    view (never after None). So a handler that knows a long message is coming
    can have it read into one buffer of its size, with no copy in between.
    """

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: BaseException | None) -> None: ...


class Stream:
    """One accepted connection: a thin, non-blocking face on an asyncio transport.

    Attributes, all set once when the connection is accepted:

    - ``peer``: printable peer address (``127.0.0.1:5432``, ``[::1]:5432``,
      ``unix:/run/rb.sock``).
    - ``write(data)`` / ``writelines(chunks)``: queue bytes; never block, never
      await. ``writelines`` hands the list to the transport so it can go out in
      one syscall.
    - ``write_buffer_size()``: bytes queued but not yet accepted by the kernel;
      the broker watches it to cut off peers that do not read.
    - ``pause_reading()`` / ``resume_reading()``: stop / restart delivery to the
      handler (backpressure on the read side).
    - ``close()``: flush what is queued, then close. ``abort()``: close now and
      drop what is queued. ``is_closing()``: either has been called (or the
      peer has gone).

    Once the connection is lost (just before the handler's ``connection_lost``)
    every method becomes a harmless no-op: ``write`` drops the bytes. The broker
    may still hold a reference and route a late reply to it; that must not
    raise (uvloop raises RuntimeError, and asyncio 3.11 AttributeError after a
    flushed close(), if the dead transport itself is used).
    """

    # The I/O methods are the transport's own bound methods rather than
    # wrappers: they run for every frame the broker sends, and a delegating
    # Python frame per call is pure overhead on the hot path.
    __slots__ = (
        "_protocol",
        "_transport",
        "abort",
        "close",
        "is_closing",
        "pause_reading",
        "peer",
        "resume_reading",
        "write",
        "write_buffer_size",
        "writelines",
    )

    peer: str
    # bytes, or any bytes-like object (a memoryview of a payload).
    write: Callable[[bytes | memoryview], None]
    writelines: Callable[[Sequence[bytes | memoryview]], None]
    write_buffer_size: Callable[[], int]
    pause_reading: Callable[[], None]
    resume_reading: Callable[[], None]
    close: Callable[[], None]
    abort: Callable[[], None]
    is_closing: Callable[[], bool]

    def __init__(self, transport: asyncio.Transport, protocol: StreamProtocol, peer: str) -> None:
        self._transport = transport
        self._protocol = protocol
        self.peer = peer
        self.write = transport.write
        self.writelines = transport.writelines
        self.write_buffer_size = transport.get_write_buffer_size
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.close = transport.close
        self.abort = transport.abort
        self.is_closing = transport.is_closing

    def _detach(self) -> None:
        # Swap the transport's methods for inert ones instead of checking a
        # flag on every write: the hot path stays a direct call.
        self.write = _drop
        self.writelines = _drop
        self.write_buffer_size = _zero
        self.pause_reading = _nothing
        self.resume_reading = _nothing
        self.close = _nothing
        self.abort = _nothing
        self.is_closing = _true

    def set_handler(self, handler: StreamHandler) -> None:
        """Route this stream's incoming bytes and its end to `handler`.

        Must be called synchronously inside the listener's ``on_stream``
        callback (data can arrive on the next loop iteration). May be called
        again later to hand the stream to another handler.
        """
        self._protocol.set_handler(handler)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (``"socket"``, ``"peername"``, ``"ssl_object"``...)."""
        return self._transport.get_extra_info(name, default)

    def __repr__(self) -> str:
        return f"<Stream peer={self.peer}>"


def _drop(_data: object) -> None:
    return None


def _nothing() -> None:
    return None


def _zero() -> int:
    return 0


def _true() -> bool:
    return True


OnStream = Callable[[Stream], None]
"""Called once per accepted connection, inside the loop's accept callback."""


def read_buffer() -> memoryview:
    """A buffer for reads (READ_BUFFER_BYTES), to share among one listener's
    streams: each read is copied out of it before the next one can start."""
    return memoryview(bytearray(READ_BUFFER_BYTES))


def _no_buffer() -> memoryview | None:
    return None


class StreamProtocol(asyncio.BufferedProtocol):
    """The one asyncio protocol behind every listener: forwards events to a handler.

    ``peer_of`` formats the transport's peer address for `Stream.peer`;
    ``tune``, if given, sets per-connection socket options before the stream is
    handed out. Reads go into ``buffer`` (a listener shares one among its
    streams; `read_buffer`), or into the handler's own (see `StreamHandler`).
    """

    __slots__ = (
        "_buffer",
        "_handler",
        "_handler_buffer",
        "_handler_updated",
        "_into_handler",
        "_on_data",
        "_on_stream",
        "_peer_of",
        "_stream",
        "_tune",
    )

    def __init__(
        self,
        on_stream: OnStream,
        peer_of: Callable[[asyncio.Transport], str],
        tune: Callable[[asyncio.Transport], None] | None = None,
        buffer: memoryview | None = None,
    ) -> None:
        self._on_stream = on_stream
        self._peer_of = peer_of
        self._tune = tune
        self._buffer = buffer if buffer is not None else read_buffer()
        self._handler: StreamHandler | None = None
        self._stream: Stream | None = None
        # The handler's bound methods, looked up once here instead of once per read.
        self._on_data: Callable[[bytes], None] = self._data_without_handler
        self._handler_buffer: Callable[[], memoryview | None] = _no_buffer
        self._handler_updated: Callable[[int], None] = self._data_without_handler
        # Whether the last get_buffer() gave the handler's buffer.
        self._into_handler = False

    def set_handler(self, handler: StreamHandler) -> None:
        self._handler = handler
        self._on_data = handler.data_received
        get_buffer = getattr(handler, "get_buffer", None)
        if get_buffer is None:
            self._handler_buffer = _no_buffer
        else:
            self._handler_buffer = get_buffer
            self._handler_updated = handler.buffer_updated  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Listeners only ever create stream transports; the cast avoids an
        # isinstance check (uvloop's transports are not registered subclasses).
        stream_transport = cast(asyncio.Transport, transport)
        if self._tune is not None:
            self._tune(stream_transport)
        stream = self._stream = Stream(stream_transport, self, self._peer_of(stream_transport))
        try:
            self._on_stream(stream)
        except BaseException:
            stream_transport.abort()
            raise
        # on_stream may refuse a connection by closing it without a handler;
        # anything else that leaves the stream without a handler is a bug in
        # the caller, caught here rather than at the first byte.
        if self._handler is None and not stream_transport.is_closing():
            stream_transport.abort()
            raise RuntimeError(
                f"on_stream returned without calling set_handler() for peer {stream.peer}"
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._handler_buffer()
        if view is None:
            self._into_handler = False
            return self._buffer
        self._into_handler = True
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_handler:
            self._handler_updated(nbytes)
        else:
            # Copied out at once: the buffer is shared, and the handler may keep the bytes.
            self._on_data(self._buffer[:nbytes].tobytes())

    def connection_lost(self, exc: BaseException | None) -> None:
        handler, stream = self._handler, self._stream
        # Break the protocol -> handler -> stream -> protocol cycle promptly.
        self._handler = self._stream = None
        self._on_data = self._data_without_handler
        self._handler_buffer = _no_buffer
        self._handler_updated = self._data_without_handler
        if stream is not None:
            stream._detach()
        if handler is not None:
            handler.connection_lost(exc)

    def _data_without_handler(self, data: bytes | int) -> None:
        size = data if isinstance(data, int) else len(data)
        raise RuntimeError(f"{size} bytes arrived on a stream with no handler set")


class Listener(abc.ABC):
    """Binds one address and hands every accepted connection to ``on_stream``."""

    url: str
    """The URL this listener was made from, as given."""

    @abc.abstractmethod
    async def start(self, on_stream: OnStream) -> None:
        """Bind and start accepting; raises `OSError` naming the URL if binding fails."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The bound address as a URL `connect()` accepts (port 0 resolved).

        Raises `RuntimeError` before `start()`.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting. Streams already accepted stay open. Idempotent."""


class Endpoint(abc.ABC):
    """A parsed transport URL: knows how to listen on it and connect to it.

    One subclass per scheme; the registry in `transports` maps each scheme to
    its subclass's ``parse``.
    """

    scheme: ClassVar[str]
    url: str

    @abc.abstractmethod
    def listener(
        self, *, ssl: _ssl.SSLContext | None = None, unix_mode: int | None = None
    ) -> Listener: ...

    @abc.abstractmethod
    async def connect(
        self, *, ssl: _ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


def plaintext_only(url: str, ssl: _ssl.SSLContext | None) -> None:
    """Refuse an SSL context on a plaintext scheme rather than silently using it.

    A tcp:// or unix:// URL must mean plaintext on the wire: if a caller passes
    a context, it meant tls://, and serving TLS under a tcp:// address would
    make ``Listener.address`` lie to clients.
    """
    if ssl is not None:
        raise ValueError(f"{url!r} is a plaintext transport; TLS needs a tls:// URL")


def with_context(exc: OSError, what: str) -> OSError:
    """A copy of `exc` whose message says what we were doing (and on which URL).

    ``OSError(errno, msg)`` maps the errno back to the same subclass
    (ConnectionRefusedError, PermissionError...), so callers can still catch
    those precisely.
    """
    cause = exc.strerror or exc
    if (
        exc.errno is not None
        and exc.errno in errno.errorcode
        and not isinstance(exc, socket.gaierror | _ssl.SSLError)
    ):
        # The system's words for the errno: asyncio's own strerror
        # ("Connect call failed ('127.0.0.1', 1)") repeats what we were doing.
        cause = os.strerror(exc.errno)
    message = f"{what}: {cause}"
    if exc.errno is None:
        return OSError(message)
    if isinstance(exc, socket.gaierror):
        return socket.gaierror(exc.errno, message)
    return OSError(exc.errno, message)
