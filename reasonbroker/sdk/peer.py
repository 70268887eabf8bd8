"""Connection plumbing shared by the client and worker libraries.

A `Peer` is one connection to the broker after the HELLO exchange: it frames
and encodes outgoing packets (`protocol.encode`), decodes incoming ones
(`protocol.PacketDecoder`), answers the broker's PING with PONG, and keeps the
connection alive per the broker's `heartbeat_ms`. It knows nothing of jobs:
`client.py` and `worker.py` own what packets mean.

Frames sent in one event-loop turn leave in one write at the end of the turn
(`_flush`, scheduled by the turn's first frame), as the broker's outboxes do:
one syscall per packet was the SDK's largest cost per job (README,
Benchmarks, SDK).

Reads are decoded in the transport's own callback (`_Stream`, the connection's
asyncio protocol once connected): `serve(consume)` hands each read's packets
to `consume` there, with no reader task to wake and no StreamReader buffer to
copy the bytes through twice. `packets()` and `batches()` stay for callers
that want to iterate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

import structlog
import structlog.stdlib
from structlog.typing import EventDict

import transports

from ..core import protocol as p
from ..core.errors import RemoteProtocolError
from ..core.limits import Limits
from .errors import BrokerConnectionError, ConnectTimeout, error_for

DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
# The broker's own default frame limit: it never sends a bigger frame, so
# anything larger is a broken stream, not a payload.
DEFAULT_MAX_FRAME_BYTES: Final = Limits().max_frame_bytes
# PROTOCOL.md section 6: a peer silent for 3 heartbeats is gone.
HEARTBEAT_MISSES: Final = 3
# batches(): reading pauses while this many packets wait for the iterating
# caller, as a StreamReader pauses past its limit.
_HELD_PACKETS: Final = 4096
# What batches() answers or drops itself.
_LIVENESS: Final = (p.Ping, p.Pong)
# Reconnect backoff, shared by the worker and a resuming client.
RECONNECT_FIRST_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
# How long close() waits for buffered bytes to flush before dropping them.
_CLOSE_FLUSH_S: Final = 1.0
# Frames held for the end of the turn are written at once past this many
# bytes, so a sender that never yields still meets the transport's
# backpressure (send() waits while it is paused).
_FLUSH_BYTES: Final = 64 * 1024
# A frame this big is held as its encoder's pieces, not joined: joining would
# copy its payload once more (README, Benchmarks, SDK: the 64 KiB cell).
_PIECES_FROM: Final = 16 * 1024

# The libraries' loggers are children of "reasonbroker" in the stdlib logging
# tree. A NullHandler there keeps them silent (no "last resort" printing of
# warnings) until the application configures logging; the CLI does.
logging.getLogger("reasonbroker").addHandler(logging.NullHandler())


class _Event(dict[str, Any]):
    """A structlog event as a stdlib record's `msg`: a dict for
    `structlog.stdlib.ProcessorFormatter`, one readable line for any other
    formatter ("worker_connect_failed url='tcp://...' error='...'")."""

    def __str__(self) -> str:
        fields = " ".join(f"{k}={v!r}" for k, v in self.items() if k != "event")
        return f"{self.get('event', '')} {fields}".rstrip()


def _to_stdlib(
    logger: logging.Logger, name: str, event_dict: EventDict
) -> tuple[tuple[EventDict], dict[str, dict[str, Any]]]:
    # structlog's ProcessorFormatter.wrap_for_formatter, with a printable event.
    return (_Event(event_dict),), {"extra": {"_logger": logger, "_name": name}}


def library_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger for library code that logs through stdlib `logging.getLogger(name)`.

    Events below the stdlib logger's effective level are dropped before any
    processing. Nothing here touches structlog's global configuration, which
    belongs to the application.
    """
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _to_stdlib],
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    return logger


def reconnect_delay(
    attempt: int, first_s: float = RECONNECT_FIRST_S, cap_s: float = RECONNECT_MAX_S
) -> float:
    """Capped exponential backoff: first_s, 2*first_s, 4*first_s, ... at most cap_s."""
    return min(first_s * 2.0 ** min(attempt, 32), cap_s)


# What a read's packets are handed to (serve()); it runs in the transport's callback.
Consumer = Callable[[list[p.Packet]], None]


