"""The client and worker libraries against a fake broker on loopback.

The fake speaks the protocol with protocol.PacketDecoder/encode, answers
HELLO, and routes RUN from clients to the one worker (respecting its
capacity) and RESULT, STARTED and PROGRESS back. With `route=False` it only
records, and the test drives the conversation itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import pickle
import tempfile
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import pytest

from reasonbroker.core.protocol import (
    Accepted,
    Cancel,
    Hello,
    Packet,
    PacketDecoder,
    Ping,
    Pong,
    Progress,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Started,
    encode,
    new_cookie,
)
from reasonbroker.sdk import client as client_mod
from reasonbroker.sdk import errors
from reasonbroker.sdk import worker as worker_mod
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import (
    BrokerConnectionError,
    BrokerWentAway,
    Cancelled,
    ConnectTimeout,
    JobError,
    JobException,
    JobTimeout,
    ProcessorException,
    Unauthorized,
    error_for,
)
from reasonbroker.sdk.peer import Peer
from reasonbroker.sdk.worker import (
    Handler,
    JobContext,
    Worker,
    current_job,
    progress,
    reconnect_delay,
)

pytestmark = pytest.mark.timeout(20)

P = TypeVar("P")
T = TypeVar("T")

FAKE_HELLO = Hello(version="fake-1", features=("started", "progress"), heartbeat_ms=None)


@dataclass(eq=False)
class Conn:
    writer: asyncio.StreamWriter
    decoder: PacketDecoder = field(default_factory=lambda: PacketDecoder(1 << 20))
    role: Role | None = None
    capacity: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, packet: Packet) -> None:
        self.writer.write(encode(packet))

    def drop(self) -> None:
        self.writer.transport.abort()


class FakeBroker:
    def __init__(
        self,
        *,
        hello_answer: Packet | None = FAKE_HELLO,
        answer_ping: bool = True,
        route: bool = True,
        unix_path: str | None = None,
    ) -> None:
        self.unix_path = unix_path
        self.hello_answer = hello_answer
        self.answer_ping = answer_ping
        self.route = route
        self.received: list[tuple[Conn, Packet]] = []
        self.conns: list[Conn] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # routing state (route=True)
        self.worker: Conn | None = None
        self.queue: deque[tuple[Conn, Run]] = deque()
        self.running: dict[bytes, tuple[Conn, Run]] = {}

    async def start(self) -> None:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._serve, self.unix_path)
        else:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tcp://{host}:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.drop()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()

    # -- observation -----------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], T | None]) -> T:
        """Wait until `predicate()` returns something other than None/False/empty."""
        while True:
            changed = self._changed
            value = predicate()
            if value:
                return value
            await changed.wait()

    def seen(self, kind: type[P], role: Role | None = None) -> list[P]:
        return [
            pkt
            for conn, pkt in self.received
            if isinstance(pkt, kind) and (role is None or conn.role is role)
        ]

    def seen_on(self, kind: type[P], conn: Conn) -> list[P]:
        return [pkt for c, pkt in self.received if c is conn and isinstance(pkt, kind)]

    def conns_of(self, role: Role) -> list[Conn]:
        return [c for c in self.conns if c.role is role]

    # -- the server ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = Conn(writer)
        self.conns.append(conn)
        try:
            while data := await reader.read(65536):
                for packet in conn.decoder.feed(data):
                    self.received.append((conn, packet))
                    self._on_packet(conn, packet)
                    self._notify()
        except ConnectionError:
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()
            self._gone(conn)
            conn.closed.set()
            self._notify()

    def _on_packet(self, conn: Conn, packet: Packet) -> None:
        match packet:
            case Hello(role=role):
                conn.role = role
                if self.hello_answer is not None:
                    conn.send(self.hello_answer)
                    if isinstance(self.hello_answer, Result):
                        conn.writer.close()
            case Ping() if self.answer_ping:
                conn.send(Pong())
            case _ if not self.route:
                pass
            case Register(capacity=capacity):
                conn.capacity += capacity
                self.worker = conn
                self._pump()
            case Run():
                self.queue.append((conn, packet))
                self._pump()
            case Cancel(cookie=cookie) if cookie in self.running and self.worker is not None:
                self.worker.send(packet)
            case Result(cookie=cookie) if cookie in self.running:
                client, run = self.running.pop(cookie)
                if not run.detach:
                    client.send(packet)
                self._pump()
            case Started(cookie=cookie) | Progress(cookie=cookie) if cookie in self.running:
                self.running[cookie][0].send(packet)

    def _pump(self) -> None:
        worker = self.worker
        while worker is not None and self.queue and len(self.running) < worker.capacity:
            client, run = self.queue.popleft()
            self.running[run.cookie] = (client, run)
            worker.send(run)

    def _gone(self, conn: Conn) -> None:
        if conn is self.worker:
            self.worker = None
            for cookie, (client, run) in list(self.running.items()):
                del self.running[cookie]
                if not run.detach and not client.closed.is_set():
                    client.send(Result(cookie, ResultCode.WORKER_WENT_AWAY, "worker gone"))
        else:
            # A client is gone: drop its queued jobs and cancel its running ones.
            self.queue = deque((c, run) for c, run in self.queue if c is not conn)
            for cookie, (client, _run) in list(self.running.items()):
                if client is conn and self.worker is not None:
                    self.worker.send(Cancel(cookie))


@pytest.fixture
async def fake() -> AsyncIterator[FakeBroker]:
    broker = FakeBroker()
    await broker.start()
    yield broker
    await broker.close()


@pytest.fixture
async def raw_fake() -> AsyncIterator[FakeBroker]:
    broker = FakeBroker(route=False)
    await broker.start()
    yield broker
    await broker.close()


async def echo(variables: Any) -> Any:
    return variables


class Blocker:
    """A handler that blocks until released, recording entry and cancellation."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.saw_cancel = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def __call__(self, variables: Any) -> Any:
        self.count += 1
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.saw_cancel.set()
            raise
        return variables


