"""The broker: the one module that wires I/O to the switchboard.

It owns the listeners, one `_Connection` per accepted stream, the outboxes,
the deadline timer and the shutdown sequence. Everything it decides comes
from `Switchboard`; everything it does is apply that switchboard's actions:

- Incoming bytes are decoded synchronously in the transport's callback and
  fed to the switchboard: no await per packet.
- Everything one read decoded is handed to the switchboard as one event
  (`receive_all`), and its actions are applied together.
- Outgoing frames are encoded straight into the destination's outbox (as
  pieces, `encode_into`) and flushed once per event-loop turn as one joined
  write, so a burst of results to one client is one syscall and each frame
  is copied once. Applying actions never awaits.
- A peer whose unsent bytes pass `outbox_high_water_bytes` has stopped
  reading: it is cut off as a slow consumer and its jobs are handled as on
  disconnect, so it never stalls routing for anyone else.
- A peer that breaks the protocol is closed with a log line saying why; an
  unexpected exception while handling one connection closes that connection
  and is logged, and the broker keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

import structlog

import transports
from transports import Listener, Stream

from ..core.actions import Action, Close, Journal, Log, Send, Wake
from ..core.board import Switchboard
from ..core.errors import EncodeError, RemoteProtocolError
from ..core.framing import PacketDecoder, encode_into
from ..core.guard import clip, clip_fields
from ..core.limits import ListenerRole
from ..core.packets import Chunk, Codec, Packet, Ping, Result, ResultCode, Role, Status
from .authguard import AuthThrottle, Verdict, source_of
from .config import Config, is_loopback
from .dashboard import Dashboard, access_for
from .journal import JournalGlue
from .metrics import MetricsServer, registry_for
from .ratelimit import WINDOW_S, LogRateLimiter
from .store.base import Store

# True when this module runs as mypyc-compiled code (scripts/build_native).
COMPILED = not __file__.endswith(".py")
_log = structlog.get_logger("reasonbroker.broker")

# A turn's frames for one peer up to this size are joined into one write.
_JOIN_MAX_BYTES: Final = 64 * 1024
# A frame this long or longer is read into a buffer of its own size
# (PacketDecoder's direct_from): copying each read out and joining them cost
# more than the read itself for 64 KiB payloads (README, Figures).
_DIRECT_FRAME_BYTES: Final = 32 * 1024
# After the drain, how long closed connections get to flush before they are aborted.
_CLOSE_FLUSH_S = 2.0


class _Connection:
    """One peer: its decoder, its outbox and its bound logger."""

    __slots__ = (
        "broker",
        "closed",
        "codec",
        "decoder",
        "held",
        "hold_close_s",
        "id",
        "last_rx",
        "listener_role",
        "log",
        "needs_auth",
        "opened_at",
        "outbox",
        "outbox_bytes",
        "partial_since",
        "spoke",
        "stream",
        "take_soon",
    )

    def __init__(self, broker: Broker, conn_id: int, stream: Stream, role: ListenerRole) -> None:
        self.broker = broker
        self.id = conn_id
        self.stream = stream
        self.listener_role = role
        # Payloads pass through as Raw bytes: the broker never looks inside them.
        self.decoder = PacketDecoder(
            broker.config.limits.max_frame_bytes,
            raw_payloads=True,
            direct_from=_DIRECT_FRAME_BYTES,
        )
        self.codec: Codec | None = None
        # This turn's frames for the peer, as encode_into's pieces, and their size.
        self.outbox: list[Chunk] = []
        self.outbox_bytes = 0
        self.closed = False
        self.log = _log.bind(conn=conn_id, peer=stream.peer, role=role.value)
        # Liveness: when the peer last sent bytes, and whether it ever sent a whole packet.
        self.opened_at = self.last_rx = broker.loop.time()
        self.spoke = False
        # On a listener with a token, until the switchboard has accepted its HELLO.
        self.needs_auth = False
        # > 0: its authentication failed from a throttled address; its refusal
        # is held this long before it is sent (authguard.py).
        self.hold_close_s = 0.0
        # Bytes of an unfinished frame the decoder holds (counted in the
        # broker's buffered_input), and since when (0.0: none; frame_timeout_ms).
        self.held = 0
        self.partial_since = 0.0
        # A call of _take_frame_soon is scheduled (see buffer_updated).
        self.take_soon = False

    # StreamHandler

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = self.broker.loop.time()
        try:
            try:
                packets = self.decoder.feed(data)
            except RemoteProtocolError as exc:
                self.broker.protocol_error(self, exc)
                return
            self._received(packets)
        except Exception:
            self._internal_error()

    # The optional half of StreamHandler: a frame read in place (the
    # decoder's frame_buffer), else the transport's buffer and data_received.

    def get_buffer(self) -> memoryview | None:
        if self.closed:
            return None
        decoder = self.decoder
        if decoder.frame_done:
            # The last read completed a frame and has let go of its buffer:
            # decoded now, from the very bytes it was read into, before the
            # next read (the order the peer sent them in).
            self._take_frame()
            if self.closed:
                return None
        return decoder.frame_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.last_rx = self.broker.loop.time()
        try:
            try:
                packets = self.decoder.frame_filled(nbytes)
            except RemoteProtocolError as exc:
                self.broker.protocol_error(self, exc)
                return
            self._received(packets)
        except Exception:
            self._internal_error()
            return
        if self.decoder.frame_done and not self.take_soon:
            # Usually the next get_buffer() takes it, at once; this is for a
            # read that is the last for a while (or a loop that asks for the
            # next buffer only when the socket is readable again).
            self.take_soon = True
            self.broker.loop.call_soon(self._take_frame_soon)

    def _take_frame(self) -> None:
        try:
            try:
                packets = self.decoder.take_frame()
            except RemoteProtocolError as exc:
                self.broker.protocol_error(self, exc)
                return
            self._received(packets)
        except Exception:
            self._internal_error()

    def _take_frame_soon(self) -> None:
        self.take_soon = False
        if not self.closed and self.decoder.frame_done:
            self._take_frame()

    def _received(self, packets: list[Packet]) -> None:
        broker = self.broker
        held = self.decoder.buffered
        if held or self.held:
            broker.input_held(self, held, bool(packets))
            if self.closed:
                return
        if self.codec is None and self.decoder.codec is not None:
            self.codec = self.decoder.codec
            broker.board.set_codec(self.id, self.codec)
        if packets:
            self.spoke = True
            intercept = broker.intercept
            if intercept is not None:
                packets = intercept(self.id, packets)
            if packets:
                broker.apply(broker.board.receive_all(self.id, packets, self.last_rx))
            if self.closed:
                return
        if self.decoder.error is not None:
            broker.protocol_error(self, self.decoder.error)

    def _internal_error(self) -> None:
        # A bug in our handling of this peer's input: contain it to this
        # connection, keep serving everyone else.
        self.log.exception("internal_error")
        self.broker.close_connection(self, "internal error")

    def connection_lost(self, exc: BaseException | None) -> None:
        why = "peer closed" if exc is None else f"connection lost: {exc}"
        self.broker.close_connection(self, why)
        self.broker.stream_lost(self)


class Broker:
    """`async with Broker(config) as broker: await broker.serve(until=...)`.

    Entering binds every listener (port 0 works: read `addresses`). `serve`
    returns after a graceful shutdown, triggered by `until` completing or by
    `shutdown()`: stop accepting, answer new RUNs BROKER_WENT_AWAY, let running
    jobs finish for up to `drain_timeout_s` (or until `shutdown(force=True)`),
    answer the rest BROKER_WENT_AWAY, close every connection.
    """

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        # The journal (docs/durability.md): the config's, unless a test hands one in.
        self.store = store if store is not None else _store_for(config)
        self.board = Switchboard(
            config.limits, cookie_prefix=os.urandom(8), durable=self.store.durable
        )
        # Set when the store is durable: the commit barrier and the record glue.
        self.journal: JournalGlue | None = None
        self._reading_paused = False
        self._store_closed = False
        self._finished = False  # board.finish() has run
        self._conns: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._listeners: list[tuple[ListenerRole, Listener]] = []
        self._dirty: list[_Connection] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._draining = False
        self._closed_all: asyncio.Event | None = None  # set when _streams is empty
        # Connections whose transport has not reported connection_lost yet.
        self._streams: dict[int, _Connection] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.protocol_errors = 0
        self.dead_peers = 0
        self.slow_consumers = 0
        self.refused_connections = 0
        # Read at scrape time only; the server exists when metrics_address is set.
        self.metrics_registry = registry_for(self)
        self._metrics: MetricsServer | None = None
        # The dashboard on the metrics listener, and its once-a-second sampling timer.
        self.dashboard: Dashboard | None = None
        self._sampler: asyncio.TimerHandle | None = None
        self._started_at: float | None = None
        self._epoch = 0.0  # wall clock minus loop time, fixed at start
        self._log_limit = LogRateLimiter(config.limits.peer_log_lines_per_s)
        self._auth = AuthThrottle(config.limits)
        self.auth_failures = 0
        self.auth_refused = 0
        # Bytes of unfinished frames across all connections (max_buffered_input_bytes).
        self.buffered_input = 0
        self.input_drops = 0
        # A cluster node's bridge sees a connection's packets before the switchboard
        # (it takes the ATTACHes the board cannot answer; see `inject`). None: nothing.
        self.intercept: Callable[[int, list[Packet]], list[Packet]] | None = None
        # A cluster node's view of the cluster, added to STATUS as "cluster" and to the
        # metrics (cluster/bridge.py). None: a single broker.
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        self.metrics_extra: Callable[[], list[tuple[str, str, float]]] | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the broker is not running"
        return self._loop

    async def __aenter__(self) -> Broker:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._closed_all = asyncio.Event()
        self._started_at = self._loop.time()
        self._epoch = time.time() - self._started_at
        self._open_journal()
        try:
            for lc in self.config.listeners:
                context = None
                if lc.is_tls and lc.certfile is not None and lc.keyfile is not None:
                    # ListenerConfig guarantees both for tls://; a missing file
                    # or a key that does not match fails here, before serving.
                    context = transports.server_context(
                        lc.certfile, lc.keyfile, lc.cafile, lc.verify_client
                    )
                listener = transports.listener_for(lc.url, ssl=context, unix_mode=lc.mode)
                token = lc.required_token
                admin_token = lc.required_admin_token
                await listener.start(
                    self._acceptor(
                        lc.role,
                        None if token is None else token.encode("utf-8"),
                        None if admin_token is None else admin_token.encode("utf-8"),
                    )
                )
                self._listeners.append((lc.role, listener))
                _log.info("listening", url=listener.address, role=lc.role.value)
                _warn_short_tokens(listener.address, token, admin_token)
            if self.config.metrics_address is not None:
                self.dashboard = self._make_dashboard(self.config.metrics_address)
                self._metrics = MetricsServer(
                    self.metrics_registry, self.config.metrics_address, self.dashboard
                )
                await self._metrics.start()
                _log.info("metrics_listening", address=self._metrics.address)
                self._sample()
        except BaseException:
            await self._close_listeners()
            await self._close_metrics()
            await self._close_store()
            raise
        self._schedule_sweep()
        return self

    def _make_dashboard(self, address: str) -> Dashboard:
        """The dashboard, open only when no listener uses a token and it is on loopback."""
        tokens = [(lc.required_token, lc.required_admin_token) for lc in self.config.listeners]
        access = access_for(tokens, is_loopback(f"tcp://{address}"))
        if access.tokens is not None and not access.tokens:
            _log.warning(
                "dashboard_locked",
                address=address,
                why="it needs an admin token (listeners use tokens, or the address is not "
                "loopback) and no listener has admin_token",
            )
        return Dashboard(self, access)

    def _sample(self) -> None:
        """The dashboard's once-a-second sample of the board's counters."""
        if self.dashboard is None:
            return
        self.dashboard.sample()
        self._sampler = self.loop.call_later(1.0, self._sample)

    def _open_journal(self) -> None:
        """Open the store and hand the board what it kept (raises JournalError)."""
        store = self.store
        loop = self.loop
        recovered = store.open(time.time(), self._on_commit, self._on_trouble)
        if not store.durable:
            return
        epoch = time.time() - loop.time()
        self.journal = JournalGlue(store, epoch)
        self.apply(self.journal.restore_into(self.board, recovered, loop.time()))
        stats = self.board.stats
        _log.info(
            "journal_opened",
            path=store.location,
            sync=getattr(store, "sync", None),
            recovered=stats.recovered,
            reruns=stats.reruns,
            retained=len(self.board.retained),
            queued=self.board.queue_depth,
        )

    def _on_commit(self, number: int) -> None:
        journal = self.journal
        if journal is None:
            return
        ready = journal.on_commit(number)
        if ready:
            self.apply(ready, held_ok=False)
        if (
            self._reading_paused
            and self.store.backlog() <= self.config.limits.journal_backlog_max // 2
        ):
            self._set_client_reading(True)

    def _on_trouble(self, reason: str | None) -> None:
        self.board.set_journal_trouble(reason)
        if reason is None:
            _log.warning("journal_recovered", path=self.store.location)
        else:
            _log.error("journal_failing", path=self.store.location, why=reason)

    def _set_client_reading(self, on: bool) -> None:
        """Pause (or resume) reading from clients while the journal lags behind them."""
        self._reading_paused = not on
        role_of = self.board.role_of
        for conn in self._conns.values():
            if role_of(conn.id) is Role.CLIENT:
                if on:
                    conn.stream.resume_reading()
                else:
                    conn.stream.pause_reading()
        _log.warning(
            "journal_backpressure",
            reading="resumed" if on else "paused",
            backlog=self.store.backlog(),
        )

    async def _close_store(self) -> None:
        if self._store_closed:
            return
        self._store_closed = True
        await self.store.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_listeners()
        await self._close_metrics()
        if self.journal is not None and not self._finished:
            # Leaving without serve()'s drain: the board ends the way a drain
            # does (running jobs back in the journal, the attempt given back),
            # so the streams aborted below are the broker's going, not their
            # clients' leaving: no job is cancelled for it.
            self._finished = True
            self.apply(self.board.finish(self.loop.time()))
        await self._close_store()
        for conn in list(self._streams.values()):
            conn.stream.abort()
            self.close_connection(conn, "broker exit")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def addresses(self) -> list[tuple[str, str]]:
        """(role, bound url) for each listener, in config order."""
        return [(role.value, listener.address) for role, listener in self._listeners]

    def address(self, role: str) -> str:
        """The first bound url whose listener accepts `role` ("client" or "worker")."""
        for lrole, listener in self._listeners:
            if lrole is ListenerRole.BOTH or lrole.value == role + "s":
                return listener.address
        raise LookupError(f"no listener accepts {role}s")

    @property
    def connections(self) -> int:
        return len(self._conns)

    def connections_by_role(self) -> dict[str, int]:
        """Open connections by role: client, worker, admin, or unidentified (no packet yet)."""
        counts = {"client": 0, "worker": 0, "admin": 0, "unidentified": 0}
        role_of = self.board.role_of
        for conn_id in self._conns:
            role = role_of(conn_id)
            counts["unidentified" if role is None else role.value] += 1
        return counts

    @property
    def metrics_address(self) -> str | None:
        """The bound "host:port" of the /metrics endpoint, None when metrics are off."""
        return None if self._metrics is None else self._metrics.address

    @property
    def uptime_s(self) -> float:
        return 0.0 if self._started_at is None else self.loop.time() - self._started_at

    @property
    def epoch(self) -> float:
        """Wall clock minus loop time (board time), as measured at start."""
        return self._epoch

    @property
    def compiled(self) -> bool:
        return COMPILED

    def now(self) -> float:
        """The loop's clock: the board's time."""
        return self.loop.time()

    def peer_info(self, conn: int) -> tuple[str, float, float] | None:
        """(address, opened at, last heard at) of an open connection, in loop time."""
        c = self._conns.get(conn)
        return None if c is None else (c.stream.peer, c.opened_at, c.last_rx)

    def shutdown(self, force: bool = False) -> None:
        """Begin the graceful drain; `force=True` also ends it now."""
        if self._stop_requested is None or self._force is None:
            return
        self._stop_requested.set()
        if force:
            self._force.set()

    async def serve(self, until: Awaitable[object] | None = None) -> None:
        assert self._stop_requested is not None and self._force is not None
        assert self._idle is not None and self._closed_all is not None
        trigger: asyncio.Future[object] | None = None
        if until is not None:
            trigger = asyncio.ensure_future(until)
            trigger.add_done_callback(lambda _: self.shutdown())
        try:
            await self._stop_requested.wait()
        finally:
            if trigger is not None and not trigger.done():
                trigger.cancel()
        limits = self.config.limits
        _log.info("shutdown_started", running=self.board.running, queued=self.board.queue_depth)
        await self._close_listeners()
        _log.info("shutdown_listeners_closed")
        self._draining = True
        self.apply(self.board.begin_drain(self.loop.time()))
        self._check_idle()
        if not self._idle.is_set():
            _log.info(
                "shutdown_draining", running=self.board.running, timeout_s=limits.drain_timeout_s
            )
            idle = asyncio.ensure_future(self._idle.wait())
            force = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait(
                    [idle, force],
                    timeout=limits.drain_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                idle.cancel()
                force.cancel()
        _log.info("shutdown_finishing", unfinished=self.board.running)
        self._finished = True
        self.apply(self.board.finish(self.loop.time()))
        self._flush()
        # What the journal still owes a commit, then the answers held for it.
        await self._close_store()
        self._flush()
        # Closed streams flush what is queued before the transport lets go:
        # wait for that (bounded), so the last answers are not lost at exit.
        if self._streams:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_FLUSH_S):
                    await self._closed_all.wait()
            for conn in list(self._streams.values()):
                _log.warning("shutdown_unflushed", conn=conn.id, peer=conn.stream.peer)
                conn.stream.abort()
        _log.info("shutdown_complete", stats=_stats_fields(self))

    async def _close_metrics(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        self.dashboard = None
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await metrics.close()

    async def _close_listeners(self) -> None:
        while self._listeners:
            _, listener = self._listeners.pop()
            with contextlib.suppress(OSError):
                await listener.close()

    # -- connections -------------------------------------------------------------

    def _acceptor(
        self, role: ListenerRole, token: bytes | None = None, admin_token: bytes | None = None
    ) -> transports.OnStream:
        def on_stream(stream: Stream) -> None:
            if self._draining or len(self._conns) >= self.config.limits.max_connections:
                self.refused_connections += 1
                if self.peer_log_allowed("connection_refused"):
                    _log.warning(
                        "connection_refused",
                        peer=stream.peer,
                        role=role.value,
                        why="draining" if self._draining else "max_connections reached",
                    )
                stream.abort()
                return
            if (token is not None or admin_token is not None) and self._auth_blocked(stream, role):
                return
            conn = _Connection(self, next(self._ids), stream, role)
            stream.set_handler(conn)
            self._conns[conn.id] = conn
            self._streams[conn.id] = conn
            self.board.connect(conn.id, role, token, admin_token)
            conn.needs_auth = token is not None
            if self._closed_all is not None:
                self._closed_all.clear()
            conn.log.info("connection_opened")

        return on_stream

    def inject(self, conn_id: int, packets: list[Packet]) -> bool:
        """Hand the switchboard packets taken by `intercept` earlier, as if the
        connection sent them now; False when the connection is gone."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closed:
            return False
        self.apply(self.board.receive_all(conn_id, packets, self.loop.time()))
        return True

    def close_connection(self, conn: _Connection, why: str) -> None:
        """Close a connection (flushing its outbox) and tell the switchboard it is gone."""
        if conn.closed:
            return
        conn.closed = True
        self._release_input(conn)
        if conn.outbox:
            self._write_out(conn)
        conn.stream.close()
        del self._conns[conn.id]
        conn.log.info("connection_closed", why=clip(why))
        if self.journal is not None:
            self.journal.forget_conn(conn.id)
        self.apply(self.board.disconnect(conn.id, self.loop.time()))

    def stream_lost(self, conn: _Connection) -> None:
        """The transport has let go of a connection (after flushing, if closed by us)."""
        self._streams.pop(conn.id, None)
        if not self._streams and self._closed_all is not None:
            self._closed_all.set()

    def input_held(self, conn: _Connection, held: int, whole: bool) -> None:
        """A read left `held` bytes of an unfinished frame (after `whole`
        frames, if any): time the frame, and keep the total under its cap."""
        self.buffered_input += held - conn.held
        conn.held = held
        if not held:
            conn.partial_since = 0.0
            return
        if whole or not conn.partial_since:
            conn.partial_since = conn.last_rx  # a new frame has begun
        cap = self.config.limits.max_buffered_input_bytes
        if self.buffered_input > cap:
            self.input_drops += 1
            self._drop(conn, "input_cap_reached", f"buffered input over {cap} bytes")

    def _release_input(self, conn: _Connection) -> None:
        self.buffered_input -= conn.held
        conn.held = 0

    def protocol_error(self, conn: _Connection, exc: RemoteProtocolError) -> None:
        # PROTOCOL.md section 1: send nothing more, log why, close.
        self.protocol_errors += 1
        if self.peer_log_allowed("protocol_error"):
            conn.log.warning("protocol_error", why=clip(str(exc)))
        conn.outbox.clear()
        conn.outbox_bytes = 0
        self.close_connection(conn, f"protocol error: {exc}")

    # -- applying actions ------------------------------------------------------------

    def apply(self, actions: list[Action], held_ok: bool = True) -> None:
        # A batch's sends mostly go to the same few peers (every RESULT to the
        # one client): the last lookup is kept. Ids are never reused, and a
        # closed connection is marked closed, so a kept one cannot go stale.
        last_id = -1
        target: _Connection | None = None
        # With a journal, what a client must not see before a commit waits
        # there (daemon/journal.py); `held_ok` False: these were held already.
        journal = self.journal if held_ok else None
        for action in actions:
            if type(action) is Send:
                if journal is not None and journal.holds(action.conn, action.packet):
                    journal.hold(action.conn, action)
                    continue
                if action.conn != last_id:
                    last_id = action.conn
                    target = self._conns.get(last_id)
                if target is None or target.closed:
                    continue
                conn = target
                if type(action.packet) is Status:
                    action = Send(action.conn, self._enrich_status(action.packet))
                outbox = conn.outbox
                if not outbox:
                    self._dirty.append(conn)
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        self.loop.call_soon(self._flush)
                try:
                    conn.outbox_bytes += encode_into(
                        action.packet, conn.codec or Codec.MSGPACK, outbox
                    )
                except EncodeError as exc:
                    conn.outbox_bytes += self._encode_failed(conn, action, exc)
            elif type(action) is Journal:
                if self.journal is not None:
                    self.journal.record(action)
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        self.loop.call_soon(self._flush)
            elif type(action) is Close:
                if journal is not None and journal.holds_close(action.conn):
                    journal.hold(action.conn, action)
                    continue
                closing = self._conns.get(action.conn)
                if closing is not None and closing.hold_close_s:
                    self._close_later(closing, action.why)
                elif closing is not None:
                    self.close_connection(closing, action.why)
            elif type(action) is Wake:
                self._wake(action.at)
            elif type(action) is Log:
                self._log_action(action)
        if self._draining:
            self._check_idle()

    def _log_action(self, action: Log) -> None:
        # Every field clipped: the switchboard's lines carry what peers named.
        fields = clip_fields(action.fields)
        about = self._conns.get(action.conn) if action.conn is not None else None
        if action.event == "auth_failed" and about is not None:
            self._auth_failed(about)
        if about is None:
            if self.peer_log_allowed(action.event):
                _log.info(action.event, conn=action.conn, **fields)
            return
        if action.event == "peer_identified":
            # From now on this connection's lines carry its real role.
            about.log = about.log.bind(role=fields["role"])
        if self.peer_log_allowed(action.event):
            about.log.info(action.event, **fields)

    def peer_log_allowed(self, event: str) -> bool:
        """Whether to log this line of a peer-caused event (ratelimit.py); the
        summary of a window that suppressed lines is logged first."""
        allowed, suppressed = self._log_limit.allow(event, self.loop.time())
        if suppressed:
            _log.warning("log_suppressed", of=event, suppressed=suppressed, window_s=WINDOW_S)
        return allowed

    # -- failed authentication (authguard.py) ----------------------------------

    def _auth_failed(self, conn: _Connection) -> None:
        """Count a failed authentication by its source address; past the
        thresholds, hold the refusal (and so the close), or block the address."""
        self.auth_failures += 1
        source = source_of(conn.stream.peer)
        verdict = self._auth.failed(source, self.loop.time())
        if verdict is not Verdict.CLOSE:
            conn.hold_close_s = self._auth.delay_s
        if verdict is Verdict.BLOCK:
            limits = self.config.limits
            _log.warning(
                "auth_blocked",
                source=clip(source),
                failures=limits.auth_failures_before_block,
                for_s=limits.auth_block_s,
            )

    def _auth_blocked(self, stream: Stream, role: ListenerRole) -> bool:
        """A new connection to a listener with a token from a blocked address:
        closed at once, counted, logged (rate-limited)."""
        source = source_of(stream.peer)
        if not self._auth.blocked(source, self.loop.time()):
            return False
        self.auth_refused += 1
        if self.peer_log_allowed("auth_refused"):
            _log.warning("auth_refused", peer=stream.peer, role=role.value, why="address blocked")
        stream.abort()
        return True

    def _close_later(self, conn: _Connection, why: str) -> None:
        """Close a connection after its hold: nothing more is read from it or
        routed to it (the switchboard has let go of it already), and its
        answer is written only when the hold is over."""
        delay_s, conn.hold_close_s = conn.hold_close_s, 0.0
        conn.closed = True  # _flush and data_received leave it alone
        self._release_input(conn)
        conn.stream.pause_reading()
        self.loop.call_later(delay_s, self._close_held, conn, why)

    def _close_held(self, conn: _Connection, why: str) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        if conn.outbox:
            self._write_out(conn)
        conn.stream.close()
        conn.log.info("connection_closed", why=clip(why))

    def _enrich_status(self, packet: Status) -> Status:
        """The switchboard's STATUS snapshot plus what only the broker knows:
        each connection's address and the broker's uptime."""
        status = dict(packet.status or {})
        for kind in ("workers", "clients"):
            entries = []
            for entry in status.get(kind, ()):
                conn = self._conns.get(entry["conn"])
                entries.append({**entry, "address": None if conn is None else conn.stream.peer})
            status[kind] = entries
        status["uptime_s"] = self.uptime_s
        status["compiled"] = COMPILED
        if self.status_extra is not None:
            status["cluster"] = self.status_extra()
        return Status(status)

    def _encode_failed(self, conn: _Connection, action: Send, exc: EncodeError) -> int:
        # The switchboard checks what each codec can carry, so this is our bug;
        # a job's answer must still get through, so send a plain EXCEPTION.
        conn.log.error("encode_failed", packet=type(action.packet).__name__, why=str(exc))
        packet = action.packet
        if isinstance(packet, Result):
            substitute = Result(
                packet.cookie, ResultCode.EXCEPTION, f"broker could not encode the result: {exc}"
            )
            return encode_into(substitute, conn.codec or Codec.MSGPACK, conn.outbox)
        return 0

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.board.end_batch()
        if self.journal is not None:
            store = self.store
            store.flush()  # the turn's journal operations: one batch, off the loop
            if (
                not self._reading_paused
                and store.backlog() > self.config.limits.journal_backlog_max
            ):
                self._set_client_reading(False)
        dirty, self._dirty = self._dirty, []
        high_water = self.config.limits.outbox_high_water_bytes
        for conn in dirty:
            if conn.closed or not conn.outbox:
                continue
            self._write_out(conn)
            if conn.stream.write_buffer_size() > high_water:
                self.slow_consumers += 1
                conn.log.warning(
                    "slow_consumer", buffered=conn.stream.write_buffer_size(), limit=high_water
                )
                conn.stream.abort()
                self.close_connection(conn, "slow consumer")

    @staticmethod
    def _write_out(conn: _Connection) -> None:
        outbox = conn.outbox
        if len(outbox) == 1:
            conn.stream.write(outbox[0])
        elif conn.outbox_bytes <= _JOIN_MAX_BYTES:
            # The turn's frames in one buffer: the only copy of their pieces,
            # and cheaper than the transport's writelines, which handles each
            # piece as a separate buffer.
            conn.stream.write(b"".join(outbox))
        else:
            conn.stream.writelines(outbox)  # big payloads are not copied again
        conn.outbox = []
        conn.outbox_bytes = 0

    def _wake(self, at: float) -> None:
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.apply(self.board.tick(self.loop.time()))

    # -- liveness ----------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        limits = self.config.limits
        # Half the shortest interval, so a peer is judged at most half a beat late.
        every_s = (
            min(
                limits.heartbeat_ms,
                limits.idle_timeout_ms,
                limits.auth_timeout_ms,
                limits.frame_timeout_ms,
            )
            / 2000.0
        )
        self._sweeper = self.loop.call_later(every_s, self._sweep)

    def _sweep(self) -> None:
        """PING quiet HELLO'd peers, drop silent ones, close connections that never spoke."""
        limits = self.config.limits
        now = self.loop.time()
        beat_s = limits.heartbeat_ms / 1000.0
        idle_s = limits.idle_timeout_ms / 1000.0
        auth_s = limits.auth_timeout_ms / 1000.0
        frame_s = limits.frame_timeout_ms / 1000.0
        board = self.board
        try:
            for conn in list(self._conns.values()):
                if conn.closed:
                    continue
                if conn.needs_auth:
                    if board.role_of(conn.id) is not None:
                        conn.needs_auth = False  # authenticated
                    elif now - conn.opened_at >= auth_s:
                        self._drop(
                            conn,
                            "auth_timeout",
                            f"not authenticated within {limits.auth_timeout_ms} ms",
                        )
                        continue
                if conn.partial_since and now - conn.partial_since >= frame_s:
                    self._drop(
                        conn,
                        "frame_timeout",
                        f"a frame begun was not finished within {limits.frame_timeout_ms} ms",
                    )
                    continue
                if not conn.spoke:
                    if now - conn.opened_at >= idle_s:
                        self._drop(
                            conn, "idle_timeout", f"no packet within {limits.idle_timeout_ms} ms"
                        )
                    continue
                if not board.said_hello(conn.id):
                    continue  # legacy peers are never sent PING; TCP keepalive covers them
                silent_s = now - conn.last_rx
                if silent_s >= 3 * beat_s:
                    self._drop(conn, "peer_silent", f"silent for {silent_s:.1f} s (3 heartbeats)")
                elif silent_s >= beat_s:
                    self.apply([Send(conn.id, Ping())])
        finally:
            self._auth.prune(now)
            for event, suppressed in self._log_limit.flush(now):
                _log.warning("log_suppressed", of=event, suppressed=suppressed, window_s=WINDOW_S)
            self._schedule_sweep()

    def _drop(self, conn: _Connection, event: str, why: str) -> None:
        self.dead_peers += 1
        if self.peer_log_allowed(event):
            conn.log.warning(event, why=why)
        conn.outbox.clear()
        conn.outbox_bytes = 0
        conn.stream.abort()  # a dead peer will not read what we would flush
        self.close_connection(conn, why)

    def _check_idle(self) -> None:
        if self.board.running == 0 and self._idle is not None:
            self._idle.set()


