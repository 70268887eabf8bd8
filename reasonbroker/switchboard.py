"""The switchboard, sans-IO: routes, worker slots, the queue and deadlines.

It owns every routing rule of PROTOCOL.md section 5. It never awaits, reads a
socket, logs or reads the clock: the broker passes events in
(`connect`, `receive`, `disconnect`, `tick`, `begin_drain`, `finish`) with the
current time, and gets back a list of actions to apply in order:

- `Send(conn, packet)`: write the packet to that connection;
- `Close(conn, why)`: flush and close that connection;
- `Wake(at)`: call `tick(now)` no later than `at`;
- `Log(event, conn, fields)`: a structured log line worth writing.

Routing model (decisions recorded in docs/protocol.md):

- A client's cookies live in that client's own namespace: two clients may use
  the same cookie, and nothing one client sends can name another's job.
- Each attempt of a job on a worker gets a fresh broker-made cookie, so a late
  RESULT from an earlier attempt (or from a worker we gave up on) can never be
  mistaken for the current one: it is dropped and counted.
- A job holds its worker's slot until that worker answers or leaves, even
  after the client was answered (TIMEOUT, CANCELLED): the worker is still
  busy with it, so counting the slot free would overload the worker.
"""

from __future__ import annotations

import enum
import heapq
import hmac
from dataclasses import dataclass, field
from typing import Any, Final

from ._version import __version__
from .config import Limits, ListenerRole
from .protocol import (
    BadPacket,
    Cancel,
    Codec,
    Hello,
    Packet,
    Ping,
    Pong,
    Progress,
    Record,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Shutdown,
    Started,
    Status,
    Unsupported,
    can_carry,
    for_legacy,
    payload_kind,
)

FEATURES = ("started", "progress", "priority", "timeout", "attempts")
# Worker cookies are the broker's 8-byte prefix and a 64-bit big-endian
# sequence number, made 256 at a time: the numbers k*256 .. k*256+255 share
# their first 15 bytes, so a batch is one repeated stem with its last byte
# set by a single slice assignment; each cookie is then one 16-byte slice.
_WCOOKIE_BATCH: Final = 256
_LOW_BYTES: Final = bytes(range(_WCOOKIE_BATCH))


# ---------------------------------------------------------------------------
# Actions
#
# An action lives from the switchboard's return to the broker's apply, and
# nothing changes it on the way. Send is made twice for every job, so it is
# written by hand like RUN and RESULT (see protocol.Record): a native class
# under mypyc, about four times cheaper to build than a dataclass.


class Send(Record):
    __slots__ = ("conn", "packet")
    __match_args__ = ("conn", "packet")

    def __init__(self, conn: int, packet: Packet) -> None:
        self.conn: Final = conn
        self.packet: Final = packet


@dataclass(slots=True)
class Close:
    conn: int
    why: str


@dataclass(slots=True)
class Wake:
    at: float


@dataclass(slots=True)
class Log:
    event: str
    conn: int | None
    fields: dict[str, Any] = field(default_factory=dict)


Action = Send | Close | Wake | Log


# ---------------------------------------------------------------------------
# State


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3


class _Conn:
    __slots__ = (
        "admin_token",
        "busy",
        "capacity",
        "closing",
        "codec",
        "features",
        "hello",
        "id",
        "jobs",
        "last_used",
        "listener",
        "name",
        "pipelines",
        "resting",
        "role",
        "running",
        "token",
    )

    def __init__(
        self,
        conn_id: int,
        listener: ListenerRole,
        token: bytes | None = None,
        admin_token: bytes | None = None,
    ) -> None:
        self.id = conn_id
        self.listener = listener
        # The token this peer's first packet (a HELLO) must carry; None = no
        # authentication on its listener. Cleared once it has authenticated.
        self.token = token
        # The token a HELLO with role admin must carry; None = no admin on
        # this listener. Cleared once the first packet is handled.
        self.admin_token = admin_token
        self.role: Role | None = None
        self.hello = False
        self.features: frozenset[str] = frozenset()
        self.name: str | None = None
        self.codec = Codec.MSGPACK
        self.closing = False
        # client side: the client's live cookies
        self.jobs: dict[bytes, _Job] = {}
        # worker side
        self.capacity = 0
        self.busy = 0
        self.pipelines: set[str] | None = None
        self.running: dict[bytes, _Job] = {}
        self.last_used = 0
        # Slots a legacy worker freed with a RESULT but may not have let go of
        # yet (see Limits.legacy_slot_reuse_ms); not usable until they rest.
        self.resting = 0

    def serves(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline in self.pipelines


class _Job:
    __slots__ = (
        "abandoned",
        "accepted_at",
        "attempts",
        "cancel_requested",
        "client",
        "cookie",
        "deadline",
        "deadlines",
        "max_attempts",
        "owed",
        "run",
        "seq",
        "state",
        "wcookie",
        "worker",
    )

    def __init__(self, seq: int, client: _Conn, run: Run, max_attempts: int) -> None:
        self.seq = seq
        self.client: _Conn | None = client
        self.cookie = run.cookie
        self.run = run
        self.max_attempts = max_attempts
        self.attempts = 0
        self.state = _State.QUEUED
        self.worker: _Conn | None = None
        self.wcookie: bytes | None = None
        # The client is still owed its one terminal RESULT (not detached,
        # connected, not yet answered).
        self.owed = not run.detach
        # Over for the broker (timed out, cancel grace passed, client gone):
        # never re-run; if running it only holds its slot until the worker
        # answers or leaves.
        self.abandoned = False
        self.cancel_requested = False
        self.deadline: float | None = None
        self.accepted_at = 0.0  # set by _run: latency runs from acceptance to the terminal RESULT
        # Entries in the switchboard's deadline heap that name this job.
        self.deadlines = 0


@dataclass(slots=True)
class Stats:
    """Counters the broker exposes; tests and chaos runs check them."""

    accepted: int = 0
    # By result code. Plain dicts, not Counters: Counter defines __delitem__
    # in Python, which routes every `counter[key] += 1` through a slow slot,
    # and a job's completion counts one.
    rejected: dict[str, int] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)
    dispatched: int = 0
    requeued: int = 0
    cancels: int = 0
    results_dropped: int = 0  # late or duplicate RESULTs from workers
    abandoned_results: int = 0  # worker answers for jobs already ended (timeout, cancel)
    dropped: int = 0  # non-detached jobs ended because their client left
    bad_packets: int = 0