# ---------------------------------------------------------------------------
# Client and worker together, through the routing fake


async def test_run_returns_the_echo_and_both_sides_say_hello(fake: FakeBroker) -> None:
    async with (
        Worker(fake.url, handlers={"echo": echo}, capacity=2, name="w1"),
        Client(fake.url, name="c1") as client,
    ):
        payload = {"a": [1, 2.5, None], "b": b"\x00\xff", "c": "text"}
        assert await client.run("echo", payload) == payload
        assert client.broker_hello.version == "fake-1"
        assert client.in_flight == 0
    [client_hello] = fake.seen(Hello, Role.CLIENT)
    assert client_hello.features == ("started", "progress", "accepted", "ack", "attach")
    assert client_hello.name == "c1"
    [worker_hello] = fake.seen(Hello, Role.WORKER)
    assert worker_hello.name == "w1"


async def test_many_concurrent_jobs_on_one_connection_demultiplex(fake: FakeBroker) -> None:
    finished: list[int] = []

    async def uneven(variables: Any) -> Any:
        for _ in range(variables["i"] % 7):  # finish out of submission order
            await asyncio.sleep(0)
        finished.append(variables["i"])
        return {"i": variables["i"], "square": variables["i"] ** 2}

    async with (
        Worker(fake.url, handlers={"uneven": uneven}, capacity=16),
        Client(fake.url) as client,
    ):
        handles = [await client.submit("uneven", {"i": i}) for i in range(200)]
        assert len({h.cookie for h in handles}) == 200
        results = await asyncio.gather(*handles)
        assert results == [{"i": i, "square": i * i} for i in range(200)]
        assert client.in_flight == 0
    assert finished != sorted(finished), "results should have arrived out of order"


async def test_client_and_worker_over_a_unix_socket() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rb") as short:  # sun_path is short
        broker = FakeBroker(unix_path=os.path.join(short, "b.sock"))
        await broker.start()
        try:
            async with (
                Worker(broker.url, handlers={"echo": echo}),
                Client(broker.url) as client,
            ):
                assert broker.url.startswith("unix:///")
                assert await client.run("echo", "over unix") == "over unix"
        finally:
            await broker.close()


async def test_a_worker_given_several_urls_serves_through_the_first_that_answers(
    fake: FakeBroker,
) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rb") as short:
        nobody = f"unix://{os.path.join(short, 'nobody.sock')}"  # no broker listens here
        worker = Worker([nobody, fake.url], handlers={"echo": echo})
        assert worker.url == nobody  # the first, until connected
        async with worker, Client(fake.url) as client:
            await worker.wait_registered(timeout=10)
            assert worker.url == fake.url
            assert await client.run("echo", "via the second") == "via the second"
    with pytest.raises(ValueError, match="at least one broker URL"):
        Worker([], handlers={"echo": echo})


async def test_handler_exception_raises_processor_exception(fake: FakeBroker) -> None:
    async def boom_handler(variables: Any) -> Any:
        raise ValueError("boom")

    async with (
        Worker(fake.url, handlers={"boom": boom_handler}),
        Client(fake.url) as client,
    ):
        with pytest.raises(ProcessorException) as info:
            await client.run("boom", None)
    exc = info.value
    assert str(exc) == "PROCESSOR_EXCEPTION: ValueError: boom"
    assert exc.rc is ResultCode.PROCESSOR_EXCEPTION
    assert exc.error == "ValueError: boom"
    assert exc.stacktrace is not None
    assert any("boom_handler" in line for line in exc.stacktrace)
    [run] = fake.seen(Run)
    assert exc.cookie == uuid.UUID(bytes=run.cookie)


