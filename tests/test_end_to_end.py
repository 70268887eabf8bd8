"""The user's view: Client and Worker libraries through a real broker, over TCP and Unix."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import (
    Cancelled,
    JobTimeout,
    NoCapacity,
    ProcessorException,
    WorkerWentAway,
)
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S


@pytest.fixture(params=["tcp", "unix"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    with tempfile.TemporaryDirectory(prefix="rb") as tmp:
        if request.param == "tcp":
            listeners = (
                ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
                ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
            )
        else:
            listeners = (
                ListenerConfig(f"unix://{Path(tmp) / 'c.sock'}", ListenerRole.CLIENTS),
                ListenerConfig(f"unix://{Path(tmp) / 'w.sock'}", ListenerRole.WORKERS),
            )
        async with Broker(Config(listeners=listeners, limits=Limits(cancel_grace_ms=1000))) as b:
            yield b


async def boom(variables: Any) -> Any:
    raise ValueError(f"boom {variables}")


async def started(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(WAIT_S):
        await worker.registered.wait()
    return task


async def test_run_many_jobs_on_one_connection(broker: Broker) -> None:
    async with (
        Worker(broker.address("worker"), handlers={"echo": echo}, capacity=8) as w,
        Client(broker.address("client")) as client,
    ):
        await w.registered.wait()
        assert await client.run("echo", {"hello": "world"}, timeout=5.0) == {"hello": "world"}
        handles = [await client.submit("echo", i) for i in range(300)]
        assert await asyncio.gather(*handles) == list(range(300))
    assert broker.board.stats.completed["OK"] == 301


async def test_jobs_spread_over_workers(broker: Broker) -> None:
    seen: Counter[str] = Counter()
    gate = asyncio.Event()

    def handler(name: str) -> Any:
        async def run(variables: Any) -> Any:
            seen[name] += 1
            await gate.wait()
            return name

        return run

    workers = [
        Worker(broker.address("worker"), handlers={"job": handler(f"w{i}")}, capacity=4)
        for i in range(3)
    ]
    tasks = [await started(w) for w in workers]
    async with Client(broker.address("client")) as client:
        handles = [await client.submit("job", None) for _ in range(12)]
        async with asyncio.timeout(WAIT_S):
            while sum(seen.values()) < 12:  # noqa: ASYNC110 - waits for the handlers to run
                await asyncio.sleep(0.002)
        # 12 jobs over 3 equal workers, least loaded first: 4 each.
        assert seen == {"w0": 4, "w1": 4, "w2": 4}
        gate.set()
        await asyncio.gather(*handles)
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)


async def test_processor_exception_carries_the_stack_trace(broker: Broker) -> None:
    async with (
        Worker(broker.address("worker"), handlers={"boom": boom}) as w,
        Client(broker.address("client")) as client,
    ):
        await w.registered.wait()
        with pytest.raises(ProcessorException) as info:
            await client.run("boom", 7)
        assert info.value.error == "ValueError: boom 7"
        assert info.value.stacktrace is not None
        assert any("in boom" in line for line in info.value.stacktrace)


async def test_cancel_reaches_the_handler(broker: Broker) -> None:
    gate = Gate()
    async with (
        Worker(broker.address("worker"), handlers={"gate": gate}) as w,
        Client(broker.address("client")) as client,
    ):
        await w.registered.wait()
        handle = await client.submit("gate", 1)
        await gate.entered.wait()
        await handle.cancel()
        with pytest.raises(Cancelled):
            await handle
        assert gate.cancelled.is_set()
        gate.release.set()
        assert await client.run("gate", "after") == "after"  # the slot was freed


async def test_timeout_is_enforced_by_the_broker(broker: Broker) -> None:
    gate = Gate()
    async with (
        Worker(broker.address("worker"), handlers={"gate": gate}) as w,
        Client(broker.address("client")) as client,
    ):
        await w.registered.wait()
        with pytest.raises(JobTimeout):
            await client.run("gate", 1, timeout=0.05)
        async with asyncio.timeout(WAIT_S):
            await gate.cancelled.wait()  # the broker sent CANCEL to the worker


async def test_unknown_pipeline_is_no_capacity(broker: Broker) -> None:
    async with (
        Worker(broker.address("worker"), handlers={"echo": echo}) as w,
        Client(broker.address("client")) as client,
    ):
        await w.registered.wait()
        with pytest.raises(NoCapacity):
            await client.run("nobody-serves-this", 1)


async def test_worker_loss_is_reported_or_retried(broker: Broker) -> None:
    gate = Gate()
    worker = Worker(broker.address("worker"), handlers={"gate": gate}, reconnect=False)
    task = await started(worker)
    async with Client(broker.address("client")) as client:
        handle = await client.submit("gate", 1)
        await gate.entered.wait()
        task.cancel()  # the worker process dies: its connection drops mid-job
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(WorkerWentAway):
            await handle

        first, second = Gate(), Gate()
        w1 = Worker(broker.address("worker"), handlers={"gate": first}, reconnect=False)
        t1 = await started(w1)
        handle = await client.submit("gate", "retry me", max_attempts=2)
        await first.entered.wait()
        w2 = Worker(broker.address("worker"), handlers={"gate": second})
        t2 = await started(w2)
        t1.cancel()
        second.release.set()
        assert await handle == "retry me"
        assert broker.board.stats.requeued == 1
        w2.stop()
        await t2