class _Stream(asyncio.Protocol):
    """The connection's asyncio protocol: each read decoded where it lands.

    Installed in place of the StreamReader's protocol before the HELLO is sent
    (the broker speaks only after it, so nothing was read yet). The packets of
    a read go to `consumer`, or wait in `held` (and wake `waiter`) while
    there is none: during the HELLO exchange, and between reads of batches().
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        decoder: p.PacketDecoder,
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.reading_paused = False
        self.decoder = decoder
        self.consumer: Consumer | None = None
        self.held: list[p.Packet] = []
        self.waiter: asyncio.Future[None] | None = None
        # Why reading ended (EOF, a read error, a broken stream), once it has.
        self.ended: str | None = None
        self.error: RemoteProtocolError | None = None
        self.last_rx = loop.time()
        self.paused = False  # the transport's write buffer is over its high-water mark
        self.drainers: list[asyncio.Future[None]] = []
        self.lost: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        if self.ended is not None:
            return
        try:
            batch = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self.error = exc
            self._end(f"broker broke the protocol: {exc}")
            return
        if not batch:
            return
        consumer = self.consumer
        if consumer is not None:
            consumer(batch)
            return
        self.held.extend(batch)
        self._wake()
        if len(self.held) >= _HELD_PACKETS and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        """The held packets were taken: read again if that was paused."""
        if self.reading_paused:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self._end("broker closed the connection")
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("broker closed the connection" if exc is None else f"read failed: {exc}")
        for drainer in self.drainers:
            if not drainer.done():
                drainer.set_exception(ConnectionResetError("connection lost"))
        self.drainers.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for drainer in self.drainers:
            if not drainer.done():
                drainer.set_result(None)
        self.drainers.clear()

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
            self._wake()
            consumer = self.consumer
            if consumer is not None:
                consumer([])  # the end, said with no packets

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until packets are held or reading has ended."""
        if self.held or self.ended is not None:
            return
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            if self.waiter is waiter:
                self.waiter = None