async def test_handle_cancel_cancels_the_running_handler(fake: FakeBroker) -> None:
    block = Blocker()
    async with (
        Worker(fake.url, handlers={"block": block}, send_started=True),
        Client(fake.url) as client,
    ):
        handle = await client.submit("block", 1)
        await handle.started.wait()  # the worker's STARTED, forwarded
        await block.entered.wait()
        await handle.cancel()
        with pytest.raises(Cancelled) as info:
            await handle
        assert block.saw_cancel.is_set()
        assert info.value.cookie == handle.cookie
    [cancel] = fake.seen(Cancel, Role.CLIENT)
    assert cancel.cookie == handle.cookie.bytes
    [answer] = fake.seen(Result, Role.WORKER)
    assert answer.rc is ResultCode.CANCELLED


async def test_cancel_after_the_result_returns_the_result(fake: FakeBroker) -> None:
    async with Worker(fake.url, handlers={"echo": echo}), Client(fake.url) as client:
        handle = await client.submit("echo", 42)
        assert await handle == 42
        await handle.cancel()
        assert await handle == 42
    assert fake.seen(Cancel) == []


async def test_cancelling_the_awaiting_task_sends_cancel(fake: FakeBroker) -> None:
    block = Blocker()
    async with Worker(fake.url, handlers={"block": block}), Client(fake.url) as client:
        task = asyncio.create_task(client.run("block", 1))
        await block.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancels = await fake.wait_for(lambda: fake.seen(Cancel, Role.CLIENT))
        [run] = fake.seen(Run)
        assert [c.cookie for c in cancels] == [run.cookie]
        await block.saw_cancel.wait()  # forwarded to the worker, which cancelled the handler
        # The late CANCELLED result is dropped quietly by the client.
        await fake.wait_for(lambda: fake.seen(Result, Role.WORKER))


async def test_connection_drop_fails_pending_jobs_with_broker_went_away(
    fake: FakeBroker,
) -> None:
    block = Blocker()
    async with Worker(fake.url, handlers={"block": block}), Client(fake.url) as client:
        handles = [await client.submit("block", i) for i in range(3)]
        await block.entered.wait()
        for conn in fake.conns_of(Role.CLIENT):
            conn.drop()
        for handle in handles:
            with pytest.raises(BrokerWentAway) as info:
                await handle
            assert info.value.cookie == handle.cookie
        assert client.in_flight == 0
        with pytest.raises(BrokerWentAway):
            await client.submit("block", 99)
        await block.saw_cancel.wait()  # the fake cancelled the orphaned job


async def test_progress_and_started_reach_the_client(fake: FakeBroker) -> None:
    async def steps(variables: Any) -> Any:
        for i in range(variables):
            await progress({"step": i})
        return "done"

    seen: list[Any] = []
    async with (
        Worker(fake.url, handlers={"steps": steps}, send_started=True),
        Client(fake.url) as client,
    ):
        handle = await client.submit("steps", 3, on_progress=seen.append)
        assert await handle == "done"
        assert handle.started.is_set()
    assert seen == [{"step": 0}, {"step": 1}, {"step": 2}]


async def test_progress_outside_a_handler_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="inside a worker handler"):
        await progress(1)
    with pytest.raises(RuntimeError, match="inside a worker handler"):
        current_job()


async def test_job_context_sends_progress_from_another_task_and_tells_cancel(
    fake: FakeBroker,
) -> None:
    # A handler that hands its job to another task (as a framework's worker loop
    # would): the context still names the job there, in order, and says when
    # the broker cancelled it.
    contexts: list[JobContext] = []
    handed = asyncio.Event()

    async def elsewhere(ctx: JobContext) -> None:
        for i in range(3):
            await ctx.progress({"step": i})
        handed.set()

    async def hand_off(variables: Any) -> Any:
        ctx = current_job()
        contexts.append(ctx)
        assert not ctx.cancel_requested and not ctx.ended
        await asyncio.create_task(elsewhere(ctx))
        await asyncio.Event().wait()  # until cancelled
        return None

    seen: list[Any] = []
    async with Worker(fake.url, handlers={"hand": hand_off}), Client(fake.url) as client:
        handle = await client.submit("hand", None, on_progress=seen.append)
        await handed.wait()
        [ctx] = contexts
        assert ctx.pipeline == "hand"
        assert ctx.cookie == handle.cookie  # the fake passes the client's cookie on
        await handle.cancel()
        with pytest.raises(Cancelled):
            await handle
        assert ctx.cancel_requested and ctx.ended
        await ctx.progress("late")  # dropped: the job has been answered
    assert seen == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert [packet.result for packet in fake.seen(Progress, Role.WORKER)] == seen


