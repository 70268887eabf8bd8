"""Reliability under real failures: killed and frozen worker processes, a
client that stops reading, late RESULTs, and memory held after jobs end.

Workers that must be SIGKILLed or SIGSTOPped are real processes
(tests/worker_proc.py); everything is waited for by polling a broker
predicate or awaiting a packet, with a bound, never by a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Cancel,
    Hello,
    Ping,
    Pong,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import JobError, WorkerWentAway
from reasonbroker.sdk.worker import Worker
from tests import rawpeer
from tests.rawpeer import RawPeer
from tests.worker_proc import kill_all, spawn

# Worker processes start a Python interpreter: slow on a loaded machine.
PROC_WAIT_S = 30.0


def _config(**limits: int | float) -> Config:
    return Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
        ),
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


async def until(cond: Callable[[], bool], timeout_s: float = rawpeer.WAIT_S) -> None:
    """Poll a broker predicate (no packet announces it), bounded."""
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        kill_all(procs)


def worker_names(b: Broker) -> dict[str, int]:
    """Registered worker name (its HELLO name) -> connection id."""
    return {str(b.board._conns[conn].name): conn for conn in b.board.workers()}


class EchoStream:
    """A healthy client's steady stream of echo jobs, `concurrency` at a time."""

    def __init__(self, client: Client, pipeline: str = "echo", concurrency: int = 4) -> None:
        self.client = client
        self.pipeline = pipeline
        self.done_at: list[float] = []  # loop time of each completion
        self.errors: list[BaseException] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(concurrency)]

    @property
    def completed(self) -> int:
        return len(self.done_at)

    async def _loop(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not self._stop:
            value = f"{lane}:{n}"
            try:
                got = await self.client.run(self.pipeline, value, timeout=rawpeer.WAIT_S)
            except JobError as exc:
                self.errors.append(exc)
                return
            if got != value:
                self.errors.append(AssertionError(f"sent {value!r}, got {got!r}"))
                return
            self.done_at.append(loop.time())
            n += 1

    async def stop(self) -> None:
        self._stop = True
        async with asyncio.timeout(rawpeer.WAIT_S):
            await asyncio.gather(*self._tasks)
        assert self.errors == [], self.errors


# --------------------------------------------------------------------------- (a) job of death


async def test_job_of_death_ends_worker_went_away_after_its_attempts() -> None:
    async with Broker(_config()) as b, processes() as procs:
        url = b.address("worker")
        dying = [spawn(url, pipelines=("death",), name=f"death-{i}") for i in range(3)]
        procs += dying
        procs.append(spawn(url, capacity=4, pipelines=("echo",), name="echo"))
        await until(lambda: len(b.board.workers()) == 4, PROC_WAIT_S)
        async with Client(b.address("client")) as client:
            stream = EchoStream(client)
            await until(lambda: stream.completed >= 10)
            before = stream.completed
            # Each attempt runs 0.1 s, then its worker process SIGKILLs itself.
            with pytest.raises(WorkerWentAway) as info:
                await client.run("death", 0.1, max_attempts=3, timeout=rawpeer.WAIT_S)
            during = stream.completed - before
            await until(lambda: stream.completed >= before + during + 10)
            await stream.stop()
        assert info.value.error is not None and "attempt 3 of 3" in info.value.error
        stats = b.board.stats
        assert stats.requeued == 2
        assert stats.completed["WORKER_WENT_AWAY"] == 1
        await until(lambda: all(p.poll() is not None for p in dying), PROC_WAIT_S)
        assert [p.returncode for p in dying] == [-signal.SIGKILL] * 3
        assert during > 0  # the other jobs kept completing while workers died
        assert list(worker_names(b)) == ["echo"]
        await until(lambda: b.board.live_jobs == 0)
        assert b.board.slots(worker_names(b)["echo"]) == (4, 0)


# --------------------------------------------------------------------------- (b) half-open worker


async def test_frozen_worker_process_is_found_by_heartbeat_and_its_job_requeued() -> None:
    async with Broker(_config(heartbeat_ms=100)) as b, processes() as procs:
        url = b.address("worker")
        procs += [spawn(url, pipelines=("sleep",), name=n) for n in ("a", "b")]
        await until(lambda: len(b.board.workers()) == 2, PROC_WAIT_S)
        by_name = {name: procs[i] for i, name in enumerate(("a", "b"))}
        async with Client(b.address("client")) as client:
            handle = await client.submit("sleep", 1.0, max_attempts=2)
            await until(lambda: b.board.running == 1)
            busy = [n for n, conn in worker_names(b).items() if b.board.slots(conn)[1] == 1]
            assert len(busy) == 1
            frozen = by_name[busy[0]]
            frozen.send_signal(signal.SIGSTOP)  # alive to TCP, silent to the broker
            stopped_at = time.monotonic()
            await until(lambda: b.dead_peers == 1)
            detected_s = time.monotonic() - stopped_at
            async with asyncio.timeout(rawpeer.WAIT_S):
                assert await handle == 1.0  # the second attempt, on the other process
            frozen.send_signal(signal.SIGCONT)
            # Woken, it finds its connection gone and exits (it does not reconnect).
            await until(lambda: frozen.poll() is not None, PROC_WAIT_S)
            assert frozen.returncode == 0
        # Dropped after 3 to 3.5 beats of silence, counted from its last PING (up
        # to a beat before the SIGSTOP); a loaded machine may add a little.
        assert 0.1 <= detected_s < 3.0, detected_s
        stats = b.board.stats
        assert (stats.requeued, stats.completed["OK"], b.dead_peers) == (1, 1, 1)
        assert list(worker_names(b)) == [n for n in ("a", "b") if n != busy[0]]
        await until(lambda: b.board.live_jobs == 0)


# --------------------------------------------------------------------------- (c) slow consumer


async def test_slow_consumer_is_cut_off_while_the_rest_keep_their_throughput() -> None:
    limits = {"max_frame_bytes": 256 * 1024, "outbox_high_water_bytes": 512 * 1024}
    big_result = b"x" * (200 * 1024)

    async def big(_: Any) -> Any:
        return big_result

    async def echo(variables: Any) -> Any:
        return variables

    async with Broker(_config(**limits)) as b:
        url = b.address("worker")
        async with (
            Worker(url, handlers={"big": big}, capacity=16) as big_worker,
            Worker(url, handlers={"echo": echo}, capacity=4),
            Client(b.address("client")) as healthy,
        ):
            await until(lambda: len(b.board.workers()) == 2)
            stream = EchoStream(healthy)
            await until(lambda: stream.completed >= 50)
            # A client that asks for 64 x 200 KiB and never reads a byte.
            slow = await RawPeer.connect(b.address("client"), rcvbuf=4096)
            slow.send(Hello(role=Role.CLIENT))
            slow.send(*(Run(new_cookie(), "big", None) for _ in range(64)))
            first_slow_run = asyncio.get_running_loop().time()
            await until(lambda: b.slow_consumers == 1)
            cut_at = asyncio.get_running_loop().time()
            at_cut = stream.completed
            await until(lambda: stream.completed >= at_cut + 200)
            await stream.stop()
            await until(lambda: b.board.running == 0 and b.board.live_jobs == 0)
            assert big_worker.running_jobs == 0
            assert await slow.closed_by_peer()
        done = stream.done_at
        before = [t for t in done if t < first_slow_run]
        after = [t for t in done if t >= cut_at]
        assert len(before) >= 50 and len(after) >= 200
        # The healthy stream never stalled, before, during or after the cut-off.
        gaps = [later - earlier for earlier, later in itertools.pairwise(done)]
        assert max(gaps) < 2.0, max(gaps)
        assert b.slow_consumers == 1 and b.dead_peers == 0 and b.protocol_errors == 0
        assert b.board.stats.completed["OK"] >= stream.completed


# --------------------------------------------------------------------------- (d) late RESULT


async def _run_skipping_pings(peer: RawPeer) -> Run:
    while True:
        packet = await peer.recv()
        if isinstance(packet, Run):
            return packet
        assert isinstance(packet, Ping), packet


async def test_late_result_from_an_earlier_attempt_is_never_delivered() -> None:
    async with Broker(_config(heartbeat_ms=100)) as b:
        # Worker A said HELLO, so the heartbeat watches it; the client and
        # worker B are legacy peers (never pinged), so only A can go silent.
        a = await rawpeer.hello_worker(b.address("worker"), pipelines=("p",))
        client = await RawPeer.connect(b.address("client"))
        cookie = new_cookie()
        client.send(Run(cookie, "p", "job", max_attempts=2))
        first = await _run_skipping_pings(a)

        async def keep_a_alive() -> None:
            while True:
                a.send(Ping())
                await asyncio.sleep(0.02)

        # A stays audibly alive until B is registered (a job whose pipeline
        # nobody serves any more would end WORKER_WENT_AWAY instead).
        alive = asyncio.create_task(keep_a_alive())
        try:
            worker_b = await RawPeer.connect(b.address("worker"))
            worker_b.send(Register(1, ("p",)))
            await until(lambda: len(b.board.workers()) == 2)
        finally:
            alive.cancel()
        await until(lambda: b.dead_peers == 1)  # A fell silent: dropped, job re-queued
        second = await worker_b.recv_type(Run)
        assert second.cookie != first.cookie and second.variables == "job"
        worker_b.send(Result(second.cookie, ResultCode.OK, result="from B"))
        res = await client.recv_type(Result)
        assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, "from B")

        # A's late answer on its dead socket goes nowhere ...
        with contextlib.suppress(ConnectionError):
            a.send(Result(first.cookie, ResultCode.OK, result="late from A"))
        # ... and replayed on a new connection it is dropped: the attempt's
        # cookie belonged to the old connection.
        a2 = await rawpeer.hello_worker(b.address("worker"), pipelines=("other",))
        a2.send(Result(first.cookie, ResultCode.OK, result="late from A"), Ping())
        await a2.recv_type(Pong)
        assert b.board.stats.results_dropped == 1
        # B answering twice: the duplicate is dropped too.
        worker_b.send(Result(second.cookie, ResultCode.OK, result="duplicate from B"))
        await until(lambda: b.board.stats.results_dropped == 2)

        # Nothing more reached the client for that cookie: the next packet it
        # gets is the answer to a new job.
        again = new_cookie()
        client.send(Run(again, "p", "next"))
        run = await worker_b.recv_type(Run)
        worker_b.send(Result(run.cookie, ResultCode.OK, result="next"))
        res = await client.recv_type(Result)
        assert (res.cookie, res.result) == (again, "next")
        assert client.inbox == []
        stats = b.board.stats
        assert (stats.requeued, stats.completed["OK"], stats.dispatched) == (1, 2, 3)
        assert b.board.live_jobs == 0
        for peer in (a, a2, client, worker_b):
            await peer.close()