# Below this many bytes a token is guessable by a patient peer, even throttled.
_TOKEN_MIN_BYTES: Final = 16


def _warn_short_tokens(url: str, token: str | None, admin_token: str | None) -> None:
    for key, value in (("token", token), ("admin_token", admin_token)):
        if value is not None and len(value.encode("utf-8")) < _TOKEN_MIN_BYTES:
            _log.warning(
                "token_short",
                url=url,
                key=key,
                bytes=len(value.encode("utf-8")),
                advice=f"use at least {_TOKEN_MIN_BYTES} random bytes, e.g. `openssl rand -hex 16`",
            )


def _stats_fields(broker: Broker) -> dict[str, Any]:
    s = broker.board.stats
    return {
        "accepted": s.accepted,
        "completed": dict(s.completed),
        "rejected": dict(s.rejected),
        "requeued": s.requeued,
        "results_dropped": s.results_dropped,
        "protocol_errors": broker.protocol_errors,
        "slow_consumers": broker.slow_consumers,
    }


def _store_for(config: Config) -> Store:
    """The journal the config asks for: SQLite at `journal_path`, or none (memory)."""
    if config.journal_path is None:
        from .store.memory import MemoryStore

        return MemoryStore()
    from .store.sqlite import SqliteStore

    limits = config.limits
    return SqliteStore(
        config.journal_path,
        sync=config.journal_sync,
        result_ttl_s=limits.result_ttl_s,
        result_max=limits.result_max,
    )