async def test_unpackable_result_is_a_processor_exception_and_the_worker_survives(
    fake: FakeBroker,
) -> None:
    async def bad(variables: Any) -> Any:
        return object()

    async with (
        Worker(fake.url, handlers={"bad": bad, "echo": echo}),
        Client(fake.url) as client,
    ):
        with pytest.raises(ProcessorException, match="cannot be sent"):
            await client.run("bad", None)
        assert await client.run("echo", "still alive") == "still alive"


async def test_unknown_pipeline_is_a_job_exception(fake: FakeBroker) -> None:
    async with Worker(fake.url, handlers={"echo": echo}), Client(fake.url) as client:
        with pytest.raises(JobException, match="no handler for pipeline 'nope'"):
            await client.run("nope", None)


async def test_worker_reconnects_after_the_broker_drops_it(fake: FakeBroker) -> None:
    block = Blocker()
    async with Worker(fake.url, handlers={"block": block}) as worker:
        await fake.wait_for(lambda: fake.seen(Register))
        async with Client(fake.url) as client:
            handle = await client.submit("block", 1)
            await block.entered.wait()
            [first] = fake.conns_of(Role.WORKER)
            first.drop()
            with pytest.raises(errors.WorkerWentAway):
                await handle
            await block.saw_cancel.wait()  # connection loss cancels running handlers
            await fake.wait_for(lambda: len(fake.seen(Register)) == 2)
            assert worker.running_jobs == 0
            second = fake.conns_of(Role.WORKER)[-1]
            assert second is not first
            assert [type(pkt) for pkt in fake.seen_on(object, second)][:2] == [Hello, Register]
            block.release.set()
            assert await client.run("block", "again") == "again"


async def test_worker_without_reconnect_raises_when_the_broker_goes_away(
    fake: FakeBroker,
) -> None:
    worker = Worker(fake.url, handlers={"echo": echo}, reconnect=False)
    task = asyncio.create_task(worker.run())
    await fake.wait_for(lambda: fake.seen(Register))
    fake.conns_of(Role.WORKER)[0].drop()
    with pytest.raises(BrokerConnectionError, match="went away"):
        await task


async def test_graceful_stop_finishes_running_jobs_and_starts_no_new_ones(
    raw_fake: FakeBroker,
) -> None:
    block = Blocker()
    worker = Worker(raw_fake.url, handlers={"block": block}, capacity=2)
    task = asyncio.create_task(worker.run())
    await raw_fake.wait_for(lambda: raw_fake.seen(Register))
    [conn] = raw_fake.conns_of(Role.WORKER)
    first, second = new_cookie(), new_cookie()
    conn.send(Run(first, "block", "one"))
    await block.entered.wait()
    worker.stop()
    conn.send(Run(second, "block", "two"))  # arrives while draining
    conn.send(Ping())  # answered only after the RUN before it was dispatched
    await raw_fake.wait_for(lambda: raw_fake.seen(Pong))
    assert not task.done()
    block.release.set()
    await task
    await conn.closed.wait()  # closed once the last RESULT was out
    results = raw_fake.seen(Result)
    assert [(r.cookie, r.rc, r.result) for r in results] == [(first, ResultCode.OK, "one")]
    assert block.count == 1


async def test_register_carries_capacity_and_pipelines_and_capacity_is_enforced(
    raw_fake: FakeBroker,
) -> None:
    block = Blocker()
    handlers: dict[str, Handler] = {"block": block, "echo": echo}
    async with Worker(raw_fake.url, handlers=handlers, capacity=2, name="w"):
        [register] = await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        assert register == Register(2, ("block", "echo"))
        [hello] = raw_fake.seen(Hello)
        assert (hello.role, hello.name) == (Role.WORKER, "w")
        [conn] = raw_fake.conns_of(Role.WORKER)
        cookies = [new_cookie() for _ in range(3)]
        for cookie in cookies:  # one more than the capacity
            conn.send(Run(cookie, "block", None))
        [refused] = await raw_fake.wait_for(lambda: raw_fake.seen(Result))
        assert (refused.cookie, refused.rc) == (cookies[2], ResultCode.NO_CAPACITY)
        assert block.count == 2
        for cookie in cookies[:2]:
            conn.send(Cancel(cookie))
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Result)) == 3)
        answers = {r.cookie: r.rc for r in raw_fake.seen(Result)[1:]}
        assert answers == dict.fromkeys(cookies[:2], ResultCode.CANCELLED)


async def test_worker_echoes_the_run_cookie_exactly(raw_fake: FakeBroker) -> None:
    async with Worker(raw_fake.url, handlers={"echo": echo}, send_started=True):
        await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        [conn] = raw_fake.conns_of(Role.WORKER)
        cookie = new_cookie()
        conn.send(Run(cookie, "echo", [1, 2]))
        [result] = await raw_fake.wait_for(lambda: raw_fake.seen(Result))
        [started] = raw_fake.seen(Started)
    assert result == Result(cookie, ResultCode.OK, result=[1, 2])
    assert started.cookie == cookie


