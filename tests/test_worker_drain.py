"""A draining worker (issue 19, item 2): DRAIN takes it out of dispatch, and a
RUN it RETURNs goes to another worker without spending an attempt. Pure
switchboard rules first, then the SDK Worker against a real Broker on
loopback (bounded waits, no sleeps as synchronisation)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from reasonbroker.core.actions import Action, Close, Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.packets import (
    Drain,
    Hello,
    Register,
    ResultCode,
    Return,
    Role,
    Run,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.worker import Worker
from tests.rawpeer import WAIT_S


def _sent(actions: list[Action], conn: int) -> list[Any]:
    return [a.packet for a in actions if isinstance(a, Send) and a.conn == conn]


def _board() -> Switchboard:
    board = Switchboard(Limits(legacy_slot_reuse_ms=0))
    for worker in (1, 2):
        board.connect(worker, ListenerRole.BOTH)
        board.receive(worker, Hello(role=Role.WORKER), 0.0)
        board.receive(worker, Register(1), 0.0)
    board.connect(9, ListenerRole.BOTH)
    board.receive(9, Hello(role=Role.CLIENT), 0.0)
    return board


def test_drain_is_echoed_and_no_new_run_reaches_the_worker() -> None:
    board = _board()
    out = board.receive(1, Drain(), 0.0)
    assert _sent(out, 1) == [Drain()]
    assert board.workers() == [2]
    for _ in range(2):
        board.receive(9, Run(new_cookie(), "p", None), 0.0)
    assert board.slots(1) == (1, 0)
    assert board.slots(2) == (1, 1) and board.queue_depth == 1


def test_a_returned_run_goes_elsewhere_without_spending_an_attempt() -> None:
    board = _board()
    cookie = new_cookie()
    out = board.receive(9, Run(cookie, "p", None, max_attempts=1), 0.0)
    ((to, run),) = [(a.conn, a.packet) for a in out if isinstance(a, Send)]
    assert isinstance(run, Run)
    other = 2 if to == 1 else 1
    out = board.receive(to, Return(run.cookie), 0.0)  # RETURN drains it too
    (again,) = _sent(out, other)
    assert isinstance(again, Run) and again.pipeline == "p"
    assert board.workers() == [other]
    # Its one attempt is still to come: the other worker leaving now says 1 of 1.
    out = board.disconnect(other, 0.0)
    (answer,) = _sent(out, 9)
    assert answer.rc is ResultCode.WORKER_WENT_AWAY
    assert answer.error == "the worker went away (attempt 1 of 1)"


def test_a_returned_run_nobody_else_serves_is_no_capacity() -> None:
    board = _board()
    board.receive(2, Drain(), 0.0)
    cookie = new_cookie()
    out = board.receive(9, Run(cookie, "p", None), 0.0)
    (run,) = _sent(out, 1)
    out = board.receive(1, Return(run.cookie), 0.0)
    (answer,) = _sent(out, 9)
    assert (answer.cookie, answer.rc) == (cookie, ResultCode.NO_CAPACITY)
    assert board.live_jobs == 0


def test_drain_from_a_client_or_a_legacy_worker_is_refused() -> None:
    board = _board()
    out = board.receive(9, Drain(), 0.0)
    assert [p.rc for p in _sent(out, 9)] == [ResultCode.BAD_PACKET]
    board.connect(5, ListenerRole.BOTH)
    board.receive(5, Register(1), 0.0)  # no HELLO: a ReasonChip worker
    out = board.receive(5, Return(new_cookie()), 0.0)
    # ReasonChip's worker never sends it; one that does is closed (never sent a RESULT).
    assert any(isinstance(a, Close) and a.conn == 5 for a in out)
    assert _sent(out, 5) == []


# ------------------------------------------------------------------ SDK on loopback


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


@pytest.fixture
async def broker() -> Any:
    config = Config(listeners=(ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH),))
    async with Broker(config) as b:
        yield b


async def test_a_stopping_sdk_worker_gets_no_new_runs(broker: Broker) -> None:
    url = broker.address("worker")
    ran: list[str] = []
    gate = asyncio.Event()

    def handler(name: str) -> Any:
        async def handle(variables: Any) -> Any:
            ran.append(name)
            if variables == "hold":
                await gate.wait()
            return name

        return handle

    a = Worker(url, handlers={"echo": handler("A")}, capacity=2, name="A")
    b = Worker(url, handlers={"echo": handler("B")}, capacity=2, name="B")
    async with a, b:
        await a.wait_registered(WAIT_S)
        await b.wait_registered(WAIT_S)
        async with Client(broker.address("client")) as client:
            held = [asyncio.ensure_future(client.run("echo", "hold")) for _ in range(2)]
            await until(lambda: len(ran) == 2)
            holder = "A" if ran.count("A") else "B"
            stopping, other = (a, b) if holder == "A" else (b, a)
            await until(lambda: stopping.running_jobs >= 1)
            stopping.stop()  # it still runs a held job, and says DRAIN
            await until(lambda: len(broker.board.workers()) == 1)
            ran.clear()
            results = [await client.run("echo", "x", max_attempts=1) for _ in range(4)]
            assert set(results) == {other.name}
            assert set(ran) == {other.name}
            gate.set()
            assert set(await asyncio.gather(*held)) <= {"A", "B"}


async def test_a_run_that_crosses_the_drain_is_returned_not_lost(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = broker.address("worker")
    ran: list[str] = []
    gate_a, gate_b = asyncio.Event(), asyncio.Event()

    def handler(name: str) -> Any:
        async def handle(variables: Any) -> Any:
            ran.append(f"{name}:{variables}")
            if variables == "hold":
                await (gate_a if name == "A" else gate_b).wait()
            return name

        return handle

    b = Worker(url, handlers={"echo": handler("B")}, capacity=1, name="B")
    a = Worker(url, handlers={"echo": handler("A")}, capacity=2, name="A")
    async with b:
        await b.wait_registered(WAIT_S)
        async with Client(broker.address("client")) as client:
            job0 = asyncio.ensure_future(client.run("echo", "hold"))  # B is full
            await until(lambda: ran == ["B:hold"])
            async with a:
                await a.wait_registered(WAIT_S)
                job1 = asyncio.ensure_future(client.run("echo", "hold"))  # A: 1 of 2
                await until(lambda: "A:hold" in ran)
                # A stops, but its DRAIN is late: the broker still sends it a RUN.
                monkeypatch.setattr(a, "_announce_drain", lambda peer: False)
                a.stop()
                job2 = asyncio.ensure_future(client.run("echo", "late", max_attempts=1))
                await until(lambda: broker.board.queue_depth == 1)  # returned, re-queued
                assert len(broker.board.workers()) == 1  # A drains since its RETURN
                gate_b.set()  # B finishes job0, then takes job2
                assert await job2 == "B"
                assert "A:late" not in ran and "B:late" in ran
                assert await job0 == "B"
                gate_a.set()
                assert await job1 == "A"
    assert broker.board.stats.requeued == 0
