"""The switchboard, sans-IO: the board that composes the routing rules.

It owns every routing rule of PROTOCOL.md section 5 and the public API the
broker drives. It never awaits, reads a socket, logs or reads the clock: the
broker passes events in (`connect`, `receive`, `receive_all`, `disconnect`,
`tick`, `begin_drain`, `finish`) with the current time, and gets back a list
of actions (actions.py) to apply in order. The board itself owns the packet
switch, answering a peer in the form it understands, a client's RUN and
CANCEL, a worker's REGISTER and RESULT, a job's endings and drain; it
composes roles.py (first packet, HELLO, authentication, admin), dispatch.py
(workers, picking one, queues, worker cookies) and deadlines.py (the timer
heap), all working on the records in state.py.

Routing model (decisions recorded in docs/protocol.md):

- A cookie names one job across every connection (PROTOCOL.md section 7: it
  is the job's capability): live or retained, a RUN reusing it is
  COOKIE_COLLISION; only the connections that sent the RUN or ATTACHed to
  the job can CANCEL it. (It used to be per client; docs/durability.md.)
- With `durable=True` (a journal behind the broker) every change of a job's
  state is also a `Journal` action, accepted jobs wait for a worker of their
  pipeline instead of NO_CAPACITY, a drain keeps the queue for the next
  start, and `restore` brings back what the journal kept (docs/durability.md).
- Each attempt of a job on a worker gets a fresh broker-made cookie, so a late
  RESULT from an earlier attempt (or from a worker we gave up on) can never be
  mistaken for the current one: it is dropped and counted.
- A job holds its worker's slot until that worker answers or leaves, even
  after the client was answered (TIMEOUT, CANCELLED): the worker is still
  busy with it, so counting the slot free would overload the worker.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Final

from .actions import (
    J_ACCEPT,
    J_DISPATCH,
    J_END,
    J_REQUEUE,
    Action,
    Close,
    Journal,
    Log,
    Send,
)
from .codecs import can_carry, payload_kind, payload_size
from .deadlines import Deadlines
from .dispatch import Dispatcher
from .guard import check_register, pipeline_too_long, registered_fields, utf8_over
from .limits import Limits, ListenerRole
from .packets import (
    Accepted,
    Attach,
    BadPacket,
    Cancel,
    Codec,
    Drain,
    Hello,
    Job,
    JobState,
    Packet,
    Ping,
    Pong,
    Progress,
    Raw,
    Register,
    Result,
    ResultCode,
    Return,
    Role,
    Run,
    Shutdown,
    Started,
    Status,
    Unsupported,
    for_legacy,
)
from .retention import Ended, Retained
from .roles import Refusal, assign_role, status_snapshot
from .state import Latency, Stats, _Conn, _count, _Deadline, _Ends, _Job, _State

# A module constant, so the compiled code compares with a C static, not an enum lookup.
_OK: Final = ResultCode.OK
# Pipelines whose endings are counted by name (the dashboard's per-pipeline
# done/failed); with a journal a RUN may name any pipeline, so past this many
# names the rest are counted together under None, keeping memory bounded.
PIPELINES_COUNTED: Final = 1024
# The most recent failed jobs kept for the dashboard, their error and stack
# trace clipped (FAILURE_TEXT_CHARS, FAILURE_TRACE_LINES): a few hundred KiB at most.
FAILURES_KEPT: Final = 50
FAILURE_TEXT_CHARS: Final = 4096
FAILURE_TRACE_LINES: Final = 64


class Restored:
    """A job the journal kept, as the broker hands it to `restore` (board times)."""

    __slots__ = ("attempts", "crashes", "deadline", "max_attempts", "run", "seq", "was_running")

    def __init__(
        self,
        run: Run,
        seq: int,
        max_attempts: int,
        attempts: int,
        crashes: int,
        was_running: bool,
        deadline: float | None,
    ) -> None:
        self.run = run
        self.seq = seq
        self.max_attempts = max_attempts
        self.attempts = attempts
        self.crashes = crashes
        self.was_running = was_running
        self.deadline = deadline


class Switchboard:
    def __init__(
        self, limits: Limits, cookie_prefix: bytes = bytes(8), durable: bool = False
    ) -> None:
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
        self._max_pipeline_bytes = limits.max_pipeline_name_bytes
        self.stats = Stats()
        self.latency = Latency()
        # Ended jobs by pipeline (None: past PIPELINES_COUNTED names), and the
        # last FAILURES_KEPT that did not end OK, newest last (the dashboard).
        self.pipeline_ends: dict[str | None, _Ends] = {}
        self.failures: deque[Ended] = deque(maxlen=FAILURES_KEPT)
        # A journal keeps what this board decides (docs/durability.md).
        self.durable = durable
        # Why the journal cannot be written now (None: it can): new RUNs
        # get NO_CAPACITY with this reason until it clears.
        self.journal_trouble: str | None = None
        # Every live job by its cookie (section 7: one namespace), and the
        # ended ones whose RESULT is kept.
        self.jobs: dict[bytes, _Job] = {}
        self.retained = Retained(
            limits.result_ttl_s, limits.result_max, limits.result_max_bytes, durable
        )
        # The time of the event being handled, for the latency of jobs ended
        # deep in a call chain that is not handed `now`.
        self._now = 0.0
        self.draining = False
        self._conns: dict[int, _Conn] = {}
        self._heartbeat_ms = limits.heartbeat_ms
        # The last job sequence number handed out; an int, since next() on an
        # itertools.count is a generic call from compiled code.
        self._seq = 0
        # The parts the board composes: native classes, so under mypyc each
        # call between them is a direct C call.
        self.deadlines = Deadlines()
        self.dispatcher = Dispatcher(
            cookie_prefix, limits.dispatch_batch_slack, self.stats, self.deadlines
        )

    # -- introspection (tests, status, chaos checks) -------------------------

    @property
    def queue_depth(self) -> int:
        return self.dispatcher.queued

    @property
    def running(self) -> int:
        """Jobs holding a worker slot."""
        return self.dispatcher.running

    @property
    def payload_bytes(self) -> int:
        """The bytes of live jobs' variables (the payload budgets)."""
        return self.deadlines.payload_bytes

    @property
    def live_jobs(self) -> int:
        """Jobs the broker still tracks, queued or running (the route table's size)."""
        return self.dispatcher.queued + self.dispatcher.running

    def slots(self, conn: int) -> tuple[int, int]:
        """(capacity, busy) of a worker connection."""
        c = self._conns[conn]
        return c.capacity, c.busy

    def workers(self) -> list[int]:
        return list(self.dispatcher.workers)

    def job_cookie(self, conn: int, wcookie: bytes) -> bytes | None:
        """The job cookie behind the cookie a worker connection got its RUN with, while
        it runs there (None otherwise)."""
        c = self._conns.get(conn)
        job = None if c is None else c.running.get(wcookie)
        return None if job is None else job.run.cookie

    def knows(self, cookie: bytes) -> bool:
        """Whether a job by this cookie is live here, or its RESULT is retained."""
        return cookie in self.jobs or cookie in self.retained

    def adopt(self, run: Run, ended: Ended | None, now: float) -> list[Action]:
        """Take on a job another broker accepted (a cluster's other node), so that an
        ATTACH here finds it: with `ended`, its RESULT is retained as if it had ended
        here; without, it is queued as a job of no client, with one attempt and no
        deadline of its own (its own broker enforces those), and dispatched at once.
        Nothing is journaled for it: it is another broker's. A cookie the board knows
        already is left alone."""
        out: list[Action] = []
        cookie = run.cookie
        if self.knows(cookie):
            return out
        self._now = now
        if ended is not None:
            self.retained.put(cookie, ended, out)
            return out
        self._seq += 1
        job = _Job(self._seq, None, run, 1)
        job.accepted_at = now
        self.jobs[cookie] = job
        self.dispatcher.enqueue(job)
        for w in list(self.dispatcher.workers.values()):
            self._fill(w, out)
        return out

    def served_pipelines(self, conn: int) -> frozenset[str] | None:
        """The pipelines a worker connection serves; None: every pipeline."""
        pipelines = self._conns[conn].pipelines
        return None if pipelines is None else frozenset(pipelines)

    def connections(self) -> list[_Conn]:
        """Every connection the board knows (the dashboard reads them; never mutate)."""
        return list(self._conns.values())

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
        if c.role is None:
            verdict = assign_role(c, packet, self._heartbeat_ms, out, self.limits)
            if type(verdict) is Refusal:
                self._answer(c, verdict.result, out, force=True)
                self._close(c, verdict.why, out)
                if verdict.log is not None:
                    out.append(verdict.log)
                return
            if not verdict:
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
                # The first HELLO was consumed by roles.assign_role.
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
            case Attach(cookie, wait):
                if c.role is Role.CLIENT:
                    self._attach(c, cookie, wait, now, out)
                else:
                    self._wrong_role(c, "ATTACH", out)
            case Accepted() | Job():
                self._wrong_role(c, type(packet).__name__.upper(), out)
            case Status():
                if c.role is Role.ADMIN:
                    self._status(c, out)
                else:
                    self._wrong_role(c, "STATUS", out)
            case Drain() | Return():
                if c.role is Role.WORKER and c.hello:
                    self._drain_worker(c, packet, out)
                else:
                    self._wrong_role(c, type(packet).__name__.upper(), out)
            case Shutdown():
                self._unsupported(c, "SHUTDOWN", None, out)
            case Unsupported(ptype, cookie):
                self._unsupported(c, ptype, cookie, out)
            case BadPacket():
                self._bad_packet(c, packet, now, out)

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
        snapshot = status_snapshot(self._conns, self.dispatcher)
        snapshot["retained"] = len(self.retained)
        snapshot["journal"] = {"durable": self.durable, "trouble": self.journal_trouble}
        return snapshot

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
        # Length first: a name of up to a quarter of the limit always fits, and
        # the common case makes no call out of this (compiled) module.
        if len(run.pipeline) * 4 > self._max_pipeline_bytes and utf8_over(
            run.pipeline, self._max_pipeline_bytes
        ):
            self._reject(c, run, ResultCode.BAD_PACKET, pipeline_too_long(self.limits), out)
            return
        if run.cookie in self.jobs or run.cookie in self.retained:
            self._reject(c, run, ResultCode.COOKIE_COLLISION, "cookie is already in use", out)
            return
        if self.journal_trouble is not None:
            why = f"the journal cannot be written: {self.journal_trouble}"
            self._reject(c, run, ResultCode.NO_CAPACITY, why, out)
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
        size = payload_size(run.variables)
        if size and self._over_budget(c, run, size, out):
            return
        worker, served = self.dispatcher.pick(run.pipeline)
        if not served and not self.durable:
            self._reject(
                c, run, ResultCode.NO_CAPACITY, f"no worker serves pipeline {run.pipeline!r}", out
            )
            return
        if worker is None and self.dispatcher.queued >= self._queue_limit:
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
        if size:
            job.payload_bytes = size
            job.payer = c
            c.payload_bytes += size
            self.deadlines.payload_bytes += size
        c.jobs[run.cookie] = job
        self.jobs[run.cookie] = job
        self.stats.accepted += 1
        job.accepted_at = now
        if run.timeout_ms is not None:
            job.deadline = now + run.timeout_ms / 1000.0
            self.deadlines.add(job.deadline, _Deadline.TIMEOUT, job, out)
        if self.durable:
            out.append(Journal(J_ACCEPT, run.cookie, run, job.seq, 0, attempts, job.deadline, now))
        if c.hello and "accepted" in c.features and (run.ack or "ack" not in c.features):
            # Before anything else about the job; with a journal the broker
            # holds it until the row above is committed. A connection that
            # also asked for `ack` gets it only for the RUNs that carry `ack`
            # (docs/protocol.md: an SDK's run() waits for the RESULT alone).
            out.append(Send(c.id, Accepted(run.cookie)))
        if worker is not None:
            self._dispatch(job, worker, out)
        else:
            self.dispatcher.enqueue(job)

    def _over_budget(self, c: _Conn, run: Run, size: int, out: list[Action]) -> bool:
        """Refuse a RUN whose variables would pass a payload budget (NO_CAPACITY)."""
        limits = self.limits
        if c.payload_bytes + size > limits.max_payload_bytes_per_client:
            why = (
                f"max_payload_bytes_per_client ({limits.max_payload_bytes_per_client}) reached: "
                f"this client's queued and running jobs hold {c.payload_bytes} bytes"
            )
        elif self.deadlines.payload_bytes + size > limits.max_payload_bytes_total:
            why = f"max_payload_bytes_total ({limits.max_payload_bytes_total}) reached"
        else:
            return False
        self._reject(c, run, ResultCode.NO_CAPACITY, why, out)
        return True

    def _cancel(self, c: _Conn, cookie: bytes, now: float, out: list[Action]) -> None:
        job = c.jobs.get(cookie)
        if job is None:
            self._answer(
                c, Result(cookie, ResultCode.COOKIE_NOT_FOUND, "no live job with this cookie"), out
            )
            return
        self.stats.cancels += 1
        if job.state is _State.QUEUED:
            self.dispatcher.unqueue(job)
            self._end_for_client(job, ResultCode.CANCELLED, "cancelled by client", out)
        elif not job.cancel_requested:
            self._cancel_on_worker(job, out)
            self.deadlines.add(
                now + self.limits.cancel_grace_ms / 1000.0, _Deadline.CANCEL_GRACE, job, out
            )

    def _client_gone(self, c: _Conn, out: list[Action]) -> None:
        """Queued jobs are dropped, running ones cancelled; detached jobs run on,
        and so do jobs another connection has ATTACHed to (an attacher leaving
        never cancels)."""
        for job in c.jobs.values():
            if job.client is not c:
                if job.attached is not None and c in job.attached:
                    job.attached.remove(c)
                continue
            job.client = None
            job.owed = False
            if job.run.detach or job.attached or (self.durable and self.draining):
                continue  # (a journal's drain: the job waits for the next start)
            self.stats.dropped += 1
            if job.state is _State.QUEUED:
                self.dispatcher.unqueue(job)
                self._conclude(job, Result(job.cookie, ResultCode.CANCELLED, _CLIENT_LEFT), out)
            elif job.state is _State.RUNNING:
                job.abandoned = True
                self._conclude(job, Result(job.cookie, ResultCode.CANCELLED, _CLIENT_LEFT), out)
                if not job.cancel_requested:
                    self._cancel_on_worker(job, out)
        c.jobs.clear()

    def _attach(self, c: _Conn, cookie: bytes, wait: bool, now: float, out: list[Action]) -> None:
        """ATTACH (section 7): join a live job's clients, collect a retained
        RESULT, or (`wait` false) answer one JOB packet."""
        job = self.jobs.get(cookie)
        if job is not None:
            if not wait:
                state = JobState.QUEUED if job.state is _State.QUEUED else JobState.RUNNING
                out.append(Send(c.id, Job(cookie, state, job.run.pipeline, job.attempts)))
                return
            if job.client is c:
                # The connection that sent the RUN: if it was detached, it
                # now wants the RESULT after all; either way, exactly one.
                job.owed = True
                return
            if job.attached is not None and c in job.attached:
                return  # already one of its clients: still owed exactly one RESULT
            if job.attached is None:
                job.attached = [c]
            else:
                job.attached.append(c)
            c.jobs[cookie] = job
            self.stats.attached += 1
            return
        ended = self.retained.get(cookie, now)
        if ended is None:
            why = "no job with this cookie (unknown, or its result has expired)"
            self._answer(c, Result(cookie, ResultCode.COOKIE_NOT_FOUND, why), out)
            return
        self.stats.collected += 1
        if wait:
            self._answer(c, ended.result, out)
        else:
            result = ended.result
            out.append(
                Send(
                    c.id,
                    Job(
                        cookie,
                        JobState.ENDED,
                        ended.pipeline,
                        ended.attempts,
                        result.rc,
                        result.error,
                    ),
                )
            )

    # -- workers ------------------------------------------------------------------

    def _register(self, c: _Conn, reg: Register, out: list[Action]) -> None:
        too_big = check_register(reg, c.pipelines, self.limits)
        if too_big is not None:
            self._bad_packet(c, BadPacket("REGISTER", None, too_big), self._now, out)
            return
        before = c.pipelines
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
            narrowed = c.pipelines is None and c.id in self.dispatcher.workers
            c.pipelines = (c.pipelines or set()) | set(reg.pipelines)
        if not c.draining:  # a draining worker stays out of dispatch
            self.dispatcher.add_worker(c)
        out.append(
            Log(
                "worker_registered",
                c.id,
                registered_fields(c.capacity, before, c.pipelines),
            )
        )
        self._fill(c, out)
        if narrowed:
            self._fail_unserved(out, None)  # jobs only this worker served must not wait forever

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
        if res.rc is _OK:
            w.done += 1
        else:
            w.failed += 1
        self.dispatcher.release(w, job)
        self.deadlines.set_done(job)
        if job.abandoned:
            self.stats.abandoned_results += 1
        else:
            _count(self.stats.completed, res.rc)  # a StrEnum: the same key as its text
            self.latency.observe(now - job.accepted_at)
            self._deliver(
                job, Result(job.cookie, res.rc, res.error, res.stacktrace, res.result), out
            )
        self._forget(job)
        if not w.hello and w.codec is Codec.JSON and self._slot_rest_s > 0:
            # ReasonChip's worker (JSON, no HELLO) sends its RESULT a few loop
            # turns before it drops the finished task from its own table, and
            # shuts down on a RUN that arrives in between (docs/protocol.md,
            # Legacy workers). A msgpack worker without HELLO is not
            # ReasonChip's: its slot is refilled at once, as ours are.
            w.resting += 1
            self.dispatcher.track(w)
            self.deadlines.add(now + self._slot_rest_s, _Deadline.SLOT_REUSE, w, out)
        self._fill(w, out)

    def _forward_progress(
        self, w: _Conn, wcookie: bytes, packet: Started | Progress, out: list[Action]
    ) -> None:
        job = w.running.get(wcookie)
        if job is None or job.abandoned:
            return
        if job.owed and job.client is not None and job.client.hello:
            self._progress_to(job.client, job.cookie, packet, out)
        if job.attached is not None:
            for client in job.attached:
                self._progress_to(client, job.cookie, packet, out)

    @staticmethod
    def _progress_to(
        client: _Conn, cookie: bytes, packet: Started | Progress, out: list[Action]
    ) -> None:
        if isinstance(packet, Started):
            if "started" in client.features:
                out.append(Send(client.id, Started(cookie)))
        elif "progress" in client.features and can_carry(packet.result, client.codec):
            out.append(Send(client.id, Progress(cookie, packet.result)))

    def _worker_gone(self, w: _Conn, out: list[Action]) -> None:
        """Each job re-queued while attempts allow, else WORKER_WENT_AWAY (section 5)."""
        self.dispatcher.remove_worker(w)
        jobs = sorted(w.running.values(), key=lambda j: j.seq)
        w.running.clear()
        for job in jobs:
            self.dispatcher.release(w, job)
            if job.abandoned:
                self.deadlines.set_done(job)
                self._forget(job)  # over already (timed out, client gone)
            elif job.cancel_requested:
                # Cancelled jobs are never re-run; ReasonChip's worker exits on
                # CANCEL, which lands here.
                self._end_for_client(job, ResultCode.CANCELLED, "cancelled by client", out)
            elif self.draining and not self.durable:
                self._end_for_client(
                    job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                )
            elif job.attempts < job.max_attempts and (
                self.durable or self.dispatcher.served(job.run.pipeline)
            ):
                self.stats.requeued += 1
                out.append(
                    Log(
                        "job_requeued",
                        w.id,
                        {"attempt": job.attempts, "max_attempts": job.max_attempts},
                    )
                )
                if self.durable:
                    out.append(Journal(J_REQUEUE, job.cookie, attempts=job.attempts))
                worker = None if self.draining else self.dispatcher.pick(job.run.pipeline)[0]
                if worker is not None:
                    self._dispatch(job, worker, out)
                else:
                    self.dispatcher.enqueue(job)  # accepted work: may exceed queue_limit
            else:
                self._end_for_client(
                    job,
                    ResultCode.WORKER_WENT_AWAY,
                    f"the worker went away (attempt {job.attempts} of {job.max_attempts})",
                    out,
                )
        self._fail_unserved(out, w.pipelines)

    def _drain_worker(self, w: _Conn, packet: Drain | Return, out: list[Action]) -> None:
        """DRAIN: the worker is stopping: no more RUNs reach it, its running
        jobs run on, and the DRAIN is echoed. RETURN: a RUN it did not start,
        given to another worker without counting the attempt; it drains the
        worker too, so that a RUN never goes back and forth (docs/protocol.md,
        Draining workers)."""
        if not w.draining:
            w.draining = True
            self.dispatcher.remove_worker(w)  # no more picks, no more fills
            out.append(Log("worker_draining", w.id, {"running": len(w.running)}))
            self._fail_unserved(out, w.pipelines)
        if type(packet) is not Return:
            # The echo: every RUN sent to this worker before it is ahead of it
            # on the wire, so once it arrives the worker has all it must return.
            out.append(Send(w.id, Drain()))
            return
        job = w.running.get(packet.cookie)
        if job is None:
            self.stats.results_dropped += 1
            out.append(Log("result_dropped", w.id, {"reason": "RETURN of an unknown cookie"}))
            return
        del w.running[packet.cookie]
        self.dispatcher.release(w, job)
        job.attempts -= 1  # it never ran
        if job.abandoned:
            self.deadlines.set_done(job)
            self._forget(job)
        elif job.cancel_requested:
            self._end_for_client(job, ResultCode.CANCELLED, "cancelled by client", out)
        elif self.draining and not self.durable:
            self._end_for_client(
                job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
            )
        else:
            if self.durable:
                out.append(Journal(J_REQUEUE, job.cookie, attempts=job.attempts))
            worker, served = self.dispatcher.pick(job.run.pipeline)
            if worker is not None and not self.draining:
                self._dispatch(job, worker, out)
            elif served or self.durable:
                self.dispatcher.enqueue(job)  # accepted work: may exceed queue_limit
            else:
                self._end_for_client(
                    job,
                    ResultCode.NO_CAPACITY,
                    f"no worker serves pipeline {job.run.pipeline!r} any more",
                    out,
                )

    def _fail_unserved(self, out: list[Action], candidates: set[str] | None) -> None:
        """Queued jobs whose pipeline no connected worker serves any more get NO_CAPACITY.

        The contract answers a new RUN for such a pipeline NO_CAPACITY at once;
        jobs already waiting get the same answer rather than waiting forever.
        With a journal they wait for a worker of their pipeline instead.
        """
        if self.durable:
            return
        # Only `candidates` (None: every queued pipeline) can have lost their
        # last worker; the dispatcher knows who serves what in O(1).
        for pipeline in self.dispatcher.unserved(candidates):
            heap = self.dispatcher.queues.pop(pipeline)
            for _, _, job in sorted(heap):
                if job.state is not _State.QUEUED:
                    self.dispatcher.dead_in_queues -= 1
                    continue
                self.dispatcher.queued -= 1
                self.deadlines.set_done(job)
                self._end_for_client(
                    job,
                    ResultCode.NO_CAPACITY,
                    f"no worker serves pipeline {pipeline!r} any more",
                    out,
                )

    # -- dispatch and queue ------------------------------------------------------

    def end_batch(self) -> None:
        """The I/O layer has written out what the input so far produced (once
        per event-loop turn): from now on RUNs are a new batch, with no pull
        towards the worker the last one went to (Limits.dispatch_batch_slack)."""
        self.dispatcher.end_batch()

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
        wcookie = self.dispatcher.assign(job, w)
        if self.durable:
            out.append(Journal(J_DISPATCH, job.cookie, attempts=job.attempts))
        out.append(Send(w.id, Run(wcookie, job.run.pipeline, job.run.variables)))

    def _fill(self, w: _Conn, out: list[Action]) -> None:
        """Give a worker with free slots the best queued jobs it serves."""
        dispatcher = self.dispatcher
        if not dispatcher.queued or self.draining or w.draining:
            return  # (draining with a journal: the queue waits for the next start)
        while True:
            job = dispatcher.take(w)
            if job is None:
                return
            self._dispatch(job, w, out)

    # -- endings ------------------------------------------------------------------

    def _end_for_client(self, job: _Job, rc: ResultCode, why: str, out: list[Action]) -> None:
        """End a job that holds no slot, answering its client if it is owed an answer."""
        self.deadlines.set_done(job)
        _count(self.stats.completed, rc)
        self.latency.observe(self._now - job.accepted_at)
        self._deliver(job, Result(job.cookie, rc, why), out)
        self._forget(job)

    def _deliver(self, job: _Job, result: Result, out: list[Action]) -> None:
        """The one place a job's terminal RESULT is decided and goes to its clients:
        the connection that sent the RUN and each that ATTACHed, once each.
        Its end is journaled first: the broker holds a RESULT until that is
        committed (docs/durability.md)."""
        self._conclude(job, result, out)
        if job.owed and job.client is not None:
            job.owed = False
            self._answer(job.client, result, out)
        attached = job.attached
        if attached is not None:
            job.attached = None
            for client in attached:
                if client.jobs.get(job.cookie) is job:
                    del client.jobs[job.cookie]
                self._answer(client, result, out)

    def _conclude(self, job: _Job, result: Result, out: list[Action]) -> None:
        """The job is over for its clients: journal its end, keep its RESULT."""
        if self.jobs.get(job.cookie) is job:
            del self.jobs[job.cookie]
        pipeline = job.run.pipeline
        ends = self.pipeline_ends.get(pipeline)
        if ends is None:
            ends = self._ends_of(pipeline)
        if result.rc is _OK:
            ends.done += 1
        else:
            ends.failed += 1
            self._failed(job, result)
        if self.durable:
            out.append(
                Journal(
                    J_END,
                    job.cookie,
                    job.run,
                    attempts=job.attempts,
                    at=self._now,
                    accepted_at=job.accepted_at,
                    result=result,
                )
            )
        elif not job.run.detach:
            return  # without a journal only detached jobs' results are kept
        self.retained.put(
            job.cookie,
            Ended(result, job.run.pipeline, job.attempts, job.accepted_at, self._now),
            out,
        )

    def _ends_of(self, pipeline: str) -> _Ends:
        """The counts of a pipeline's first ending (past the cap: the shared ones)."""
        counted = self.pipeline_ends
        key = pipeline if len(counted) < PIPELINES_COUNTED else None
        ends = counted.get(key)
        if ends is None:
            ends = counted[key] = _Ends()
        return ends

    def _failed(self, job: _Job, result: Result) -> None:
        """Keep a failed job's ending for the dashboard, its texts clipped."""
        error = result.error
        if error is not None and len(error) > FAILURE_TEXT_CHARS:
            error = error[:FAILURE_TEXT_CHARS] + "..."
        trace = result.stacktrace
        if trace is not None:
            trace = tuple(line[:FAILURE_TEXT_CHARS] for line in trace[-FAILURE_TRACE_LINES:])
        kept = Result(result.cookie, result.rc, error, trace)  # the payload is not kept
        self.failures.append(
            Ended(kept, job.run.pipeline, job.attempts, job.accepted_at, self._now)
        )

    def _forget(self, job: _Job) -> None:
        if job.client is not None and job.client.jobs.get(job.cookie) is job:
            del job.client.jobs[job.cookie]

    def _cancel_on_worker(self, job: _Job, out: list[Action]) -> None:
        job.cancel_requested = True
        if job.worker is not None and job.wcookie is not None:
            out.append(Send(job.worker.id, Cancel(job.wcookie)))

    # -- time -----------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Fire every deadline that has passed; Wake for the next one."""
        self._now = now
        out: list[Action] = []
        dl = self.deadlines.heap
        while dl and dl[0][0] <= now:
            _, _, kind, target = heapq.heappop(dl)
            if isinstance(target, _Conn):
                if self.dispatcher.workers.get(target.id) is target:  # still connected
                    target.resting -= 1
                    self.dispatcher.track(target)
                    self._fill(target, out)
                continue
            job = target
            if job.state is _State.DONE:
                self.deadlines.dead -= 1
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
        self.retained.expire(now, out)
        self.deadlines.rearm(out)
        return out

    def _timeout(self, job: _Job, out: list[Action]) -> None:
        why = f"timed out after {job.run.timeout_ms} ms"
        if job.state is _State.QUEUED:
            self.dispatcher.unqueue(job)
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
        if self.durable:
            return out  # the queue stays in the journal for the next start
        for heap in self.dispatcher.queues.values():
            for _, _, job in sorted(heap):
                if job.state is _State.QUEUED:
                    self.deadlines.set_done(job)
                    self._end_for_client(
                        job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                    )
        self.dispatcher.clear_queues()
        return out

    def finish(self, now: float | None = None) -> list[Action]:
        """End the drain: every job still running is answered BROKER_WENT_AWAY, all close."""
        out: list[Action] = []
        if not self.draining:
            out.extend(self.begin_drain(now))
        elif now is not None:
            self._now = now
        for w in list(self.dispatcher.workers.values()):
            for job in sorted(w.running.values(), key=lambda j: j.seq):
                self.dispatcher.release(w, job)
                if self.durable and not job.abandoned:
                    # Back to the queue for the next start, the attempt given
                    # back: a polite stop is not the job's fault.
                    job.attempts -= 1
                    out.append(Journal(J_REQUEUE, job.cookie, attempts=job.attempts))
                elif job.abandoned:
                    self.deadlines.set_done(job)
                    self._forget(job)
                else:
                    self._end_for_client(
                        job, ResultCode.BROKER_WENT_AWAY, "the broker is shutting down", out
                    )
            w.running.clear()
        for conn in list(self._conns):
            out.append(Close(conn, "broker shutdown"))
        return out

    # -- the journal ----------------------------------------------------------------

    def set_journal_trouble(self, reason: str | None) -> None:
        """The journal cannot be written (`reason`), or can again (None)."""
        self.journal_trouble = reason

    def restore(self, jobs: list[Restored], ended: list[Ended], now: float) -> list[Action]:
        """Bring back what the journal kept, before any peer connects.

        `jobs` in dispatch order; each is queued with its deadline, or ended
        TIMEOUT (deadline passed) or BROKER_WENT_AWAY (more than
        max_attempts_limit broker stops caught it running). `ended` are the
        retained results, oldest first.
        """
        self._now = now
        out: list[Action] = []
        for record in ended:
            if record.result.cookie is not None:
                self.retained.put(record.result.cookie, record, out)
        for r in jobs:
            run = r.run
            self._seq = max(self._seq, r.seq)
            job = _Job(r.seq, None, run, r.max_attempts)
            job.attempts = r.attempts
            job.crashes = r.crashes
            job.accepted_at = now  # latency of a recovered job counts from its recovery
            self.jobs[run.cookie] = job
            self.stats.recovered += 1
            if r.was_running:
                self.stats.reruns += 1
            if r.crashes > self._attempts_limit:
                why = (
                    f"the broker stopped {r.crashes} times while this job ran "
                    f"(max_attempts_limit {self._attempts_limit})"
                )
                self._end_for_client(job, ResultCode.BROKER_WENT_AWAY, why, out)
                continue
            if r.deadline is not None:
                if r.deadline <= now:
                    why = f"timed out after {run.timeout_ms} ms (while the broker was down)"
                    self._end_for_client(job, ResultCode.TIMEOUT, why, out)
                    continue
                job.deadline = r.deadline
                self.deadlines.add(r.deadline, _Deadline.TIMEOUT, job, out)
            self.dispatcher.enqueue(job)
        return out


_CLIENT_LEFT = "the client went away"


def restored_run(
    cookie: bytes,
    pipeline: str,
    variables: bytes | None,
    detach: bool,
    priority: int,
    timeout_ms: int | None,
) -> Run:
    """The RUN of a job read back from the journal (its payload as the Raw bytes it was)."""
    return Run(
        cookie,
        pipeline,
        None if variables is None else Raw(variables),
        detach,
        priority,
        timeout_ms,
        None,
    )
