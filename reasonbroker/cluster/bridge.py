"""The bridge between a node's two brokers and the cluster.

A node is two unchanged brokers (docs/cluster.md, "How a node is built"): the
client side, whose switchboard hands every accepted job to JetStream
(store.py) and dispatches it to one worker connection, the bridge's
**outbound** peer, which serves every pipeline; and the worker side, whose
switchboard gets its jobs from one client connection, the bridge's
**inbound** peer, which fetches them from the stream. Both peers speak the
ordinary protocol over Unix sockets private to the node.

Outbound (client side): a RUN only registers the job (the store published it
already); its RESULT is relayed when the node's subject brings it (the fast
path) or, for a job this node adopted for an ATTACH or whose publish was a
duplicate (a RUN sent again here after another node published it), when the
results bucket has it. Core NATS drops what is sent while a connection is down,
so the bucket is also asked for every waiting job when the node's connection
comes back, and for any job still waiting after a few seconds (`_recheck`).
A CANCEL writes CANCELLED to the bucket, first writer wins: if it wins the
cancel is announced to every node, else the result that won is relayed
instead, so the client always gets the job's one terminal RESULT.

Inbound (worker side): per pipeline that local workers serve, one fetch loop
keeps pull requests outstanding on the pipeline's durable consumers (one per
priority band) for `min(free slots, 128)` jobs each, so a job comes as soon as
it is published, and submits each as a RUN (the remaining deadline as its
timeout), the higher bands first. A job's
STARTED and PROGRESS go to its node's subject as they come. Its RESULT is
created in the results bucket (first writer wins: a job delivered twice,
after a node died or `ack_wait` passed, ends once; the loser's result is
dropped, and the one that won is sent to the job's node again, in case its
writer died before it could), sent to its node, and only then acked. A job the worker side
cannot run (no worker left, or the node is stopping) is nak'ed, so another
node takes it at once. Running jobs are kept from redelivery by an
`in_progress` every `ack_wait`/3. A job that several nodes' deaths caught
running (JetStream's delivery count above `max_attempts_limit` + 1) ends
BROKER_WENT_AWAY, as on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from ..core import protocol as p
from ..core.board import restored_run
from ..core.limits import Limits
from ..core.retention import Ended
from ..daemon.broker import Broker
from ..sdk.errors import BrokerConnectionError
from ..sdk.peer import Peer
from .requests import ERR_WRONG_LAST_SEQUENCE, PublishError, Requests
from .wire import (
    BANDS,
    CREATE_HEADER_BLOCK,
    EVENT_PROGRESS,
    EVENT_RESULT,
    EVENT_STARTED,
    JobMessage,
    Names,
    Outcome,
    decode_progress,
    key,
    pack,
    pack_value,
    progress_event,
    unpack,
)

_log = structlog.get_logger("reasonbroker.cluster")

FETCH_MAX: Final = 128  # jobs asked for per band at most (outstanding pull requests)
FETCH_WAIT_S: Final = 1.0  # a pull request's `expires`: it lingers this long for jobs
# A pull request not ended this long after its expiry was lost (a server failed over,
# the connection came back): its jobs are asked for again.
PULL_LOST_S: Final = 1.0
# How long a no-wait probe of a higher band may take to answer before a lower band's
# job runs anyway.
PROBE_WAIT_S: Final = 0.5
JS_API: Final = "$JS.API"  # the JetStream API's subject prefix (no domain)
SUPERVISE_S: Final = 0.2  # how often the local workers' pipelines and slots are read
# How often the cluster's known pipelines are read: a backstop, since a node announces a
# pipeline new to it on `Names.new_pipelines` (core NATS, best effort).
PIPELINES_POLL_S: Final = 2.0
OUTBOUND_CAPACITY: Final = 65_536  # the outbound peer's slots: the broker's clamp
CANCELLED_REMEMBERED: Final = 100_000
WHO_WAIT_S: Final = 0.5  # how long a JOB question waits for a node to claim the job
SURVEY_S: Final = 5.0  # how often the nodes are surveyed (status, metrics)
SURVEY_WAIT_S: Final = 0.3  # how long a survey collects answers
ADOPTED_POLL_S: Final = 1.0  # how often the bucket is asked for adopted jobs' results
ADOPTED_PIPELINE: Final = "(a job of another node)"  # what a JOB says of one not ended
EARLY_REMEMBERED: Final = 10_000
# A job's RESULT comes to its node's subject over core NATS, which drops what is sent
# while a connection is down (a nats-server lost): the bucket is asked for a job still
# waiting RECHECK_FIRST_S after it came, then after twice as long each time, at most
# RECHECK_MAX_S apart; and for every waiting job when the connection came back, and
# again RECONNECT_AGAIN_S later (the new server's interest reaches the others late).
RECHECK_FIRST_S: Final = 5.0
RECHECK_MAX_S: Final = 60.0
RECONNECT_AGAIN_S: Final = 2.0
LOOKUPS_AT_ONCE: Final = 64
# What the inbound peer asks of the worker side: its jobs' STARTED and PROGRESS,
# and their priority, deadline and attempts honoured.
INBOUND_FEATURES: Final = ("started", "progress", "priority", "timeout", "attempts")


@dataclass(slots=True)
class _Running:
    job: JobMessage
    msg: Any  # the nats Msg, acked once the job's end is in the bucket
    started: float
    last_tick: float


@dataclass(slots=True)
class _Puller:
    """One band's durable consumer, pulled through two inboxes of the node's connection.

    Lingering pull requests (`expires` FETCH_WAIT_S) are kept outstanding for the
    pipeline's free slots (`credit`: jobs asked for, neither delivered nor expired), so a
    job comes as soon as it is published and no request is spent on an empty band. A
    no-wait probe (the other inbox) asks a band what it has now, before a lower band's
    job runs, unless the band is `sure`: a probe answered while its lingering requests
    were outstanding at the server (they are ahead of the probe there, so every job of
    the band published since comes to them at once). What either brings is `held`
    until a slot takes it.

    Each request has a reply subject of its own under its inbox (`<inbox>.<n>`). A
    replicated consumer sends a delivery only once its quorum recorded it, and the
    408 of a request that expired meanwhile after its deliveries; it keeps that 408
    (with the request's unfilled count) per reply subject, so of several requests
    sharing one subject that expire while deliveries to it await their quorum, only the
    last one's 408 comes: the others' unfilled jobs would stay counted as asked for
    (nats-server's consumer.go, `waitingDeliveries`)."""

    band: str
    subject: str  # the consumer's next-message request subject
    inbox: str
    probe_inbox: str
    held: deque[Any] = field(default_factory=deque)
    credit: int = 0
    sure: bool = False  # meaningful while credit > 0
    asked_at: float = 0.0  # loop time of the last lingering request
    probe: asyncio.Future[None] | None = None  # the probe under way, done when answered
    probe_left: int = 0
    broken: str | None = None  # the consumer refused a request: ensure it again
    subs: list[Any] = field(default_factory=list)
    asks: int = 0  # requests sent (lingering and probes): the last one's reply token
    probe_reply: str = ""  # the reply subject of the probe under way

    def reply(self, inbox: str) -> str:
        """A reply subject of its own for the next request."""
        self.asks += 1
        return f"{inbox}.{self.asks}"

    def spent(self, n: int) -> None:
        """n of the jobs asked for came or will not: at none left, the band is unsure."""
        self.credit = max(0, self.credit - n)
        if self.credit == 0:
            self.sure = False


def _status(msg: Any) -> str | None:
    """A JetStream status message's code (404, 408, 409, ...), or None for a job (whose
    headers are then not parsed)."""
    if msg.data:
        return None
    headers = msg.headers
    if not headers:
        return None
    status: str | None = headers.get("Status")
    return status


@dataclass(slots=True)
class _Stats:
    fetched: int = 0
    duplicates_dropped: int = 0
    redelivered: int = 0
    nacked: int = 0
    relayed: int = 0
    went_away: int = 0
    cancels_seen: int = 0
    adopted: int = 0
    recovered: int = 0  # RESULTs found in the bucket for jobs whose event never came
    resent: int = 0  # publishes the stream called duplicates (a RUN sent again)
    pulls_lost: int = 0  # pull requests that never ended (asked for again)
    pipelines_read: int = 0  # reads of the pipelines bucket
    by_pipeline: dict[str, int] = field(default_factory=dict)


class Bridge:
    def __init__(
        self,
        nc: Any,
        js: Any,
        requests: Requests,
        results: Any,
        pipelines_kv: Any,
        names: Names,
        node: str,
        limits: Limits,
        ack_wait_s: float,
    ) -> None:
        self.nc = nc
        self.js = js
        self.requests = requests
        self.results = results
        self.pipelines_kv = pipelines_kv
        self.names = names
        self.node = node
        self.limits = limits
        self.ack_wait_s = ack_wait_s
        self.settled: set[bytes] = set()  # read by the store: ends that came from the cluster
        self.stats = _Stats()
        self._out: Peer | None = None
        self._in: Peer | None = None
        self._worker_side: Broker | None = None
        # Jobs the client side dispatched to the outbound peer: job cookie -> the cookie
        # of its RUN there (the switchboard gives each attempt a worker cookie), and back.
        self._mine: dict[bytes, bytes] = {}
        self._job_of: dict[bytes, bytes] = {}
        self._client_side: Broker | None = None
        self._adopted: set[bytes] = set()  # other nodes' jobs attached here, not ended yet
        self._early: OrderedDict[bytes, Outcome] = OrderedDict()  # results before their RUN
        # When to ask the bucket for a job of ours still waiting: (at, interval, cookie).
        self._rechecks: list[tuple[float, float, bytes]] = []
        self._running: dict[bytes, _Running] = {}
        self._by_pipeline: dict[str, int] = {}  # inbound jobs running per pipeline
        self._capacity: dict[str, int] = {}  # local workers' slots per pipeline
        self._cancelled: set[bytes] = set()
        self._cancel_order: deque[bytes] = deque()
        self._known: set[str] = set()  # pipelines the cluster has seen
        self._fetchers: dict[str, asyncio.Task[None]] = {}
        self._subs: dict[tuple[str, str], _Puller] = {}  # (pipeline, band) -> its puller
        self._wake: dict[str, asyncio.Event] = {}  # per pipeline: a slot freed, jobs came
        self._refresh = asyncio.Event()  # read the cluster's pipelines now
        self._supervise_now = asyncio.Event()  # a pipeline was learned: start its fetching
        self._every: set[int] = set()  # worker-side connections serving every pipeline
        self._nodes_seen: list[dict[str, Any]] = []  # the last survey's answers
        self._surveyed_at: float | None = None
        self._pending: dict[str, int] = {}  # the stream's undelivered jobs, per pipeline
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._nats_subs: list[Any] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(
        self,
        client_side_url: str,
        worker_side_url: str,
        client_side: Broker,
        worker_side: Broker,
    ) -> None:
        self._client_side = client_side
        self._worker_side = worker_side
        lean = self.requests.lean  # the hot subscriptions: called from the read loop
        self._nats_subs.append(await lean.subscribe(self.names.node(self.node), self._event))
        self._nats_subs.append(await lean.subscribe(self.names.cancel, self._cancel_seen))
        self._nats_subs.append(await self.nc.subscribe(self.names.who, cb=self._who))
        self._nats_subs.append(
            await self.nc.subscribe(self.names.new_pipelines, cb=self._pipeline_announced)
        )
        self._nats_subs.append(await self.nc.subscribe(self.names.nodes, cb=self._answer_survey))
        log = _log.bind(node=self.node)
        self._out = await Peer.connect(
            client_side_url,
            p.Hello(role=p.Role.WORKER, name=f"cluster-{self.node}"),
            log=log.bind(side="outbound"),
        )
        self._out.send_nowait(p.Register(capacity=OUTBOUND_CAPACITY))
        self._in = await Peer.connect(
            worker_side_url,
            p.Hello(role=p.Role.CLIENT, name=f"cluster-{self.node}", features=INBOUND_FEATURES),
            log=log.bind(side="inbound"),
        )
        self._loops = [
            asyncio.create_task(self._outbound(self._out), name="cluster outbound"),
            asyncio.create_task(self._inbound(self._in), name="cluster inbound"),
            asyncio.create_task(self._supervise(), name="cluster supervisor"),
            asyncio.create_task(self._keep_alive(), name="cluster in_progress"),
            asyncio.create_task(self._watch_pipelines(), name="cluster pipelines"),
            asyncio.create_task(self._watch_adopted(), name="cluster adopted"),
            asyncio.create_task(self._survey(), name="cluster survey"),
            asyncio.create_task(self._recheck(), name="cluster rechecks"),
        ]
        client_side.intercept = self.intercept
        client_side.status_extra = self.status
        client_side.metrics_extra = self.metrics

    def stop_fetching(self) -> None:
        """The node is stopping: take no more jobs (the worker side drains what it has).

        A fetch loop does not drop its pull requests: the server would still deliver
        into them, and the jobs would sit un-acked until ack_wait. Each loop asks for
        nothing more and ends once its requests have (at most FETCH_WAIT_S), and gives
        back at once (nak) what they brought."""
        self._stopping = True
        for wake in self._wake.values():
            wake.set()

    async def close(self) -> None:
        self.stop_fetching()
        if self._fetchers:
            await asyncio.wait(list(self._fetchers.values()), timeout=FETCH_WAIT_S + 5)
        # Jobs fetched and not finished: give them back at once rather than after ack_wait.
        for puller in self._subs.values():
            while puller.held:
                with contextlib.suppress(Exception):
                    await puller.held.popleft().nak()
        for running in list(self._running.values()):
            with contextlib.suppress(Exception):
                await running.msg.nak()
        self._running.clear()
        if self._client_side is not None:
            self._client_side.intercept = None
            self._client_side.status_extra = None
            self._client_side.metrics_extra = None
        for task in [*self._loops, *self._fetchers.values()]:
            task.cancel()
        for sub in [*self._nats_subs, *(s for pl in self._subs.values() for s in pl.subs)]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for peer in (self._out, self._in):
            if peer is not None:
                await peer.aclose("the node is stopping")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- called by the store ---------------------------------------------------------

    def publish_cancel(self, cookie: bytes) -> None:
        self._spawn(self._publish(self.names.cancel, cookie))

    def resent(self, cookie: bytes) -> None:
        """The job's publish was a duplicate: the stream's copy of it may name another
        node (one that died before the client saw ACCEPTED) as its origin, whose
        subject its RESULT goes to. Watch the bucket for it, as for an adopted job;
        if its RESULT comes to this node's subject after all, that ends the watch."""
        self.stats.resent += 1
        self._adopted.add(cookie)

    def new_pipeline(self, pipeline: str) -> None:
        self._learn(pipeline)
        self._spawn(self._register_pipeline(pipeline))

    async def _register_pipeline(self, pipeline: str) -> None:
        """A pipeline new to this node: announced to the running nodes (whose workers may
        serve every pipeline: they fetch it at once), and kept in the pipelines bucket for
        the nodes that start later."""
        await self._publish(self.names.new_pipelines, pipeline.encode())
        with contextlib.suppress(Exception):
            await self.pipelines_kv.put(self.names.token(pipeline), pipeline.encode())

    async def _pipeline_announced(self, msg: Any) -> None:
        with contextlib.suppress(UnicodeDecodeError):
            self._learn(msg.data.decode())

    def _learn(self, pipeline: str) -> None:
        """A pipeline the cluster has: fetched here at once if a local worker serves
        every pipeline."""
        if pipeline not in self._known:
            self._known.add(pipeline)
            self._supervise_now.set()

    async def _publish(self, subject: str, data: bytes) -> None:
        with contextlib.suppress(Exception):  # core NATS: best effort, the bucket is the truth
            await self.requests.lean.publish(subject, data)

    # -- outbound: the client side's worker ------------------------------------------

    async def _outbound(self, peer: Peer) -> None:
        try:
            async for packet in peer.packets():
                match packet:
                    case p.Run(cookie=wcookie):
                        cookie = self._job_cookie(wcookie)
                        if cookie is None:
                            continue  # cancelled or timed out in the same turn
                        self._mine[cookie] = wcookie
                        self._job_of[wcookie] = cookie
                        at = asyncio.get_running_loop().time() + RECHECK_FIRST_S
                        heapq.heappush(self._rechecks, (at, RECHECK_FIRST_S, cookie))
                        early = self._early.pop(cookie, None)
                        if early is not None:
                            self._relay(early)
                    case p.Cancel(cookie=wcookie):
                        cookie = self._job_of.get(wcookie)
                        if cookie is not None:
                            self._spawn(self._cancel(cookie))
                    case _:
                        pass
        finally:
            if not self._stopping:
                _log.error("cluster_outbound_lost", why=peer.close_reason)

    def _job_cookie(self, wcookie: bytes) -> bytes | None:
        broker = self._client_side
        if broker is None:
            return None
        board = broker.board
        for conn in board.workers():  # the outbound peer is the client side's one worker
            cookie = board.job_cookie(conn, wcookie)
            if cookie is not None:
                return cookie
        return None

    def _relay(self, outcome: Outcome) -> None:
        cookie = outcome.cookie
        wcookie = self._mine.pop(cookie, None)
        if wcookie is None or self._out is None:
            return
        self._job_of.pop(wcookie, None)
        self._adopted.discard(cookie)
        self.settled.add(cookie)
        self.stats.relayed += 1
        result = None if outcome.result is None else p.Raw(outcome.result)
        rc = _result_code(outcome.rc)
        with contextlib.suppress(BrokerConnectionError):
            self._out.send_nowait(p.Result(wcookie, rc, outcome.error, outcome.stacktrace, result))

    async def _event(self, msg: Any) -> None:
        """A message on this node's subject: a job of ours started, progressed or ended."""
        data: bytes = msg.data
        kind, body = data[:1], data[1:]
        try:
            if kind == EVENT_RESULT:
                outcome = Outcome.decode(body)
                if outcome.cookie in self._mine:
                    self._relay(outcome)
                else:  # its RUN has not reached us yet
                    self._early[outcome.cookie] = outcome
                    while len(self._early) > EARLY_REMEMBERED:
                        self._early.popitem(last=False)
            elif kind == EVENT_STARTED and self._out is not None and body in self._mine:
                self._out.send_nowait(p.Started(self._mine[body]))
            elif kind == EVENT_PROGRESS and self._out is not None:
                cookie, value = decode_progress(body)
                if cookie in self._mine:
                    raw = None if value is None else p.Raw(value)
                    self._out.send_nowait(p.Progress(self._mine[cookie], raw))
        except BrokerConnectionError:
            pass
        except Exception:
            _log.exception("cluster_event_unreadable", size=len(data))

    async def _cancel(self, cookie: bytes) -> None:
        """The client side cancels a job (its client asked, or its deadline passed)."""
        import nats.js.errors

        outcome = Outcome(
            cookie, "CANCELLED", "cancelled by its client", None, None, self.node, 0, time.time()
        )
        for attempt in range(5):
            try:
                await self.results.create(key(cookie), outcome.encode(), validate_keys=False)
            except nats.js.errors.KeyWrongLastSequenceError:
                entry = await self.results.get(key(cookie), validate_keys=False)
                self._relay(Outcome.decode(entry.value))
                return
            except Exception as exc:
                _log.warning("cluster_cancel_retry", error=str(exc), attempt=attempt)
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            await self._publish(self.names.cancel, cookie)
            self._relay(outcome)
            return

    # -- inbound: the worker side's client --------------------------------------------

    async def _inbound(self, peer: Peer) -> None:
        try:
            async for packet in peer.packets():
                match packet:
                    case p.Result(cookie=cookie) if cookie is not None:
                        running = self._running.pop(cookie, None)
                        if running is not None:
                            self._release(running.job.pipeline)
                            self._spawn(self._finish(running, packet))
                    case p.Started(cookie=cookie):
                        running = self._running.get(cookie)
                        if running is not None:
                            subject = self.names.node(running.job.origin)
                            self._spawn(self._publish(subject, EVENT_STARTED + cookie))
                    case p.Progress(cookie=cookie, result=value):
                        running = self._running.get(cookie)
                        if running is not None:
                            subject = self.names.node(running.job.origin)
                            event = progress_event(cookie, _packed(value))
                            self._spawn(self._publish(subject, event))
                    case _:
                        pass
        finally:
            if not self._stopping:
                _log.error("cluster_inbound_lost", why=peer.close_reason)

    def _release(self, pipeline: str) -> None:
        self._by_pipeline[pipeline] = self._by_pipeline.get(pipeline, 1) - 1
        wake = self._wake.get(pipeline)
        if wake is not None:
            wake.set()

    async def _finish(self, running: _Running, result: p.Result) -> None:

        rc = result.rc
        msg = running.msg
        cookie = result.cookie
        assert cookie is not None
        if rc in (p.ResultCode.NO_CAPACITY, p.ResultCode.BROKER_WENT_AWAY):
            # This node cannot run it (its worker left, or it is stopping): another will.
            self.stats.nacked += 1
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        if rc is p.ResultCode.CANCELLED and cookie in self._cancelled:
            with contextlib.suppress(Exception):
                await msg.ack()  # its node wrote the end when it cancelled
            return
        outcome = Outcome(
            cookie,
            rc.value,
            result.error,
            result.stacktrace,
            _packed(result.result),
            self.node,
            1,
            time.time(),
            running.job.pipeline,
        )
        await self._write(running, outcome, msg)

    async def _write(self, running: _Running, outcome: Outcome, msg: Any) -> None:
        """Create the job's result in the bucket (first writer wins), tell its node, ack."""
        origin = self.names.node(running.job.origin)
        subject = self.names.result(outcome.cookie)
        encoded = outcome.encode()
        for attempt in range(8):
            try:
                try:
                    await self.requests.publish(subject, encoded, CREATE_HEADER_BLOCK)
                except PublishError as exc:
                    if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                        raise
                    exists = True
                else:
                    exists = False
            except Exception as exc:
                if attempt == 0:
                    _log.warning("cluster_result_retry", error=str(exc), cookie=key(outcome.cookie))
                if attempt == 7:
                    # Not acked: JetStream gives the job to a node again after ack_wait.
                    _log.error(
                        "cluster_result_unwritten", error=str(exc), cookie=key(outcome.cookie)
                    )
                    return
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            if exists:
                self.stats.duplicates_dropped += 1  # its one result was written first: drop ours
                # The node that wrote it may have died before it told the job's node
                # (that is why the job came here again): tell it the result that won.
                # The job's node relays a job's end once, so this is harmless if not.
                with contextlib.suppress(Exception):
                    won = await self.results.get(key(outcome.cookie), validate_keys=False)
                    await self._publish(origin, EVENT_RESULT + won.value)
            else:
                await self._publish(origin, EVENT_RESULT + encoded)
            break
        with contextlib.suppress(Exception):
            await msg.ack()

    async def _cancel_seen(self, msg: Any) -> None:
        cookie: bytes = msg.data
        self.stats.cancels_seen += 1
        if cookie not in self._cancelled:
            self._cancelled.add(cookie)
            self._cancel_order.append(cookie)
            while len(self._cancel_order) > CANCELLED_REMEMBERED:
                self._cancelled.discard(self._cancel_order.popleft())
        if cookie in self._running and self._in is not None:
            with contextlib.suppress(BrokerConnectionError):
                self._in.send_nowait(p.Cancel(cookie))

    # -- fetching --------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Start a fetch loop per pipeline the local workers serve, stop the others."""
        while True:
            self._capacity = self._local_capacity()
            if not self._stopping:
                for pipeline, slots in self._capacity.items():
                    if slots > 0 and pipeline not in self._fetchers:
                        self._fetchers[pipeline] = asyncio.create_task(
                            self._fetch_loop(pipeline), name=f"cluster fetch {pipeline}"
                        )
            for pipeline, task in list(self._fetchers.items()):
                if task.done():  # it saw its pipeline lose its last local worker, or the stop
                    del self._fetchers[pipeline]
            for wake in self._wake.values():
                wake.set()  # capacity may have grown; a lost pull request is seen
            self._supervise_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUPERVISE_S):
                    await self._supervise_now.wait()

    def _local_capacity(self) -> dict[str, int]:
        """Slots of the worker side's workers, per pipeline (every known one for a worker
        that serves every pipeline)."""
        broker = self._worker_side
        if broker is None:
            return {}
        board = broker.board
        capacity: dict[str, int] = {}
        every: set[int] = set()
        for conn in board.workers():
            slots, _ = board.slots(conn)
            served = board.served_pipelines(conn)
            if served is None:
                every.add(conn)
            for pipeline in self._known if served is None else served:
                capacity[pipeline] = capacity.get(pipeline, 0) + slots
        if not every <= self._every:
            self._refresh.set()  # a new worker for every pipeline: learn them all now
        self._every = every
        return capacity

    async def _watch_pipelines(self) -> None:
        import nats.js.errors

        while True:
            self._refresh.clear()  # before the read: a refresh asked for during it is kept
            try:
                names = await self.pipelines_kv.keys()
            except nats.js.errors.NoKeysError:
                names = []
            except Exception as exc:
                _log.debug("cluster_pipelines_unread", error=str(exc))
                names = []
            for token in names:
                if token not in self._known_tokens():
                    with contextlib.suppress(Exception):
                        entry = await self.pipelines_kv.get(token)
                        self._learn(entry.value.decode())
            self.stats.pipelines_read += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PIPELINES_POLL_S):
                    await self._refresh.wait()

    def _known_tokens(self) -> set[str]:
        return {self.names.token(name) for name in self._known}

    async def _ensure_pullers(
        self, pipeline: str, pullers: dict[str, _Puller], wake: asyncio.Event
    ) -> None:
        """The pipeline's consumer per band (created if missing, as at the first fetch),
        and a puller for each, subscribed to its two inboxes."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        for band in BANDS:
            puller = pullers.get(band)
            if puller is not None and puller.broken is None:
                continue
            durable = self.names.consumer(pipeline, band)
            await self.js.add_consumer(
                self.names.stream,
                ConsumerConfig(
                    durable_name=durable,
                    filter_subject=self.names.jobs(pipeline, band),
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.ack_wait_s,
                    max_ack_pending=-1,
                    max_deliver=-1,
                ),
            )
            if puller is not None:
                puller.broken = None
                puller.spent(puller.credit)
                continue
            puller = _Puller(
                band,
                f"{JS_API}.CONSUMER.MSG.NEXT.{self.names.stream}.{durable}",
                self.nc.new_inbox(),
                self.nc.new_inbox(),
            )
            pullers[band] = puller
            self._subs[(pipeline, band)] = puller
            lean = self.requests.lean
            puller.subs.append(
                await lean.subscribe(
                    f"{puller.inbox}.*", functools.partial(self._pulled, puller, wake)
                )
            )
            puller.subs.append(
                await lean.subscribe(
                    f"{puller.probe_inbox}.*", functools.partial(self._probed, puller, wake)
                )
            )

    async def _pulled(self, puller: _Puller, wake: asyncio.Event, msg: Any) -> None:
        """What a lingering pull request brings: a job, or the request's end."""
        status = _status(msg)
        if status is None:
            puller.spent(1)
            puller.held.append(msg)
        elif status == "100":
            return  # a heartbeat (not asked for)
        else:
            pending = msg.headers.get("Nats-Pending-Messages")
            if status in ("408", "409") and pending is not None and pending.isdigit():
                puller.spent(int(pending))  # its unfilled part
            else:
                puller.spent(puller.credit)
            if status != "408":
                _log.warning(
                    "cluster_pull_status",
                    band=puller.band,
                    status=status,
                    why=msg.headers.get("Description", ""),
                )
            if status == "503" or (
                status == "409" and "Deleted" in msg.headers.get("Description", "")
            ):
                puller.broken = f"{status} {msg.headers.get('Description', '')}".strip()
        wake.set()

    async def _probed(self, puller: _Puller, wake: asyncio.Event, msg: Any) -> None:
        """What a no-wait probe brings: a job, or its end (404: the band had none)."""
        status = _status(msg)
        if status is None:
            puller.held.append(msg)
            puller.probe_left -= 1
            if puller.probe_left > 0:
                return
        elif status == "100" or msg.subject != puller.probe_reply:
            return  # a heartbeat, or the end of an earlier probe (one that came late)
        probe = puller.probe
        if probe is not None and not probe.done():
            probe.set_result(None)
        wake.set()

    async def _fetch_loop(self, pipeline: str) -> None:
        wake = self._wake.setdefault(pipeline, asyncio.Event())
        pullers: dict[str, _Puller] = {}
        delay = 0.1
        graceful = False
        try:
            while not self._stopping and pipeline in self._capacity:
                wake.clear()
                try:
                    if len(pullers) < len(BANDS) or any(pl.broken for pl in pullers.values()):
                        await self._ensure_pullers(pipeline, pullers, wake)
                    await self._pull(pipeline, pullers)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.warning("cluster_fetch_failed", pipeline=pipeline, error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SUPERVISE_S):
                        await wake.wait()
            graceful = True
        finally:
            await self._stop_pulling(pipeline, pullers, wake, graceful)

    async def _pull(self, pipeline: str, pullers: dict[str, _Puller]) -> None:
        """Run what is held while slots are free, the higher bands first; then keep pull
        requests outstanding on every band for the slots still free.

        A lower band's job runs only once a probe (no wait) of every higher band said
        what it had, while a lingering request of that band was outstanding behind it (so
        its later jobs come the moment they are published). So across nodes a higher
        band goes first; at most the free slots per band are asked for (and one more by
        a probe: so about three times the free slots at most are ever delivered to this
        node and not yet running)."""
        loop = asyncio.get_running_loop()
        ordered = [pullers[band] for band in BANDS]
        capacity = self._capacity.get(pipeline, 0)
        probed = False
        while True:
            free = capacity - self._by_pipeline.get(pipeline, 0)
            if free <= 0:
                break
            first = next((i for i, pl in enumerate(ordered) if pl.held), None)
            if first is None:
                break
            unsure = [pl for pl in ordered[:first] if not (pl.sure and pl.credit > 0)]
            if unsure and not probed:
                probed = True  # once per call: a probe not answered in time is not waited for
                want = min(free, FETCH_MAX)
                for pl in unsure:
                    if pl.credit == 0 and len(pl.held) < want:
                        await self._linger(pl, want - len(pl.held))  # ahead of the probe
                answered = await asyncio.gather(
                    *(self._probe(pl, max(1, want - pl.credit - len(pl.held))) for pl in unsure)
                )
                for pl, ok in zip(unsure, answered, strict=True):
                    if ok and pl.credit > 0:
                        pl.sure = True
                continue
            msg = ordered[first].held.popleft()
            if self._stopping or pipeline not in self._capacity:
                self._give_back(msg)  # came in as we stopped: another node's now
            else:
                self._take(pipeline, msg)
        want = min(capacity - self._by_pipeline.get(pipeline, 0), FETCH_MAX)
        now = loop.time()
        # The lowest band first: its jobs may then come before a higher band's, the case
        # the probes are for (across servers the order is anyone's); so one server,
        # as in the tests, shows it too.
        for pl in reversed(ordered):
            if pl.credit and now - pl.asked_at > FETCH_WAIT_S + PULL_LOST_S:
                self.stats.pulls_lost += 1
                _log.warning("cluster_pull_lost", pipeline=pipeline, band=pl.band, jobs=pl.credit)
                pl.spent(pl.credit)  # its requests were lost (a server failed over, say)
            have = pl.credit + len(pl.held)
            if want > 0 and have < want and (pl.credit == 0 or have <= want // 2):
                await self._linger(pl, want - have)

    async def _linger(self, puller: _Puller, n: int) -> None:
        """Ask the band for n more jobs, to come as they are published (FETCH_WAIT_S)."""
        request = json.dumps({"batch": n, "expires": int(FETCH_WAIT_S * 1e9)}).encode()
        puller.credit += n
        puller.asked_at = asyncio.get_running_loop().time()
        await self.nc.publish(puller.subject, request, reply=puller.reply(puller.inbox))

    async def _probe(self, puller: _Puller, n: int) -> bool:
        """Ask the band for what it has now, without waiting; what comes is held.
        Whether it answered within PROBE_WAIT_S."""
        probe = asyncio.get_running_loop().create_future()
        puller.probe, puller.probe_left = probe, n
        puller.probe_reply = puller.reply(puller.probe_inbox)
        request = json.dumps({"batch": n, "no_wait": True}).encode()
        await self.nc.publish(puller.subject, request, reply=puller.probe_reply)
        try:
            async with asyncio.timeout(PROBE_WAIT_S):
                await probe
        except TimeoutError:
            _log.warning("cluster_probe_late", band=puller.band, wait_s=PROBE_WAIT_S)
            return False
        return True

    async def _stop_pulling(
        self, pipeline: str, pullers: dict[str, _Puller], wake: asyncio.Event, graceful: bool
    ) -> None:
        """The loop ends: let its pull requests end (at most FETCH_WAIT_S, unless it was
        cancelled), then give back what they brought."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FETCH_WAIT_S + PULL_LOST_S
        while graceful and loop.time() < deadline:
            if not any(
                pl.credit > 0 or (pl.probe is not None and not pl.probe.done())
                for pl in pullers.values()
            ):
                break
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await wake.wait()
        for pl in pullers.values():
            for sub in pl.subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            pl.subs.clear()
            if self._subs.get((pipeline, pl.band)) is pl:
                del self._subs[(pipeline, pl.band)]
            while pl.held:
                self._give_back(pl.held.popleft())

    def _give_back(self, msg: Any) -> None:
        self.stats.nacked += 1
        self._spawn(_quiet(msg.nak()))

    def _take(self, pipeline: str, msg: Any) -> None:
        try:
            job = JobMessage.decode(msg.data)
        except Exception:
            _log.error("cluster_job_unreadable", pipeline=pipeline, size=len(msg.data))
            self._spawn(msg.term())
            return
        self.stats.fetched += 1
        cookie = job.cookie
        delivered = _delivered(msg)
        if delivered > 1:
            self.stats.redelivered += 1
        if cookie in self._running:
            self._running[cookie].msg = msg  # delivered again while it runs here: keep one
            return
        if cookie in self._cancelled or self._in is None:
            self._spawn(msg.ack())
            return
        now = time.time()
        loop_now = asyncio.get_running_loop().time()
        running = _Running(job, msg, loop_now, loop_now)
        if job.deadline is not None and job.deadline <= now:
            # Its node has timed it out (and written that end) unless that node is gone:
            # write TIMEOUT, first writer wins, so the job ends even then.
            why = f"timed out after {job.timeout_ms} ms (before a node could run it)"
            late = Outcome(cookie, "TIMEOUT", why, None, None, self.node, 0, now)
            self._spawn(self._write_gone(running, late))
            return
        crashes = delivered - 1
        if crashes > self.limits.max_attempts_limit:
            self.stats.went_away += 1
            why = (
                f"nodes stopped {crashes} times while this job ran "
                f"(max_attempts_limit {self.limits.max_attempts_limit})"
            )
            gone = Outcome(cookie, "BROKER_WENT_AWAY", why, None, None, self.node, 0, now)
            self._spawn(self._write_gone(running, gone))
            return
        timeout_ms = None
        if job.deadline is not None:
            timeout_ms = max(1, int((job.deadline - now) * 1000))
        variables = None if job.variables is None else p.Raw(job.variables)
        run = p.Run(cookie, pipeline, variables, False, job.priority, timeout_ms, job.max_attempts)
        self._running[cookie] = running
        self._by_pipeline[pipeline] = self._by_pipeline.get(pipeline, 0) + 1
        self.stats.by_pipeline[pipeline] = self.stats.by_pipeline.get(pipeline, 0) + 1
        try:
            self._in.send_nowait(run)
        except BrokerConnectionError:
            self._running.pop(cookie, None)
            self._release(pipeline)
            self._spawn(msg.nak())

    async def _write_gone(self, running: _Running, outcome: Outcome) -> None:
        await self._write(running, outcome, running.msg)

    async def _keep_alive(self) -> None:
        """`in_progress` for every job running here longer than ack_wait/3, that often."""
        every = self.ack_wait_s / 3
        while True:
            await asyncio.sleep(min(every, 1.0))
            now = asyncio.get_running_loop().time()
            for running in list(self._running.values()):
                if now - running.last_tick >= every:
                    running.last_tick = now
                    self._spawn(_quiet(running.msg.in_progress()))

    # -- what STATUS and the metrics show ----------------------------------------------

    def _summary(self) -> dict[str, Any]:
        """This node as the others see it in a survey."""
        workers = slots = busy = 0
        broker = self._worker_side
        if broker is not None:
            board = broker.board
            for conn in board.workers():
                capacity, used = board.slots(conn)
                workers += 1
                slots += capacity
                busy += used
        return {
            "node": self.node,
            "workers": workers,
            "slots": slots,
            "busy": busy,
            "running": len(self._running),
            "pipelines": sorted(self._capacity),
        }

    def status(self) -> dict[str, Any]:
        """STATUS's "cluster": this node, the nodes seen in the last survey, the
        stream's pending jobs per pipeline this node fetches, the bridge's counters,
        and the worker side's workers (the client side's only worker is the bridge)."""
        s = self.stats
        worker_side = self._worker_side
        workers = []
        if worker_side is not None:
            workers = list(worker_side.board.status_snapshot().get("workers", []))
        return {
            "node": self.node,
            "stream": self.names.stream,
            "nodes": self._nodes_seen,
            "surveyed_at": self._surveyed_at,
            "pending": dict(self._pending),
            "workers": workers,
            "fetched": s.fetched,
            "redelivered": s.redelivered,
            "duplicates_dropped": s.duplicates_dropped,
            "nacked": s.nacked,
            "relayed": s.relayed,
            "went_away": s.went_away,
            "adopted": s.adopted,
            "cancels_seen": s.cancels_seen,
        }

    def metrics(self) -> list[tuple[str, str, float]]:
        s = self.stats
        return [
            (
                "reasonbroker_cluster_nodes",
                "Nodes that answered the last survey.",
                len(self._nodes_seen),
            ),
            (
                "reasonbroker_cluster_pending_jobs",
                "Jobs in the stream not yet delivered, for the pipelines this node fetches.",
                sum(self._pending.values()),
            ),
            (
                "reasonbroker_cluster_fetched_total",
                "Jobs this node took from the stream.",
                s.fetched,
            ),
            (
                "reasonbroker_cluster_redelivered_total",
                "Jobs this node took that JetStream had delivered before (a node died, ack_wait).",
                s.redelivered,
            ),
            (
                "reasonbroker_cluster_duplicates_dropped_total",
                "Results dropped because the job's result was written first elsewhere.",
                s.duplicates_dropped,
            ),
            ("reasonbroker_cluster_nacked_total", "Jobs given back for another node.", s.nacked),
            (
                "reasonbroker_cluster_relayed_total",
                "Results relayed to this node's clients.",
                s.relayed,
            ),
        ]

    async def _survey(self) -> None:
        """Every SURVEY_S: ask every node for its summary (and answer the others'), and
        read the stream's pending jobs for the pipelines fetched here."""
        while True:
            seen: list[dict[str, Any]] = []
            inbox = self.nc.new_inbox()

            async def collect(msg: Any, seen: list[dict[str, Any]] = seen) -> None:
                with contextlib.suppress(Exception):
                    seen.append(unpack(msg.data))

            with contextlib.suppress(Exception):
                sub = await self.nc.subscribe(inbox, cb=collect)
                try:
                    await self.nc.publish(self.names.nodes, b"", reply=inbox)
                    await self.nc.flush(timeout=2)
                    await asyncio.sleep(SURVEY_WAIT_S)  # a collection window: replies
                finally:
                    await sub.unsubscribe()
                self._nodes_seen = sorted(seen, key=lambda n: str(n.get("node")))
                self._surveyed_at = time.time()
            pending: dict[str, int] = {}
            for pipeline, band in list(self._subs):
                with contextlib.suppress(Exception):
                    info = await self.js.consumer_info(
                        self.names.stream, self.names.consumer(pipeline, band)
                    )
                    pending[pipeline] = pending.get(pipeline, 0) + int(info.num_pending or 0)
            self._pending = pending
            await asyncio.sleep(SURVEY_S)

    async def _answer_survey(self, msg: Any) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(pack(self._summary()))

    # -- ATTACH on a node that did not accept the job ----------------------------------

    def intercept(self, conn: int, packets: list[p.Packet]) -> list[p.Packet]:
        """The client side's packets before its switchboard: an ATTACH for a job it does
        not know is taken out and answered once the results bucket was asked (`_adopt`)."""
        broker = self._client_side
        if broker is None:
            return packets
        board = broker.board
        kept: list[p.Packet] | None = None
        for i, packet in enumerate(packets):
            if isinstance(packet, p.Attach) and not board.knows(packet.cookie):
                if kept is None:
                    kept = packets[:i]
                self._spawn(self._adopt(conn, packet))
            elif kept is not None:
                kept.append(packet)
        return packets if kept is None else kept

    async def _adopt(self, conn: int, attach: p.Attach) -> None:
        """Another node's job (its client came here, say after that node died): its
        ended RESULT from the bucket, retained here; or, for an ATTACH that waits and a
        job not ended yet, the job taken on as one the bucket is watched for."""
        broker = self._client_side
        assert broker is not None
        cookie = attach.cookie
        try:
            outcome = await self.lookup(cookie)
        except Exception as exc:
            _log.warning("cluster_lookup_failed", error=str(exc), cookie=key(cookie))
            outcome = None
        board = broker.board
        now = broker.loop.time()
        if outcome is not None:
            result = p.Result(
                cookie,
                _result_code(outcome.rc),
                outcome.error,
                outcome.stacktrace,
                None if outcome.result is None else p.Raw(outcome.result),
            )
            ended = Ended(result, outcome.pipeline, outcome.attempts, now, now)
            run = restored_run(cookie, outcome.pipeline, None, False, 0, None)
            broker.apply(board.adopt(run, ended, now))
        elif attach.wait or await self._exists(cookie):
            # Its ends come from the bucket (relayed), or are its own node's to write.
            self.settled.add(cookie)
            self._adopted.add(cookie)
            self.stats.adopted += 1
            run = restored_run(cookie, ADOPTED_PIPELINE, None, False, 0, None)
            broker.apply(board.adopt(run, None, now))
        # A JOB question for a job no node claims and the bucket does not have: the
        # switchboard answers COOKIE_NOT_FOUND. (An ATTACH that waits is taken on
        # trust: a resuming client's job exists, though its node may be gone.)
        broker.inject(conn, [attach])

    async def _exists(self, cookie: bytes) -> bool:
        """Whether any node has the job: its client side knows it, or it runs there."""
        try:
            reply = await self.nc.request(self.names.who, cookie, timeout=WHO_WAIT_S)
        except Exception:
            return False  # nobody answered (no responders, or not in time)
        return bool(reply.data)

    async def _who(self, msg: Any) -> None:
        """A node asks who has a job: answer only if this node does (first answer wins)."""
        cookie: bytes = msg.data
        broker = self._client_side
        known = broker is not None and broker.board.knows(cookie)
        if (known or cookie in self._running) and msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(b"1")

    async def _watch_adopted(self) -> None:
        """Ask the bucket, each second, for the jobs adopted here that have not ended."""
        while True:
            await asyncio.sleep(ADOPTED_POLL_S)
            for cookie in list(self._adopted):
                if cookie not in self._mine:
                    if not self._client_side or not self._client_side.board.knows(cookie):
                        self._adopted.discard(cookie)  # gone (its client cancelled it, say)
                    continue
                with contextlib.suppress(Exception):
                    outcome = await self.lookup(cookie)
                    if outcome is not None:
                        self._adopted.discard(cookie)
                        self._relay(outcome)

    async def _recheck(self) -> None:
        """Ask the bucket for the jobs of ours whose RESULT is late (RECHECK_FIRST_S)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            due: list[bytes] = []
            while self._rechecks and self._rechecks[0][0] <= now:
                _, interval, cookie = heapq.heappop(self._rechecks)
                if cookie in self._mine:
                    due.append(cookie)
                    interval = min(interval * 2, RECHECK_MAX_S)
                    heapq.heappush(self._rechecks, (now + interval, interval, cookie))
            await self._look_up_all(due)

    def reconnected(self) -> None:
        """The node's NATS connection came back: what was sent to its subject meanwhile
        is lost; ask the bucket for every job of ours still waiting, now and once more
        a little later."""
        for puller in self._subs.values():
            puller.spent(puller.credit)  # its pull requests may be gone with the old connection
        for wake in self._wake.values():
            wake.set()
        self._spawn(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        await self._look_up_all(list(self._mine))
        await asyncio.sleep(RECONNECT_AGAIN_S)
        await self._look_up_all(list(self._mine))

    async def _look_up_all(self, cookies: list[bytes]) -> None:
        """Relay the RESULT of each of these jobs that the bucket has (LOOKUPS_AT_ONCE)."""

        async def one(cookie: bytes) -> None:
            with contextlib.suppress(Exception):
                outcome = await self.lookup(cookie)
                if outcome is not None and cookie in self._mine:
                    self.stats.recovered += 1
                    self._relay(outcome)

        for i in range(0, len(cookies), LOOKUPS_AT_ONCE):
            await asyncio.gather(*(one(c) for c in cookies[i : i + LOOKUPS_AT_ONCE]))

    async def lookup(self, cookie: bytes) -> Outcome | None:
        """The job's result in the bucket, or None (running, queued or unknown)."""
        import nats.js.errors

        try:
            entry = await self.results.get(key(cookie), validate_keys=False)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return Outcome.decode(entry.value)


def _delivered(msg: Any) -> int:
    """How many times JetStream delivered the message, read from its ack subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.…`, or with a domain and an account hash
    after `$JS.ACK`: 9 tokens, or 11 and more), without building nats-py's metadata."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4])
    return int(msg.metadata.num_delivered)


async def _quiet(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


def _packed(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, p.Raw):
        data = value.data
        return data if isinstance(data, bytes) else bytes(data)
    if isinstance(value, p.RawJson):
        return pack_value(value.value())  # a JSON peer's text, carried as msgpack
    return pack_value(value)


def _result_code(value: str) -> p.ResultCode:
    try:
        return p.ResultCode(value)
    except ValueError:
        return p.ResultCode.BROKER_WENT_AWAY