# ---------------------------------------------------------------------------
# Client details, against the recording fake


async def test_submit_fields_and_detach(raw_fake: FakeBroker) -> None:
    async with Client(raw_fake.url) as client:
        handle = await client.submit("p", 1, timeout=1.5, priority=3, max_attempts=2)
        detached = await client.submit("p", 2, detach=True)
        assert detached.done()
        assert await detached is None
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Run)) == 2)
        runs = raw_fake.seen(Run)
        # submit() asks for each job's ACCEPTED (RUN `ack`, docs/protocol.md).
        assert runs[0] == Run(handle.cookie.bytes, "p", 1, False, 3, 1500, 2, True)
        assert runs[1] == Run(detached.cookie.bytes, "p", 2, True, ack=True)
        assert client.in_flight == 1  # a detached job expects no RESULT
        with pytest.raises(ValueError, match="timeout"):
            await client.submit("p", 1, timeout=0)


async def test_submit_with_a_chosen_cookie(raw_fake: FakeBroker) -> None:
    chosen = uuid.uuid4()
    async with Client(raw_fake.url) as client:
        handle = await client.submit("p", 1, cookie=str(chosen))
        assert handle.cookie == chosen
        with pytest.raises(ValueError, match="already awaits"):
            await client.submit("p", 2, cookie=chosen)
        with pytest.raises(ValueError, match="not a UUID"):
            await client.submit("p", 3, cookie="task-1")
        other = await client.submit("p", 4, cookie=uuid.uuid4().bytes)
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Run)) == 2)
        assert [run.cookie for run in raw_fake.seen(Run)] == [chosen.bytes, other.cookie.bytes]
        assert client.in_flight == 2


async def test_broker_timeout_raises_job_timeout(raw_fake: FakeBroker) -> None:
    async with Client(raw_fake.url) as client:
        handle = await client.submit("p", None, timeout=0.5)
        [run] = await raw_fake.wait_for(lambda: raw_fake.seen(Run))
        raw_fake.conns_of(Role.CLIENT)[0].send(
            Result(run.cookie, ResultCode.TIMEOUT, "deadline passed")
        )
        with pytest.raises(JobTimeout, match="TIMEOUT: deadline passed"):
            await handle


async def test_ping_is_answered_and_unknown_packets_are_ignored(raw_fake: FakeBroker) -> None:
    async with Client(raw_fake.url) as client:
        handle = await client.submit("p", None)
        [run] = await raw_fake.wait_for(lambda: raw_fake.seen(Run))
        conn = raw_fake.conns_of(Role.CLIENT)[0]
        body = msgpack.packb({"packet_type": "FROM_THE_FUTURE", "x": 1})
        conn.writer.write(len(body).to_bytes(4, "big") + body)
        conn.send(Ping())
        await raw_fake.wait_for(lambda: raw_fake.seen(Pong))
        conn.send(Result(run.cookie, ResultCode.OK, result="fine"))
        assert await handle == "fine"


async def test_silent_broker_is_detected_by_the_heartbeat() -> None:
    broker = FakeBroker(
        hello_answer=Hello(version="fake", heartbeat_ms=30), answer_ping=False, route=False
    )
    await broker.start()
    try:
        async with Client(broker.url) as client:
            handle = await client.submit("p", None)
            await broker.wait_for(lambda: broker.seen(Ping))  # we keep ourselves alive
            with pytest.raises(BrokerWentAway, match="silent"):
                await handle
    finally:
        await broker.close()


async def test_unauthorized_hello_raises_unauthorized() -> None:
    # protocol.py cannot decode a RESULT without a cookie, so the refusal carries
    # the nil UUID.
    refusal = Result(bytes(16), ResultCode.UNAUTHORIZED, "bad token")
    broker = FakeBroker(hello_answer=refusal)
    await broker.start()
    try:
        with pytest.raises(Unauthorized, match="bad token"):
            async with Client(broker.url, token="wrong"):
                pass
        [hello] = broker.seen(Hello)
        assert hello.token == "wrong"
        worker = Worker(broker.url, handlers={"echo": echo}, token="wrong")
        async with asyncio.timeout(5):  # not retried
            with pytest.raises(Unauthorized):
                await worker.run()
    finally:
        await broker.close()


async def test_no_hello_answer_raises_connect_timeout() -> None:
    broker = FakeBroker(hello_answer=None)
    await broker.start()
    try:
        with pytest.raises(ConnectTimeout) as info:
            await Client(broker.url, connect_timeout=0.05).connect()
        assert isinstance(info.value, ConnectionError)
    finally:
        await broker.close()


async def test_connection_refused_raises_broker_connection_error() -> None:
    broker = FakeBroker()
    await broker.start()
    url = broker.url
    await broker.close()
    with pytest.raises(BrokerConnectionError, match="cannot connect"):
        await Client(url).connect()