class Peer:
    """One HELLO'd connection to the broker. Create it with `Peer.connect`."""

    def __init__(
        self,
        url: str,
        writer: asyncio.StreamWriter,
        stream: _Stream,
        broker_hello: p.Hello,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.url = url
        self.broker_hello = broker_hello
        self.log = log
        self.close_reason: str | None = None
        # The loop this connection lives on (the worker makes its job tasks on it).
        self.loop = loop = asyncio.get_running_loop()
        self._writer = writer
        self._stream = stream
        self._transport = writer.transport
        # Frames written this turn (a big one as its pieces), written by _flush at its end.
        self._out: list[p.Chunk] = []
        self._out_bytes = 0
        self._flush_pending = False  # a _flush is scheduled
        self._last_tx = loop.time()
        self._consume: Consumer | None = None
        self._consume_error: BaseException | None = None
        self._done: asyncio.Future[None] | None = None  # serve()'s end
        self._heartbeat: asyncio.Task[None] | None = None
        if broker_hello.heartbeat_ms is not None and broker_hello.heartbeat_ms > 0:
            self._heartbeat = asyncio.create_task(
                self._keepalive(broker_hello.heartbeat_ms / 1000), name=f"heartbeat {url}"
            )

    @classmethod
    async def connect(
        cls,
        url: str,
        hello: p.Hello,
        *,
        log: structlog.stdlib.BoundLogger,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ssl: _ssl.SSLContext | None = None,
    ) -> Peer:
        """Connect, send `hello`, and wait for the broker's HELLO.

        Nothing else is sent before the broker's answer (PROTOCOL.md section 6).
        Raises ConnectTimeout, BrokerConnectionError, or Unauthorized when the
        broker answers with RESULT UNAUTHORIZED.
        """
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                try:
                    reader, writer = await transports.connect(url, ssl=ssl)
                except OSError as exc:  # transports names the URL in the message
                    # strerror alone: str() would prefix "[Errno 111]" to it.
                    raise BrokerConnectionError(exc.strerror or str(exc)) from exc
                # A socket's transport reads too (typeshed types it write-only).
                transport = cast(asyncio.Transport, writer.transport)
                stream = _Stream(
                    asyncio.get_running_loop(), transport, p.PacketDecoder(max_frame_bytes)
                )
                transport.set_protocol(stream)
                if reader.at_eof():  # closed before the swap: it would never say so again
                    stream.eof_received()
                writer.write(p.encode(hello))
                answer = await _await_hello(url, writer, stream)
        except TimeoutError:
            if writer is not None:
                writer.transport.abort()
            raise ConnectTimeout(
                f"no HELLO from the broker at {url} within {connect_timeout} s"
            ) from None
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            raise
        return cls(url, writer, stream, answer, log)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    async def send(self, packet: p.Packet) -> None:
        """Encode and write one packet, waiting while the broker reads slowly.

        EncodeError (a value msgpack cannot carry) is raised before anything is
        written, so the connection stays usable. BrokerConnectionError when the
        connection is gone.
        """
        self._put(packet)
        if self._transport.get_write_buffer_size():
            await self.drain()

    def send_nowait(self, packet: p.Packet) -> None:
        """Write one packet without waiting for the buffer to drain (best effort)."""
        self._put(packet)

    @property
    def must_drain(self) -> bool:
        """Whether the transport holds unsent bytes: then `drain()` may have to wait.
        An empty buffer cannot be paused, so a caller may skip the await."""
        return bool(self._transport.get_write_buffer_size())

    async def drain(self) -> None:
        """Wait while the transport is paused (the broker reads slowly)."""
        stream = self._stream
        try:
            if self._transport.is_closing() and stream.lost.done():
                raise ConnectionResetError("connection lost")
            if stream.paused:
                drainer = self.loop.create_future()
                stream.drainers.append(drainer)
                await drainer
        except OSError as exc:
            self.abort(f"write failed: {exc}")
            raise BrokerConnectionError(f"connection to {self.url} lost: {exc}") from exc

    def _put(self, packet: p.Packet) -> None:
        """Encode `packet` and hold its frame for this turn's one write (sooner
        past _FLUSH_BYTES). A big frame is held as its encoder's pieces, which
        the write hands to the kernel as they are (one writev, not a join)."""
        if self.close_reason is not None or self._transport.is_closing():
            raise BrokerConnectionError(
                f"connection to {self.url} is closed: {self.close_reason or 'closing'}"
            )
        parts: list[p.Chunk] = []
        size = p.encode_into(packet, p.Codec.MSGPACK, parts)  # EncodeError: nothing held
        if size >= _PIECES_FROM:
            self._out.extend(parts)
        else:
            self._out.append(parts[0] if len(parts) == 1 else b"".join(parts))
        self._out_bytes += size
        if self._out_bytes >= _FLUSH_BYTES:
            self._flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)
        self._last_tx = self.loop.time()

    def flush_soon(self) -> None:
        """Have this turn's write wait behind the callbacks scheduled so far.

        serve() calls it after handing on a read's packets: the tasks those
        woke (a job's handler, a `run()` whose answer came) run first, and
        what they send leaves in the same write, a loop turn sooner than a
        write scheduled by their own first frame.
        """
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what this turn sent as one buffer (a no-op when already written)."""
        self._flush_pending = False
        out = self._out
        if not out:
            return
        transport = self._transport
        if len(out) == 1:
            data = out[0]
        elif self._out_bytes >= _PIECES_FROM:
            # Big frames' pieces: one writev on uvloop (asyncio's own joins them).
            if not transport.is_closing():
                transport.writelines(out)
            out.clear()
            self._out_bytes = 0
            return
        else:
            data = b"".join(out)
        out.clear()
        self._out_bytes = 0
        if not transport.is_closing():
            transport.write(data)

    async def serve(self, consume: Consumer) -> None:
        """Hand the broker's packets to `consume`, a read's at a time (never an
        empty list; PING answered, PING and PONG left out), until the connection
        ends; `close_reason` then says why.

        `consume` runs in the transport's read callback, so it must not block;
        what it wakes runs before the write that carries its answers
        (`flush_soon`). If it raises, the connection is dropped and serve()
        raises that exception.
        """
        if self._done is not None:
            raise RuntimeError("a Peer is served once")
        done = self._done = self.loop.create_future()
        self._consume = consume
        stream = self._stream
        held, stream.held = stream.held, []
        stream.resume()
        if held:
            self._on_batch(held)
        if stream.ended is not None:
            self._on_batch([])
        else:
            stream.consumer = self._on_batch
        try:
            await done
        finally:
            stream.consumer = None
            self._consume = None
        if self._consume_error is not None:
            raise self._consume_error

    def _on_batch(self, batch: list[p.Packet]) -> None:
        done = self._done
        if done is None or done.done():
            return
        if not batch:  # reading ended
            self._end_of_stream()
            done.set_result(None)
            return
        for packet in batch:
            if isinstance(packet, _LIVENESS):
                batch = self._answer_pings(batch)
                break
        if not batch:
            return
        consume = self._consume
        assert consume is not None
        try:
            consume(batch)
        except BaseException as exc:
            self._consume_error = exc
            self.abort(f"reader failed: {exc!r}")  # which ends reading: done is set
            if not done.done():
                done.set_result(None)
            return
        self.flush_soon()

    def _end_of_stream(self) -> None:
        """Reading ended: note why (a broken stream is logged) and drop the connection."""
        stream = self._stream
        if stream.error is not None and self.close_reason is None:
            self.log.warning("broker_protocol_error", url=self.url, error=str(stream.error))
        self.abort(stream.ended or "connection closed")

    async def packets(self) -> AsyncIterator[p.Packet]:
        """Yield the broker's packets until the connection ends; PING is answered here.

        Ends normally on EOF, a read error or a broken stream; `close_reason`
        then says why.
        """
        async for batch in self.batches():
            for packet in batch:
                yield packet

    async def batches(self) -> AsyncIterator[list[p.Packet]]:
        """`packets()` a list at a time: the packets of one read or more (never
        empty), with PING answered and PING and PONG left out.

        For callers that iterate; the client and worker use `serve()`. Reading
        pauses while _HELD_PACKETS wait for the caller, as a StreamReader
        pauses past its limit.
        """
        if self._done is not None:
            raise RuntimeError("a Peer is served once")
        stream = self._stream
        while True:
            if stream.held:
                batch, stream.held = stream.held, []
                stream.resume()
                for packet in batch:
                    if isinstance(packet, _LIVENESS):
                        batch = self._answer_pings(batch)
                        break
                if batch:
                    yield batch
                continue
            if stream.ended is not None:
                self._end_of_stream()
                return
            await stream.wait()

    def _answer_pings(self, batch: list[p.Packet]) -> list[p.Packet]:
        """Answer each PING; the packets that are for the caller (no PING, no PONG:
        a PONG only proves liveness, which `_last_rx` has noted)."""
        kept: list[p.Packet] = []
        for packet in batch:
            if isinstance(packet, p.Ping):
                with contextlib.suppress(BrokerConnectionError):
                    self.send_nowait(p.Pong())
            elif not isinstance(packet, p.Pong):
                kept.append(packet)
        return kept

    async def _keepalive(self, interval_s: float) -> None:
        # We PING when we have sent nothing for an interval, so the broker
        # never sees us silent; the broker PONGs, so silence for
        # HEARTBEAT_MISSES intervals means the broker (or the path) is gone.
        loop = asyncio.get_running_loop()
        stream = self._stream
        while self.close_reason is None:
            now = loop.time()
            silent = now - stream.last_rx
            if silent >= HEARTBEAT_MISSES * interval_s:
                self.log.warning("broker_silent", url=self.url, silent_s=round(silent, 3))
                self.abort(f"broker silent for {silent:.1f} s")
                return
            if now - self._last_tx >= interval_s:
                with contextlib.suppress(BrokerConnectionError):
                    self.send_nowait(p.Ping())
            next_tx = self._last_tx + interval_s
            next_rx = stream.last_rx + HEARTBEAT_MISSES * interval_s
            await asyncio.sleep(max(min(next_tx, next_rx) - loop.time(), 0.001))

    def abort(self, reason: str) -> None:
        """Drop the connection at once (nothing more is sent); serve() sees it end."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        self._out.clear()  # nothing more is sent
        self._out_bytes = 0
        # abort(), not close(): the connection is unusable; the transport's
        # connection_lost then ends serve().
        self._transport.abort()
        self._stream._end(reason)

    async def aclose(self, reason: str = "closed locally") -> None:
        """Flush what is buffered (briefly), then close."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._flush()  # this turn's frames go before the close
        self._transport.close()
        try:
            async with asyncio.timeout(_CLOSE_FLUSH_S):
                await asyncio.shield(self._stream.lost)
        except TimeoutError:
            self._transport.abort()
        self._stream._end(self.close_reason)


async def _await_hello(url: str, writer: asyncio.StreamWriter, stream: _Stream) -> p.Hello:
    """Wait for the broker's first packet; it must be HELLO (or UNAUTHORIZED).
    What came after it in the same read stays held for serve()."""
    while True:
        await stream.wait()
        packets, stream.held = stream.held, []
        for i, packet in enumerate(packets):
            match packet:
                case p.Hello():
                    stream.held = packets[i + 1 :]
                    return packet
                case p.Result(rc=p.ResultCode.UNAUTHORIZED):
                    raise error_for(packet)
                case p.Ping():
                    writer.write(p.encode(p.Pong()))
                case p.BadPacket(packet_type="RESULT", why=why):
                    raise BrokerConnectionError(
                        f"{url}: broker refused the HELLO with an unreadable RESULT ({why})"
                    )
                case _:
                    raise BrokerConnectionError(
                        f"{url}: broker answered HELLO with {type(packet).__name__}, not HELLO"
                    )
        if stream.ended is not None:
            if stream.error is not None:
                raise BrokerConnectionError(f"{url}: broker broke the protocol: {stream.error}")
            if stream.ended.startswith("read failed"):
                raise BrokerConnectionError(f"{url}: connection lost during HELLO: {stream.ended}")
            raise BrokerConnectionError(f"{url}: broker closed the connection during HELLO")