# --------------------------------------------------------------------------- memory after jobs end


async def _echo_worker_and_client(b: Broker) -> tuple[RawPeer, RawPeer]:
    worker = await RawPeer.connect(b.address("worker"))
    worker.send(Register(1))
    await until(lambda: len(b.board.workers()) == 1)
    return worker, await RawPeer.connect(b.address("client"))


async def test_jobs_that_end_before_their_deadline_are_not_retained() -> None:
    async with Broker(_config()) as b:
        worker, client = await _echo_worker_and_client(b)
        payload = b"v" * 10_000
        for _ in range(20):
            cookie = new_cookie()
            client.send(Run(cookie, "echo", payload, timeout_ms=600_000))
            run = await worker.recv_type(Run)
            worker.send(Result(run.cookie, ResultCode.OK, result="ok"))
            assert (await client.recv_type(Result)).cookie == cookie
        assert b.board.live_jobs == 0
        # Nothing is left of the 20 finished jobs (each with 10 kB of variables
        # and a 10-minute timeout) once they end, not when their timeouts pass.
        await until(lambda: len(b.board.deadlines.heap) == 0)


async def test_cancelled_queued_jobs_are_not_retained_once_the_queue_empties() -> None:
    async with Broker(_config()) as b:
        worker, client = await _echo_worker_and_client(b)
        running = new_cookie()
        client.send(Run(running, "echo", "first"))
        run = await worker.recv_type(Run)
        queued = [new_cookie() for _ in range(5)]
        client.send(*(Run(c, "echo", b"v" * 10_000) for c in queued))
        client.send(*(Cancel(c) for c in queued))
        for c in queued:
            res = await client.recv_type(Result)
            # A client without HELLO gets our own codes as EXCEPTION (section 6).
            assert (res.cookie, res.rc) == (c, ResultCode.EXCEPTION)
            assert res.error is not None and res.error.startswith("CANCELLED")
        worker.send(Result(run.cookie, ResultCode.OK, result="first"))
        assert (await client.recv_type(Result)).cookie == running
        assert b.board.live_jobs == 0 and b.board.queue_depth == 0
        # No dead heap entry (with its 10 kB of variables) is left behind.
        assert sum(len(heap) for heap in b.board.dispatcher.queues.values()) == 0