# ---------------------------------------------------------------------------
# One write per loop turn (sdk/peer.py), and run() without the ACCEPTED wait


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many frames each write of every Peer carried (a write is one syscall)."""
    carried: list[int] = []
    flush = Peer._flush

    def counting(self: Peer) -> None:
        if self._out:
            carried.append(len(self._out))
        flush(self)

    monkeypatch.setattr(Peer, "_flush", counting)
    return carried


async def test_the_runs_of_one_loop_turn_leave_in_one_write(
    raw_fake: FakeBroker, writes: list[int]
) -> None:
    async with Client(raw_fake.url) as client:
        # Tasks made together take their first step in the same loop turn.
        tasks = [asyncio.create_task(client.run("p", i)) for i in range(50)]
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Run)) == 50)
        runs = raw_fake.seen(Run)
        assert writes == [50]
        [conn] = raw_fake.conns_of(Role.CLIENT)
        for run in runs:
            conn.send(Result(run.cookie, ResultCode.OK, result=run.variables))
        assert await asyncio.gather(*tasks) == list(range(50))


async def test_a_workers_results_of_one_read_leave_together(
    raw_fake: FakeBroker, writes: list[int]
) -> None:
    async with Worker(raw_fake.url, handlers={"echo": echo}, capacity=20):
        await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        [conn] = raw_fake.conns_of(Role.WORKER)
        runs = [Run(new_cookie(), "echo", i) for i in range(20)]
        # One write, so (on loopback) one read or very few: handlers started by
        # one read run in the same loop turn, and their RESULTs share a write.
        conn.writer.write(b"".join(encode(run) for run in runs))
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Result)) == 20)
        results = raw_fake.seen(Result)
    assert {r.cookie: r.result for r in results} == {run.cookie: run.variables for run in runs}
    assert writes[0] == 1  # REGISTER
    assert sum(writes[1:]) == 20
    assert len(writes[1:]) < 20  # not one write per RESULT


async def test_a_worker_frees_the_slot_before_its_result_is_written(
    raw_fake: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read is dispatched in the transport's callback: the broker's next RUN
    # can be read before the finished job task's done callback has run, so
    # the slot must be free by the time its RESULT leaves, or that RUN would
    # be answered NO_CAPACITY.
    running_at_write: list[int] = []
    flush = Peer._flush
    worker = Worker(raw_fake.url, handlers={"echo": echo}, capacity=1)

    def noting(self: Peer) -> None:
        if self._out:
            running_at_write.append(worker.running_jobs)
        flush(self)

    monkeypatch.setattr(Peer, "_flush", noting)
    async with worker:
        await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        [conn] = raw_fake.conns_of(Role.WORKER)
        for i in range(3):
            conn.send(Run(new_cookie(), "echo", i))
            await raw_fake.wait_for(lambda: len(raw_fake.seen(Result)) > i)  # noqa: B023
    assert [r.rc for r in raw_fake.seen(Result)] == [ResultCode.OK] * 3
    assert running_at_write[1:4] == [0, 0, 0]  # after the REGISTER's write


async def test_frames_held_for_the_turn_are_written_once_past_64_kib(
    raw_fake: FakeBroker, writes: list[int]
) -> None:
    # A sender that never yields still hands its bytes to the transport (whose
    # backpressure send() then waits on), instead of holding them all.
    async with Client(raw_fake.url) as client:
        peer = client._peer
        assert peer is not None
        for _ in range(40):
            peer.send_nowait(Run(new_cookie(), "p", b"x" * 10_000))
            assert peer._out_bytes < 64 * 1024
        assert len(writes) >= 5
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Run)) == 40)
    assert sum(writes) == 40


async def test_a_client_whose_dispatch_breaks_drops_the_connection_and_fails_its_jobs(
    raw_fake: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads are dispatched in the transport's callback (sdk/peer.py): a bug
    # there must still end the connection and every pending job, not vanish
    # into the event loop's exception handler.
    def broken(self: Client, packet: Any) -> None:
        raise RuntimeError("dispatch bug")

    monkeypatch.setattr(Client, "_dispatch", broken)
    async with Client(raw_fake.url) as client:
        running = asyncio.create_task(client.run("p", 1))
        [run] = await raw_fake.wait_for(lambda: raw_fake.seen(Run))
        [conn] = raw_fake.conns_of(Role.CLIENT)
        conn.send(Result(run.cookie, ResultCode.OK, result=1))
        with pytest.raises(BrokerWentAway, match="dispatch bug"):
            await asyncio.wait_for(running, 5)
        assert client._peer is not None and client._peer.closed


# ---------------------------------------------------------------------------
# Plain-function handlers run inline (no task); the job tasks leave no cycle


async def test_a_plain_function_handler_answers_inline_and_knows_its_job(
    raw_fake: FakeBroker,
) -> None:
    seen: list[tuple[uuid.UUID, str, asyncio.Task[Any] | None]] = []

    def plain(variables: Any) -> Any:
        job = current_job()
        seen.append((job.cookie, job.pipeline, asyncio.current_task()))
        return {"got": variables}

    worker = Worker(raw_fake.url, handlers={"plain": plain}, capacity=1, send_started=True)
    async with worker:
        await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        [conn] = raw_fake.conns_of(Role.WORKER)
        runs = [Run(new_cookie(), "plain", i) for i in range(3)]
        # More RUNs in one read than the capacity: each is answered before the
        # next is looked at, so none is refused.
        conn.writer.write(b"".join(encode(run) for run in runs))
        await raw_fake.wait_for(lambda: len(raw_fake.seen(Result)) == 3)
        assert worker.running_jobs == 0
    results = raw_fake.seen(Result)
    assert [(r.cookie, r.rc, r.result) for r in results] == [
        (run.cookie, ResultCode.OK, {"got": i}) for i, run in enumerate(runs)
    ]
    assert [s.cookie for s in raw_fake.seen(Started)] == [run.cookie for run in runs]
    assert seen == [(uuid.UUID(bytes=run.cookie), "plain", None) for run in runs]


@pytest.mark.parametrize("kind", ["coroutine", "function"])
async def test_a_handler_that_raises_on_its_first_step_answers_once_and_frees_its_slot(
    fake: FakeBroker, kind: str
) -> None:
    def plain_boom(variables: Any) -> Any:
        if variables == "boom":
            raise ValueError("boom")
        if variables == "cancel":
            raise asyncio.CancelledError  # its own, not the worker's
        return variables

    async def async_boom(variables: Any) -> Any:
        return plain_boom(variables)

    handler: Handler = async_boom if kind == "coroutine" else plain_boom
    worker = Worker(fake.url, handlers={"p": handler}, capacity=1)
    async with worker, Client(fake.url) as client:
        with pytest.raises(ProcessorException, match="ValueError: boom") as info:
            await client.run("p", "boom")
        assert info.value.stacktrace is not None
        assert any("plain_boom" in line for line in info.value.stacktrace)
        with pytest.raises(ProcessorException, match="CancelledError"):
            await client.run("p", "cancel")
        assert worker.running_jobs == 0
        assert await client.run("p", "after") == "after"  # the one slot is free
    assert [r.rc for r in fake.seen(Result, Role.WORKER)] == [
        ResultCode.PROCESSOR_EXCEPTION,
        ResultCode.PROCESSOR_EXCEPTION,
        ResultCode.OK,
    ]


async def test_context_variables_a_plain_handler_sets_stay_with_its_job(fake: FakeBroker) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("test_inline_var", default="unset")
    before: list[str] = []

    def plain(variables: Any) -> Any:
        before.append(var.get())
        var.set(variables)
        return variables

    async with Worker(fake.url, handlers={"plain": plain}), Client(fake.url) as client:
        assert [await client.run("plain", v) for v in ("a", "b")] == ["a", "b"]
    assert before == ["unset", "unset"]


async def test_a_plain_handler_that_returns_a_coroutine_has_it_awaited_and_cancellable(
    fake: FakeBroker,
) -> None:
    block = Blocker()
    async with (
        Worker(fake.url, handlers={"block": lambda v: block(v), "echo": lambda v: echo(v)}),
        Client(fake.url) as client,
    ):
        assert await client.run("echo", [1, 2]) == [1, 2]
        handle = await client.submit("block", 1)
        await block.entered.wait()
        await handle.cancel()
        with pytest.raises(Cancelled):
            await handle
        assert block.saw_cancel.is_set()
    assert [r.rc for r in fake.seen(Result, Role.WORKER)] == [
        ResultCode.OK,
        ResultCode.CANCELLED,
    ]


async def test_a_returned_coroutine_cancelled_before_its_first_step_is_closed(
    raw_fake: FakeBroker,
) -> None:
    made: list[Any] = []

    def plain(variables: Any) -> Any:
        made.append(echo(variables))
        return made[-1]

    worker = Worker(raw_fake.url, handlers={"plain": plain})
    async with worker:
        await raw_fake.wait_for(lambda: raw_fake.seen(Register))
        [conn] = raw_fake.conns_of(Role.WORKER)
        cookie = new_cookie()
        # RUN and CANCEL in one read: the job's task is cancelled before it runs.
        conn.writer.write(encode(Run(cookie, "plain", 1)) + encode(Cancel(cookie)))
        [answer] = await raw_fake.wait_for(lambda: raw_fake.seen(Result))
        assert answer.rc is ResultCode.CANCELLED
        assert worker.running_jobs == 0
    [coro] = made
    assert coro.cr_frame is None  # closed, not left to warn "never awaited"


@pytest.mark.parametrize("kind", ["coroutine", "function"])
async def test_finished_jobs_are_freed_without_the_cycle_collector(
    fake: FakeBroker, kind: str
) -> None:
    # A job's task context names the job, and the job its task: unless the
    # worker breaks that cycle, every job waits for the GC's collections (the
    # full ones stalled a busy worker for milliseconds: README, Benchmarks, SDK).
    def plain(variables: Any) -> Any:
        return variables

    handler: Handler = echo if kind == "coroutine" else plain
    async with Worker(fake.url, handlers={"p": handler}, capacity=8), Client(fake.url) as client:
        await client.run("p", 0)
        gc.collect()
        gc.disable()
        try:
            assert await asyncio.gather(*(client.run("p", i) for i in range(20))) == list(range(20))
            await fake.wait_for(lambda: len(fake.seen(Result, Role.WORKER)) == 21)
            left = [o for o in gc.get_objects() if isinstance(o, worker_mod._Job)]
        finally:
            gc.enable()
    assert left == []


async def test_run_takes_its_result_without_waiting_for_accepted() -> None:
    # run() needs the RESULT only; submit() still returns once ACCEPTED came.
    hello = Hello(version="fake", features=("accepted",), heartbeat_ms=None)
    broker = FakeBroker(hello_answer=hello, route=False)
    await broker.start()
    try:
        async with Client(broker.url) as client:
            running = asyncio.create_task(client.run("p", "ran"))
            [run] = await broker.wait_for(lambda: broker.seen(Run))
            [conn] = broker.conns_of(Role.CLIENT)
            conn.send(Result(run.cookie, ResultCode.OK, result="ran"))
            assert await running == "ran"
            submitting = asyncio.create_task(client.submit("p", "submitted"))
            await broker.wait_for(lambda: len(broker.seen(Run)) == 2)
            runs = broker.seen(Run)
            assert not submitting.done()
            conn.send(Accepted(runs[1].cookie))
            handle = await submitting
            assert handle.accepted and not handle.done()
            conn.send(Result(runs[1].cookie, ResultCode.OK, result="submitted"))
            assert await handle == "submitted"
    finally:
        await broker.close()


def test_fresh_cookies_are_16_bytes_and_never_repeat() -> None:
    count = 3 * client_mod._COOKIES_PER_READ + 5  # across several pool refills
    cookies = [client_mod._new_cookie() for _ in range(count)]
    assert {len(c) for c in cookies} == {16}
    assert len(set(cookies)) == count


# ---------------------------------------------------------------------------
# Pure: error mapping and backoff

EXPECTED_ERRORS: dict[ResultCode, type[JobError]] = {
    ResultCode.BAD_PACKET: errors.BadPacket,
    ResultCode.UNSUPPORTED_PACKET_TYPE: errors.UnsupportedPacketType,
    ResultCode.NO_CAPACITY: errors.NoCapacity,
    ResultCode.COOKIE_NOT_FOUND: errors.CookieNotFound,
    ResultCode.COOKIE_COLLISION: errors.CookieCollision,
    ResultCode.WORKER_WENT_AWAY: errors.WorkerWentAway,
    ResultCode.BROKER_WENT_AWAY: errors.BrokerWentAway,
    ResultCode.PROCESSOR_EXCEPTION: errors.ProcessorException,
    ResultCode.EXCEPTION: errors.JobException,
    ResultCode.CANCELLED: errors.Cancelled,
    ResultCode.TIMEOUT: errors.JobTimeout,
    ResultCode.UNAUTHORIZED: errors.Unauthorized,
}


@pytest.mark.parametrize("rc", [rc for rc in ResultCode if rc is not ResultCode.OK])
def test_error_for_maps_each_result_code_to_its_class(rc: ResultCode) -> None:
    cookie = new_cookie()
    exc = error_for(Result(cookie, rc, "why", ("line 1\n", "line 2\n")))
    assert type(exc) is EXPECTED_ERRORS[rc]
    assert exc.rc is rc
    assert (exc.error, exc.stacktrace) == ("why", ["line 1\n", "line 2\n"])
    assert exc.cookie == uuid.UUID(bytes=cookie)
    assert str(exc) == f"{rc.value}: why"
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), str(again), again.cookie) == (type(exc), str(exc), exc.cookie)


def test_error_without_text_or_cookie_reads_as_its_code() -> None:
    exc = error_for(Result(None, ResultCode.CANCELLED))
    assert (str(exc), exc.cookie, exc.stacktrace) == ("CANCELLED", None, None)
    assert not isinstance(exc, asyncio.CancelledError)


def test_error_for_refuses_ok() -> None:
    with pytest.raises(ValueError):
        error_for(Result(new_cookie(), ResultCode.OK))


def test_reconnect_delay_is_capped_exponential() -> None:
    delays = [reconnect_delay(n) for n in range(8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert reconnect_delay(10_000) == 5.0
