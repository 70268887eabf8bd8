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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections.abc import AsyncIterator
from typing import Any, Final

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
_READ_CHUNK: Final = 256 * 1024
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


class Peer:
    """One HELLO'd connection to the broker. Create it with `Peer.connect`."""

    def __init__(
        self,
        url: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: p.PacketDecoder,
        broker_hello: p.Hello,
        pending: list[p.Packet],
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.url = url
        self.broker_hello = broker_hello
        self.log = log
        self.close_reason: str | None = None
        # The loop this connection lives on (the worker makes its job tasks on it).
        self.loop = loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self._pending = pending  # decoded in the same read as the broker's HELLO
        self._transport = writer.transport
        # Frames written this turn, joined and written by _flush at its end.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_pending = False  # a _flush is scheduled
        self._last_rx = self._last_tx = loop.time()
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
                writer.write(p.encode(hello))
                decoder = p.PacketDecoder(max_frame_bytes)
                answer, pending = await _await_hello(url, reader, writer, decoder)
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
        return cls(url, reader, writer, decoder, answer, pending, log)

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    async def send(self, packet: p.Packet) -> None:
        """Encode and write one packet, waiting while the broker reads slowly.

        EncodeError (a value msgpack cannot carry) is raised before anything is
        written, so the connection stays usable. BrokerConnectionError when the
        connection is gone.
        """
        self._write(p.encode(packet))
        if self._transport.get_write_buffer_size():
            await self.drain()

    def send_nowait(self, packet: p.Packet) -> None:
        """Write one packet without waiting for the buffer to drain (best effort)."""
        self._write(p.encode(packet))

    @property
    def must_drain(self) -> bool:
        """Whether the transport holds unsent bytes: then `drain()` may have to wait.
        An empty buffer cannot be paused, so a caller may skip the await."""
        return bool(self._transport.get_write_buffer_size())

    async def drain(self) -> None:
        """Wait while the transport is paused (the broker reads slowly)."""
        try:
            await self._writer.drain()
        except OSError as exc:
            self.abort(f"write failed: {exc}")
            raise BrokerConnectionError(f"connection to {self.url} lost: {exc}") from exc

    def _write(self, frame: bytes) -> None:
        """Hold `frame` for this turn's one write (sooner past _FLUSH_BYTES)."""
        if self.close_reason is not None or self._transport.is_closing():
            raise BrokerConnectionError(
                f"connection to {self.url} is closed: {self.close_reason or 'closing'}"
            )
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= _FLUSH_BYTES:
            self._flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)
        self._last_tx = self.loop.time()

    def flush_soon(self) -> None:
        """Have this turn's write wait behind the callbacks scheduled so far.

        The client and worker call it after handing on a read's packets: the
        tasks those woke (a job's handler, a `run()` whose answer came) run
        first, and what they send leaves in the same write, a loop turn
        sooner than a write scheduled by their own first frame.
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
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    async def packets(self) -> AsyncIterator[p.Packet]:
        """Yield the broker's packets until the connection ends; PING is answered here.

        Ends normally on EOF, a read error or a broken stream; `close_reason`
        then says why.
        """
        async for batch in self.batches():
            for packet in batch:
                yield packet

    async def batches(self) -> AsyncIterator[list[p.Packet]]:
        """`packets()` a read at a time: each list holds the packets of one read
        (never empty), with PING answered and PING and PONG left out.

        The client and worker loop over these: one async-generator step per
        read instead of one per packet.
        """
        pending, self._pending = self._pending, []
        if pending:
            pending = self._answer_pings(pending)
            if pending:
                yield pending
        loop = self.loop
        read = self._reader.read
        feed = self._decoder.feed
        while self.close_reason is None:
            try:
                data = await read(_READ_CHUNK)
            except OSError as exc:
                self.abort(f"read failed: {exc}")
                break
            if not data:
                self.abort("broker closed the connection")
                break
            self._last_rx = loop.time()
            try:
                batch = feed(data)
            except RemoteProtocolError as exc:
                self.log.warning("broker_protocol_error", url=self.url, error=str(exc))
                self.abort(f"broker broke the protocol: {exc}")
                break
            for packet in batch:
                if isinstance(packet, _LIVENESS):
                    batch = self._answer_pings(batch)
                    break
            if batch:
                yield batch

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
        while self.close_reason is None:
            now = loop.time()
            silent = now - self._last_rx
            if silent >= HEARTBEAT_MISSES * interval_s:
                self.log.warning("broker_silent", url=self.url, silent_s=round(silent, 3))
                self.abort(f"broker silent for {silent:.1f} s")
                return
            if now - self._last_tx >= interval_s:
                with contextlib.suppress(BrokerConnectionError):
                    self.send_nowait(p.Ping())
            next_tx = self._last_tx + interval_s
            next_rx = self._last_rx + HEARTBEAT_MISSES * interval_s
            await asyncio.sleep(max(min(next_tx, next_rx) - loop.time(), 0.001))

    def abort(self, reason: str) -> None:
        """Drop the connection at once (nothing more is sent); the reader sees it end."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        self._out.clear()  # nothing more is sent
        self._out_bytes = 0
        # abort(), not close(): the connection is unusable, and abort also ends
        # a reader blocked in read() (it sees EOF).
        self._writer.transport.abort()

    async def aclose(self, reason: str = "closed locally") -> None:
        """Flush what is buffered (briefly), then close."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._flush()  # this turn's frames go before the close
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_FLUSH_S):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self._writer.transport.abort()


async def _await_hello(
    url: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: p.PacketDecoder,
) -> tuple[p.Hello, list[p.Packet]]:
    """Read until the broker's first packet; it must be HELLO (or UNAUTHORIZED)."""
    while True:
        try:
            data = await reader.read(_READ_CHUNK)
        except OSError as exc:
            raise BrokerConnectionError(f"{url}: connection lost during HELLO: {exc}") from exc
        if not data:
            raise BrokerConnectionError(f"{url}: broker closed the connection during HELLO")
        try:
            packets = decoder.feed(data)
        except RemoteProtocolError as exc:
            raise BrokerConnectionError(f"{url}: broker broke the protocol: {exc}") from exc
        for i, packet in enumerate(packets):
            match packet:
                case p.Hello():
                    return packet, packets[i + 1 :]
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