# Job latency bucket bounds in seconds: from a millisecond echo to a ten-minute
# reasoning job; past the last one a job lands in the +Inf bucket only.
LATENCY_BOUNDS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


@dataclass(slots=True)
class Latency:
    """A fixed-bucket histogram of job latency, acceptance to terminal RESULT.

    `counts[i]` holds the observations in (bounds[i-1], bounds[i]]; the last
    entry, one past the bounds, those above every bound (Prometheus' +Inf).
    Not cumulative: the exporter sums them at scrape time.
    """

    bounds: tuple[float, ...] = LATENCY_BOUNDS_S
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("bounds must be strictly increasing")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        # The first bound >= seconds (bisect_left: a value equal to a bound is
        # in that bound's bucket, le), found from the low end: most jobs land
        # in the first buckets, and a scan there is cheaper than calling bisect.
        i = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class _Deadline(enum.Enum):
    TIMEOUT = 1  # target: the job
    CANCEL_GRACE = 2  # target: the job
    SLOT_REUSE = 3  # target: the worker whose slot rests


# ---------------------------------------------------------------------------
# The switchboard


class Switchboard:
    def __init__(self, limits: Limits, cookie_prefix: bytes = bytes(8)) -> None:
        if len(cookie_prefix) != 8:
            raise ValueError("cookie_prefix must be 8 bytes")
        self.limits = limits
        # The limits read for every job, copied once: Limits is a plain
        # (uncompiled) dataclass, so each read of it is an attribute lookup.
        self._max_inflight = limits.max_inflight_per_client
        self._queue_limit = limits.queue_limit
        self._attempts_limit = limits.max_attempts_limit
        self._default_attempts = min(limits.default_max_attempts, limits.max_attempts_limit)
        self._slot_rest_s = limits.legacy_slot_reuse_ms / 1000.0
        self.stats = Stats()
        self.latency = Latency()
        # The time of the event being handled, for the latency of jobs ended
        # deep in a call chain that is not handed `now`.
        self._now = 0.0
        self.draining = False
        self._conns: dict[int, _Conn] = {}
        self._workers: dict[int, _Conn] = {}  # registered (capacity > 0)
        # The same workers as a list, for dispatch to scan (rebuilt when a
        # worker registers or goes; iterating a list is cheaper than a dict).
        self._worker_list: list[_Conn] = []
        self._queues: dict[str, list[tuple[int, int, _Job]]] = {}
        self._queued = 0  # live entries across all queues
        self._dead_in_queues = 0  # lazily deleted heap entries
        self._dead_deadlines = 0  # deadline heap entries whose job has ended
        self._running = 0
        # The last job or deadline sequence number handed out; an int, since
        # next() on an itertools.count is a generic call from compiled code.
        self._seq = 0
        self._use = 0  # bumped at each dispatch: a worker's last_used orders equals
        # The worker this batch's last RUN went to (see end_batch).
        self._batch_worker: _Conn | None = None
        self._batch_slack = limits.dispatch_batch_slack
        self._wcookie_prefix = cookie_prefix
        self._wcookie_batch = 0  # the next batch: sequence numbers from 256 times this
        self._wcookies = self._wcookie_blob()  # the current batch, 16 bytes per cookie
        self._wcookie_at = 16  # where the next one starts in it (0 is never used)
        self._deadlines: list[tuple[float, int, _Deadline, _Job | _Conn]] = []
        self._wake_at: float | None = None

    # -- introspection (tests, status, chaos checks) -------------------------

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        """Jobs holding a worker slot."""
        return self._running

    @property
    def live_jobs(self) -> int:
        """Jobs the broker still tracks, queued or running (the route table's size)."""
        return self._queued + self._running

    def slots(self, conn: int) -> tuple[int, int]:
        """(capacity, busy) of a worker connection."""
        c = self._conns[conn]
        return c.capacity, c.busy

    def workers(self) -> list[int]:
        return list(self._workers)

    def role_of(self, conn: int) -> Role | None:
        c = self._conns.get(conn)
        return None if c is None else c.role

    def said_hello(self, conn: int) -> bool:
        c = self._conns.get(conn)
        return c is not None and c.hello

    # -- connection lifecycle -----------------------------------------------

    def connect(
        self,
        conn: int,
        listener: ListenerRole,
        token: bytes | None = None,
        admin_token: bytes | None = None,
    ) -> None:
        """A new connection; `token` (UTF-8) is the one its HELLO must carry, if any;
        `admin_token` the one a HELLO with role admin must carry (None: no admin here)."""
        if conn in self._conns:
            raise ValueError(f"connection {conn} is already known")
        self._conns[conn] = _Conn(conn, listener, token, admin_token)

    def set_codec(self, conn: int, codec: Codec) -> None:
        self._conns[conn].codec = codec

    def disconnect(self, conn: int, now: float) -> list[Action]:
        """The peer is gone; `now` is taken like every event's, though no rule needs it yet."""
        c = self._conns.pop(conn, None)
        if c is None:
            return []
        self._now = now
        out: list[Action] = []
        if c.role is Role.WORKER:
            self._worker_gone(c, out)
        elif c.role is Role.CLIENT:
            self._client_gone(c, out)
        return out

    # -- packets --------------------------------------------------------------

    def receive(self, conn: int, packet: Packet, now: float) -> list[Action]:
        """Handle one packet from a connection: the actions it calls for."""
        return self.receive_all(conn, [packet], now)

    def receive_all(self, conn: int, packets: list[Packet], now: float) -> list[Action]:
        """Handle packets a connection sent, in order, as one event: one list of
        actions for them all (the broker hands it what one read decoded)."""
        out: list[Action] = []
        c = self._conns.get(conn)
        if c is None:
            return out
        self._now = now
        for packet in packets:
            if c.closing:
                break  # closed by us: what it sent after that is not acted on
            self._handle(c, packet, now, out)
        return out

    def _handle(self, c: _Conn, packet: Packet, now: float, out: list[Action]) -> None:
        if c.role is None and not self._assign_role(c, packet, out):
            return
        match packet:
            case Run():
                if c.role is Role.CLIENT:
                    self._run(c, packet, now, out)
                else:
                    self._wrong_role(c, "RUN", out)
            case Result():
                if c.role is Role.WORKER:
                    self._worker_result(c, packet, now, out)
                else:
                    self._wrong_role(c, "RESULT", out)
            case Cancel(cookie):
                if c.role is Role.CLIENT:
                    self._cancel(c, cookie, now, out)
                else:
                    self._wrong_role(c, "CANCEL", out)
            case Register():
                if c.role is Role.WORKER:
                    self._register(c, packet, out)
                else:
                    self._wrong_role(c, "REGISTER", out)
            case Hello():
                # The first HELLO was consumed by _assign_role.
                self._answer(
                    c, Result(None, ResultCode.BAD_PACKET, "HELLO must be the first packet"), out
                )
            case Ping():
                if c.hello:
                    out.append(Send(c.id, Pong()))
            case Pong():
                pass  # liveness is tracked by the broker from any traffic
            case Started(cookie) | Progress(cookie):
                if c.role is Role.WORKER:
                    self._forward_progress(c, cookie, packet, out)
                else:
                    self._wrong_role(c, type(packet).__name__.upper(), out)
            case Status():
                if c.role is Role.ADMIN:
                    self._status(c, out)
                else:
                    self._wrong_role(c, "STATUS", out)
            case Shutdown():
                self._unsupported(c, "SHUTDOWN", None, out)
            case Unsupported(ptype, cookie):
                self._unsupported(c, ptype, cookie, out)
            case BadPacket():
                self._bad_packet(c, packet, now, out)

    def _assign_role(self, c: _Conn, packet: Packet, out: list[Action]) -> bool:
        """The first packet fixes a connection's role (PROTOCOL.md section 5, Roles)."""
        admin_token, c.admin_token = c.admin_token, None
        if isinstance(packet, Hello) and packet.role is Role.ADMIN:
            return self._assign_admin(c, packet, admin_token, out)
        if isinstance(packet, Hello):
            role = packet.role or Role.CLIENT
        elif isinstance(packet, Register) or (
            isinstance(packet, BadPacket) and packet.packet_type == "REGISTER"
        ):
            role = Role.WORKER  # a malformed REGISTER still says "I am a worker"
        else:
            role = Role.CLIENT
        allowed = c.listener is ListenerRole.BOTH or (
            (c.listener is ListenerRole.WORKERS) == (role is Role.WORKER)
        )
        if isinstance(packet, Hello):
            c.hello = True
            c.features = frozenset(packet.features)
            c.name = packet.name
        c.role = role
        if c.token is not None and not self._authenticate(c, packet, out):
            return False
        if not allowed:
            why = f"{role.value}s are not accepted on this {c.listener.value} listener"
            self._answer(
                c, Result(_cookie_of(packet), ResultCode.UNAUTHORIZED, why), out, force=True
            )
            self._close(c, why, out)
            out.append(
                Log("role_refused", c.id, {"role": role.value, "listener": c.listener.value})
            )
            return False
        out.append(
            Log("peer_identified", c.id, {"role": role.value, "hello": c.hello, "name": c.name})
        )
        if isinstance(packet, Hello):
            out.append(
                Send(
                    c.id,
                    Hello(
                        role=role,
                        features=FEATURES,
                        version=__version__,
                        heartbeat_ms=self.limits.heartbeat_ms,
                    ),
                )
            )
            return False  # the HELLO is fully handled
        return True

    def _assign_admin(
        self, c: _Conn, packet: Hello, admin_token: bytes | None, out: list[Action]
    ) -> bool:
        """A HELLO with role admin: accepted only with this listener's admin token.

        Refused (no admin token here, or a wrong or missing one): RESULT
        UNAUTHORIZED, then close; logged as auth_failed, never with the token.
        """
        c.hello = True
        c.features = frozenset(packet.features)
        c.name = packet.name
        c.role = Role.ADMIN
        c.token = None  # the admin token stands in for the listener's own
        if admin_token is None:
            reason = "no admin on this listener"
        elif packet.token is None:
            reason = "missing"
        elif hmac.compare_digest(packet.token.encode("utf-8", "surrogatepass"), admin_token):
            out.append(
                Log("peer_identified", c.id, {"role": "admin", "hello": True, "name": c.name})
            )
            out.append(
                Send(
                    c.id,
                    Hello(
                        role=Role.ADMIN,
                        features=FEATURES,
                        version=__version__,
                        heartbeat_ms=self.limits.heartbeat_ms,
                    ),
                )
            )
            return False  # the HELLO is fully handled
        else:
            reason = "wrong"
        out.append(Log("auth_failed", c.id, {"reason": reason, "role": "admin"}))
        why = "a valid admin token is required for an admin connection"
        self._answer(c, Result(None, ResultCode.UNAUTHORIZED, why), out, force=True)
        self._close(c, f"unauthorized admin ({reason})", out)
        return False

    def _status(self, c: _Conn, out: list[Action]) -> None:
        if c.codec is not Codec.MSGPACK:
            self._answer(c, Result(None, ResultCode.BAD_PACKET, "STATUS needs msgpack"), out)
            return
        out.append(Send(c.id, Status(self.status_snapshot())))

    def status_snapshot(self) -> dict[str, Any]:
        """Workers, clients and queue depth by pipeline, as plain data (for STATUS).

        Connections are listed by id; the broker adds each one's address and
        its own uptime before the answer is encoded.
        """
        workers: list[dict[str, Any]] = []
        clients: list[dict[str, Any]] = []
        for c in self._conns.values():
            if c.closing:
                continue
            if c.role is Role.WORKER:
                workers.append(
                    {
                        "conn": c.id,
                        "name": c.name,
                        "pipelines": None if c.pipelines is None else sorted(c.pipelines),
                        "capacity": c.capacity,
                        "busy": c.busy,
                    }
                )
            elif c.role is Role.CLIENT:
                clients.append({"conn": c.id, "name": c.name, "jobs": len(c.jobs)})
        queue: dict[str, int] = {}
        for pipeline, heap in sorted(self._queues.items()):
            live = sum(1 for entry in heap if entry[2].state is _State.QUEUED)
            if live:
                queue[pipeline] = live
        return {
            "workers": workers,
            "clients": clients,
            "queue": queue,
            "running": self._running,
            "queued": self._queued,
        }

    def _authenticate(self, c: _Conn, packet: Packet, out: list[Action]) -> bool:
        """On a listener with a token, the first packet must be HELLO carrying it.

        Refused: RESULT UNAUTHORIZED, then close. The token is compared in
        constant time and never appears in an answer or a log line.
        """
        assert c.token is not None
        if not isinstance(packet, Hello):
            reason = "not HELLO"  # legacy peers cannot authenticate
        elif packet.token is None:
            reason = "missing"
        elif hmac.compare_digest(packet.token.encode("utf-8", "surrogatepass"), c.token):
            c.token = None  # authenticated; keep no copy of the secret
            return True
        else:
            reason = "wrong"
        out.append(Log("auth_failed", c.id, {"reason": reason}))
        why = "a valid token is required on this listener"
        self._answer(c, Result(_cookie_of(packet), ResultCode.UNAUTHORIZED, why), out, force=True)
        self._close(c, f"unauthorized ({reason})", out)
        return False

    # -- answering ------------------------------------------------------------

    def _answer(self, c: _Conn, result: Result, out: list[Action], force: bool = False) -> None:
        """Send a RESULT to a peer, in a form that peer understands.

        A legacy worker is never sent a RESULT (ReasonChip's worker treats it
        as fatal), unless `force` (we are closing it anyway).
        """
        if c.hello and c.codec is Codec.MSGPACK:
            out.append(Send(c.id, result))  # the common case: nothing to adapt
            return
        if c.role is Role.WORKER and not c.hello and not force:
            return
        if not c.hello:
            if result.cookie is None and c.role is not Role.WORKER:
                # ReasonChip's client hangs on a RESULT with no cookie; a
                # closed connection at least fails its calls.
                self._close(c, f"{result.rc.value} with no cookie to answer: {result.error}", out)
                return
            result = for_legacy(result)
        if not can_carry(result.result, c.codec):
            result = Result(
                result.cookie,
                ResultCode.BAD_PACKET,
                f"the result cannot be carried to this {c.codec.value} peer "
                f"({payload_kind(result.result)})",
            )
        out.append(Send(c.id, result))

    def _close(self, c: _Conn, why: str, out: list[Action]) -> None:
        """Close a connection and treat it as gone at once: nothing more is
        routed to or through it while the broker gets round to closing it."""
        if c.closing:
            return
        c.closing = True
        out.append(Close(c.id, why))
        out.extend(self.disconnect(c.id, 0.0))

    def _wrong_role(self, c: _Conn, what: str, out: list[Action]) -> None:
        why = f"{what} is not allowed from a {c.role.value if c.role else 'new'} connection"
        self.stats.bad_packets += 1
        out.append(Log("packet_refused", c.id, {"why": why}))
        if c.role is Role.WORKER and not c.hello:
            self._close(c, why, out)
        else:
            self._answer(c, Result(None, ResultCode.BAD_PACKET, why), out)

    def _unsupported(self, c: _Conn, ptype: str, cookie: bytes | None, out: list[Action]) -> None:
        out.append(Log("packet_unsupported", c.id, {"packet_type": ptype}))
        self._answer(
            c,
            Result(
                cookie,
                ResultCode.UNSUPPORTED_PACKET_TYPE,
                f"packet type {ptype!r} is not supported",
            ),
            out,
        )

    def _bad_packet(self, c: _Conn, bad: BadPacket, now: float, out: list[Action]) -> None:
        self.stats.bad_packets += 1
        out.append(Log("bad_packet", c.id, {"packet_type": bad.packet_type, "why": bad.why}))
        if c.role is Role.WORKER:
            # A malformed RESULT still ends its job, so the client is answered
            # and the slot is freed; the worker is told only if it said HELLO.
            job = c.running.get(bad.cookie) if bad.cookie is not None else None
            if job is not None and bad.packet_type == "RESULT":
                why = f"the worker sent a malformed RESULT: {bad.why}"
                self._worker_result(c, Result(bad.cookie, ResultCode.BAD_PACKET, why), now, out)
            self._answer(c, Result(bad.cookie, ResultCode.BAD_PACKET, bad.why), out)
            return
        self._answer(c, Result(bad.cookie, ResultCode.BAD_PACKET, bad.why), out)

    # -- clients ----------------------------------------------------------------

    def _reject(self, c: _Conn, run: Run, rc: ResultCode, why: str, out: list[Action]) -> None:
        _count(self.stats.rejected, rc.value)
        self._answer(c, Result(run.cookie, rc, why), out)

    def _run(self, c: _Conn, run: Run, now: float, out: list[Action]) -> None:
        if self.draining:
            self._reject(c, run, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out)
            return
        if run.cookie in c.jobs:
            self._reject(c, run, ResultCode.COOKIE_COLLISION, "cookie is already in use", out)
            return
        if len(c.jobs) >= self._max_inflight:
            self._reject(
                c,
                run,
                ResultCode.NO_CAPACITY,
                f"max_inflight_per_client ({self.limits.max_inflight_per_client}) reached",
                out,
            )
            return
        worker, served = self._pick_worker(run.pipeline)
        if not served:
            self._reject(
                c, run, ResultCode.NO_CAPACITY, f"no worker serves pipeline {run.pipeline!r}", out
            )
            return
        if worker is None and self._queued >= self._queue_limit:
            why = "no free worker slot" if self._queue_limit == 0 else "the queue is full"
            self._reject(c, run, ResultCode.NO_CAPACITY, why, out)
            return
        attempts = (
            min(run.max_attempts, self._attempts_limit)
            if run.max_attempts
            else self._default_attempts
        )
        self._seq += 1
        job = _Job(self._seq, c, run, attempts)
        c.jobs[run.cookie] = job
        self.stats.accepted += 1
        job.accepted_at = now
        if run.timeout_ms is not None:
            job.deadline = now + run.timeout_ms / 1000.0
            self._add_deadline(job.deadline, _Deadline.TIMEOUT, job, out)
        if worker is not None:
            self._dispatch(job, worker, out)
        else:
            self._enqueue(job)

    def _cancel(self, c: _Conn, cookie: bytes, now: float, out: list[Action]) -> None:
        job = c.jobs.get(cookie)
        if job is None:
            self._answer(
                c, Result(cookie, ResultCode.COOKIE_NOT_FOUND, "no live job with this cookie"), out
            )
            return
        self.stats.cancels += 1
        if job.state is _State.QUEUED:
            self._unqueue(job)
            self._end_for_client(job, ResultCode.CANCELLED, "cancelled by client", out)
        elif not job.cancel_requested:
            self._cancel_on_worker(job, out)
            self._add_deadline(
                now + self.limits.cancel_grace_ms / 1000.0, _Deadline.CANCEL_GRACE, job, out
            )

    def _client_gone(self, c: _Conn, out: list[Action]) -> None:
        """Queued jobs are dropped, running ones cancelled; detached jobs run on."""
        for job in c.jobs.values():
            job.client = None
            job.owed = False
            if job.run.detach:
                continue
            self.stats.dropped += 1
            if job.state is _State.QUEUED:
                self._unqueue(job)
            elif job.state is _State.RUNNING:
                job.abandoned = True
                if not job.cancel_requested:
                    self._cancel_on_worker(job, out)
        c.jobs.clear()

    # -- workers ------------------------------------------------------------------

    def _register(self, c: _Conn, reg: Register, out: list[Action]) -> None:
        limit = self.limits.max_worker_capacity
        capacity = c.capacity + reg.capacity
        if capacity > limit:
            out.append(Log("capacity_clamped", c.id, {"asked": capacity, "limit": limit}))
            capacity = limit
        c.capacity = capacity
        narrowed = False
        if reg.pipelines is not None:
            # A worker serves all pipelines until it names some; from then on
            # it serves the union of the names it has given.
            narrowed = c.pipelines is None and c.id in self._workers
            c.pipelines = (c.pipelines or set()) | set(reg.pipelines)
        self._workers[c.id] = c
        self._worker_list = list(self._workers.values())
        out.append(
            Log(
                "worker_registered",
                c.id,
                {
                    "capacity": c.capacity,
                    "pipelines": sorted(c.pipelines) if c.pipelines is not None else None,
                },
            )
        )
        self._fill(c, out)
        if narrowed:
            self._fail_unserved(out)  # jobs only this worker served must not wait forever

    def _worker_result(self, w: _Conn, res: Result, now: float, out: list[Action]) -> None:
        cookie = res.cookie
        # get and del: mypyc has fast paths for both, dict.pop is a generic method call.
        job = None if cookie is None else w.running.get(cookie)
        if cookie is None or job is None:
            # Late (an attempt we gave up on) or duplicate: never delivered.
            self.stats.results_dropped += 1
            out.append(Log("result_dropped", w.id, {"reason": "unknown cookie"}))
            return
        del w.running[cookie]
        self._release_slot(w, job)
        self._set_done(job)
        if job.abandoned:
            self.stats.abandoned_results += 1
        else:
            _count(self.stats.completed, res.rc)  # a StrEnum: the same key as its text
            self.latency.observe(now - job.accepted_at)
            self._deliver(
                job, Result(job.cookie, res.rc, res.error, res.stacktrace, res.result), out
            )
        self._forget(job)
        if not w.hello and self._slot_rest_s > 0:
            # ReasonChip's worker sends its RESULT a few loop turns before it
            # drops the finished task from its own table, and shuts down on a
            # RUN that arrives in between (docs/protocol.md, Legacy workers).
            w.resting += 1
            self._add_deadline(now + self._slot_rest_s, _Deadline.SLOT_REUSE, w, out)
        self._fill(w, out)

    def _forward_progress(
        self, w: _Conn, wcookie: bytes, packet: Started | Progress, out: list[Action]
    ) -> None:
        job = w.running.get(wcookie)
        if job is None or not job.owed or job.client is None or not job.client.hello:
            return
        client = job.client
        if isinstance(packet, Started):
            if "started" in client.features:
                out.append(Send(client.id, Started(job.cookie)))
        elif "progress" in client.features and can_carry(packet.result, client.codec):
            out.append(Send(client.id, Progress(job.cookie, packet.result)))

    def _worker_gone(self, w: _Conn, out: list[Action]) -> None:
        """Each job re-queued while attempts allow, else WORKER_WENT_AWAY (section 5)."""
        self._workers.pop(w.id, None)
        self._worker_list = list(self._workers.values())
        if self._batch_worker is w:
            self._batch_worker = None
        jobs = sorted(w.running.values(), key=lambda j: j.seq)
        w.running.clear()
        for job in jobs:
            self._release_slot(w, job)
            if job.abandoned:
                self._set_done(job)
                self._forget(job)  # over already (timed out, client gone)
            elif job.cancel_requested:
                # Cancelled jobs are never re-run; ReasonChip's worker exits on
                # CANCEL, which lands here.
                self._end_for_client(job, ResultCode.CANCELLED, "cancelled by client", out)
            elif self.draining:
                self._end_for_client(
                    job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                )
            elif job.attempts < job.max_attempts and self._pick_worker(job.run.pipeline)[1]:
                self.stats.requeued += 1
                out.append(
                    Log(
                        "job_requeued",
                        w.id,
                        {"attempt": job.attempts, "max_attempts": job.max_attempts},
                    )
                )
                worker, _ = self._pick_worker(job.run.pipeline)
                if worker is not None:
                    self._dispatch(job, worker, out)
                else:
                    self._enqueue(job)  # accepted work: may exceed queue_limit
            else:
                self._end_for_client(
                    job,
                    ResultCode.WORKER_WENT_AWAY,
                    f"the worker went away (attempt {job.attempts} of {job.max_attempts})",
                    out,
                )
        self._fail_unserved(out)

    def _fail_unserved(self, out: list[Action]) -> None:
        """Queued jobs whose pipeline no connected worker serves any more get NO_CAPACITY.

        The contract answers a new RUN for such a pipeline NO_CAPACITY at once;
        jobs already waiting get the same answer rather than waiting forever.
        """
        for pipeline in list(self._queues):
            if self._pick_worker(pipeline)[1]:
                continue
            heap = self._queues.pop(pipeline)
            for _, _, job in sorted(heap):
                if job.state is not _State.QUEUED:
                    self._dead_in_queues -= 1
                    continue
                self._queued -= 1
                self._set_done(job)
                self._end_for_client(
                    job,
                    ResultCode.NO_CAPACITY,
                    f"no worker serves pipeline {pipeline!r} any more",
                    out,
                )

    # -- dispatch and queue ------------------------------------------------------

    def _pick_worker(self, pipeline: str) -> tuple[_Conn | None, bool]:
        """The least-loaded worker with a free slot serving `pipeline`, and whether any serves it.

        Load is busy/capacity; among equals the least recently used wins,
        which is round robin. Within a batch the worker the last RUN went to
        is kept while it is within Limits.dispatch_batch_slack of that.
        """
        best: _Conn | None = None
        best_used = 0
        served = False
        for w in self._worker_list:
            if w.pipelines is not None and pipeline not in w.pipelines:
                continue  # w.serves(pipeline), inline: this runs per worker per RUN
            served = True
            used = w.busy + w.resting
            if used >= w.capacity:
                continue
            if best is None:
                best = w
                best_used = used
                continue
            lhs = used * best.capacity
            rhs = best_used * w.capacity
            if lhs < rhs or (lhs == rhs and w.last_used < best.last_used):
                best = w
                best_used = used
        stay = self._batch_worker
        if best is not None and stay is not None and stay is not best and stay.serves(pipeline):
            used = stay.busy + stay.resting
            if used < stay.capacity and (
                (used - self._batch_slack * stay.capacity) * best.capacity
                <= (best.busy + best.resting) * stay.capacity
            ):
                return stay, served
        return best, served

    def end_batch(self) -> None:
        """The I/O layer has written out what the input so far produced (once
        per event-loop turn): from now on RUNs are a new batch, with no pull
        towards the worker the last one went to (Limits.dispatch_batch_slack)."""
        self._batch_worker = None

    def _dispatch(self, job: _Job, w: _Conn, out: list[Action]) -> None:
        if w.codec is not Codec.MSGPACK and not can_carry(job.run.variables, w.codec):
            self._end_for_client(
                job,
                ResultCode.BAD_PACKET,
                f"the variables cannot be carried to a {w.codec.value} worker "
                f"({payload_kind(job.run.variables)})",
                out,
            )
            return
        wcookie = self._next_wcookie()
        job.state = _State.RUNNING
        job.worker = w
        job.wcookie = wcookie
        job.attempts += 1
        w.running[wcookie] = job
        w.busy += 1
        self._use += 1
        w.last_used = self._use
        self._running += 1
        self.stats.dispatched += 1
        if self._batch_slack:
            self._batch_worker = w
        out.append(Send(w.id, Run(wcookie, job.run.pipeline, job.run.variables)))

    def _next_wcookie(self) -> bytes:
        """A cookie no other attempt of any job has had in this broker's life."""
        at = self._wcookie_at
        if at == len(self._wcookies):
            self._wcookies = self._wcookie_blob()
            at = 0
        self._wcookie_at = at + 16
        return self._wcookies[at : at + 16]

    def _wcookie_blob(self) -> bytes:
        """The next batch of cookies, sequence numbers 256 * batch .. + 255."""
        stem = self._wcookie_prefix + self._wcookie_batch.to_bytes(7, "big") + b"\x00"
        self._wcookie_batch += 1
        blob = bytearray(stem * _WCOOKIE_BATCH)
        blob[15::16] = _LOW_BYTES
        return bytes(blob)

    def _release_slot(self, w: _Conn, job: _Job) -> None:
        w.busy -= 1
        self._running -= 1
        job.worker = None
        job.wcookie = None

    def _enqueue(self, job: _Job) -> None:
        job.state = _State.QUEUED
        heap = self._queues.setdefault(job.run.pipeline, [])
        heapq.heappush(heap, (-job.run.priority, job.seq, job))
        self._queued += 1

    def _unqueue(self, job: _Job) -> None:
        """Remove a queued job lazily: its heap entry is skipped when reached.

        Dead entries hold their job's variables, so they are not left to pile
        up: an empty queue drops every heap, and a queue with more dead entries
        than live ones (past a small floor) is rebuilt, which is amortised O(1).
        """
        self._set_done(job)
        self._queued -= 1
        if not self._queued:
            self._queues.clear()
            self._dead_in_queues = 0
            return
        self._dead_in_queues += 1
        if self._dead_in_queues > self._queued:
            self._compact_queues()

    def _compact_queues(self) -> None:
        for pipeline, heap in list(self._queues.items()):
            live = [e for e in heap if e[2].state is _State.QUEUED]
            if live:
                heapq.heapify(live)
                self._queues[pipeline] = live
            else:
                del self._queues[pipeline]
        self._dead_in_queues = 0

    def _fill(self, w: _Conn, out: list[Action]) -> None:
        """Give a worker with free slots the best queued jobs it serves."""
        if not self._queued:
            return
        while w.busy + w.resting < w.capacity and self._queued:
            best_heap: list[tuple[int, int, _Job]] | None = None
            names = self._queues.keys() if w.pipelines is None else w.pipelines
            for name in list(names):
                heap = self._queues.get(name)
                if heap is None:
                    continue
                while heap and heap[0][2].state is not _State.QUEUED:
                    heapq.heappop(heap)
                    self._dead_in_queues -= 1
                if not heap:
                    del self._queues[name]
                    continue
                if best_heap is None or heap[0] < best_heap[0]:
                    best_heap = heap
            if best_heap is None:
                return
            _, _, job = heapq.heappop(best_heap)
            if not best_heap:
                del self._queues[job.run.pipeline]
            self._queued -= 1
            self._dispatch(job, w, out)

    # -- endings ------------------------------------------------------------------

    def _end_for_client(self, job: _Job, rc: ResultCode, why: str, out: list[Action]) -> None:
        """End a job that holds no slot, answering its client if it is owed an answer."""
        self._set_done(job)
        _count(self.stats.completed, rc)
        self.latency.observe(self._now - job.accepted_at)
        self._deliver(job, Result(job.cookie, rc, why), out)
        self._forget(job)

    def _deliver(self, job: _Job, result: Result, out: list[Action]) -> None:
        """The one place a job's terminal RESULT goes to its client."""
        if job.owed and job.client is not None:
            job.owed = False
            self._answer(job.client, result, out)

    def _forget(self, job: _Job) -> None:
        if job.client is not None and job.client.jobs.get(job.cookie) is job:
            del job.client.jobs[job.cookie]

    def _cancel_on_worker(self, job: _Job, out: list[Action]) -> None:
        job.cancel_requested = True
        if job.worker is not None and job.wcookie is not None:
            out.append(Send(job.worker.id, Cancel(job.wcookie)))

    # -- time -----------------------------------------------------------------------

    def _add_deadline(
        self, at: float, kind: _Deadline, target: _Job | _Conn, out: list[Action]
    ) -> None:
        self._seq += 1
        heapq.heappush(self._deadlines, (at, self._seq, kind, target))
        if isinstance(target, _Job):
            target.deadlines += 1
        if self._wake_at is None or at < self._wake_at:
            self._wake_at = at
            out.append(Wake(at))

    def tick(self, now: float) -> list[Action]:
        """Fire every deadline that has passed; Wake for the next one."""
        self._now = now
        out: list[Action] = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, kind, target = heapq.heappop(dl)
            if isinstance(target, _Conn):
                if self._workers.get(target.id) is target:  # still connected
                    target.resting -= 1
                    self._fill(target, out)
                continue
            job = target
            if job.state is _State.DONE:
                self._dead_deadlines -= 1
                continue
            job.deadlines -= 1
            if job.abandoned:
                continue
            if kind is _Deadline.TIMEOUT:
                self._timeout(job, out)
            elif job.state is _State.RUNNING:
                # The worker has not answered the CANCEL in time: answer for
                # it. It keeps the slot until it answers or leaves.
                job.abandoned = True
                _count(self.stats.completed, ResultCode.CANCELLED.value)
                self.latency.observe(now - job.accepted_at)
                self._deliver(
                    job, Result(job.cookie, ResultCode.CANCELLED, "cancelled by client"), out
                )
                self._forget(job)
        if dl and 2 * self._dead_deadlines > len(dl):
            self._compact_deadlines()
        self._wake_at = dl[0][0] if dl else None
        if self._wake_at is not None:
            out.append(Wake(self._wake_at))
        return out

    def _set_done(self, job: _Job) -> None:
        """A job has ended: its deadline entries are dead (see _compact_deadlines)."""
        job.state = _State.DONE
        if job.deadlines:
            self._dead_deadlines += job.deadlines
            job.deadlines = 0
            if 2 * self._dead_deadlines > len(self._deadlines):
                # More dead entries than live ones: rebuilding costs O(heap)
                # once per heap/2 endings, so O(1) amortised per job.
                self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Drop the entries of ended jobs: a job that finishes well before its
        timeout must not stay in memory (with its variables) until then.

        In place, so a caller iterating the heap (tick) keeps a valid list.
        """
        dl = self._deadlines
        if self._dead_deadlines == len(dl):
            dl.clear()
        else:
            dl[:] = [e for e in dl if not (isinstance(e[3], _Job) and e[3].state is _State.DONE)]
            heapq.heapify(dl)
        self._dead_deadlines = 0

    def _timeout(self, job: _Job, out: list[Action]) -> None:
        why = f"timed out after {job.run.timeout_ms} ms"
        if job.state is _State.QUEUED:
            self._unqueue(job)
            self._end_for_client(job, ResultCode.TIMEOUT, why, out)
            return
        # Running: answer now, tell the worker; the slot stays busy until it answers.
        job.abandoned = True
        _count(self.stats.completed, ResultCode.TIMEOUT.value)
        self.latency.observe(self._now - job.accepted_at)
        self._deliver(job, Result(job.cookie, ResultCode.TIMEOUT, why), out)
        self._forget(job)
        if not job.cancel_requested:
            self._cancel_on_worker(job, out)

    # -- shutdown ---------------------------------------------------------------------

    def begin_drain(self, now: float | None = None) -> list[Action]:
        """Stop accepting: queued jobs are answered BROKER_WENT_AWAY, running ones go on.

        `now` times those answers for the latency histogram; without it they
        are timed at the last event the switchboard saw.
        """
        if now is not None:
            self._now = now
        self.draining = True
        out: list[Action] = []
        for heap in self._queues.values():
            for _, _, job in sorted(heap):
                if job.state is _State.QUEUED:
                    self._set_done(job)
                    self._end_for_client(
                        job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                    )
        self._queues.clear()
        self._queued = 0
        self._dead_in_queues = 0
        return out

    def finish(self, now: float | None = None) -> list[Action]:
        """End the drain: every job still running is answered BROKER_WENT_AWAY, all close."""
        out: list[Action] = []
        if not self.draining:
            out.extend(self.begin_drain(now))
        elif now is not None:
            self._now = now
        for w in list(self._workers.values()):
            for job in sorted(w.running.values(), key=lambda j: j.seq):
                self._release_slot(w, job)
                if job.abandoned:
                    self._set_done(job)
                    self._forget(job)
                else:
                    self._end_for_client(
                        job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                    )
            w.running.clear()
        for conn in list(self._conns):
            out.append(Close(conn, "broker shutdown"))
        return out


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _cookie_of(packet: Packet) -> bytes | None:
    return getattr(packet, "cookie", None)
