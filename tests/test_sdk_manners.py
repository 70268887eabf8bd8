"""The client and worker libraries inside other people's programs (issue 19, items 5 and 6).

Logging goes through the stdlib tree and is silent until the application
configures it; a worker that cannot reach the broker does not log a line per
retry; `Worker.wait_registered` does not hang; a cancel says who cancelled;
a job the caller gave up on does not print "Future exception was never
retrieved".
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk import worker as worker_mod
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import BrokerConnectionError, Cancelled, ConnectTimeout
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S

ROOT = Path(__file__).resolve().parent.parent


def _refused_url() -> str:
    """A loopback port nobody listens on: bound and closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    listeners = (
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
    )
    async with Broker(Config(listeners=listeners)) as b:
        yield b


# --------------------------------------------------------------------------- 5: silent by default

# A program using both libraries against a live broker and an unreachable one.
# The broker (daemon code) logs through structlog's global configuration,
# which the program turns off; the libraries must not depend on it.
_PROGRAM = """
import asyncio, logging, sys
import structlog
from reasonbroker.sdk import worker as worker_mod
from reasonbroker.daemon.broker import Broker
from reasonbroker.sdk.client import Client
from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.errors import BrokerConnectionError, ConnectTimeout
from reasonbroker.sdk.worker import Worker

def drop(*args):
    raise structlog.DropEvent
structlog.configure(processors=[drop])
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
worker_mod.reconnect_delay = lambda attempt: 0.001

async def echo(variables):
    return variables

async def main():
    listeners = (
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
    )
    async with Broker(Config(listeners=listeners)) as broker:
        async with Worker(broker.address("worker"), handlers={"echo": echo}) as w:
            await w.wait_registered(10)
            async with Client(broker.address("client")) as client:
                assert await client.run("echo", "x", timeout=10) == "x"
    lost = Worker(sys.argv[2], handlers={"echo": echo})
    serving = asyncio.create_task(lost.run())
    try:
        await lost.wait_registered(0.3)
    except ConnectTimeout:
        pass
    lost.stop()
    await serving
    try:
        await Client(sys.argv[2]).connect()
    except BrokerConnectionError:
        pass
    print("done")

asyncio.run(main())
"""


def _program(mode: str) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode, _refused_url()],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT_S * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_libraries_are_silent_unless_the_application_configures_logging() -> None:
    out, err = _program("silent")
    assert out == "done\n"
    assert err == ""


def test_libraries_log_through_the_stdlib_tree_once_configured() -> None:
    out, err = _program("configured")
    assert out == "done\n"
    lines = err.splitlines()
    assert any(line.startswith("reasonbroker.worker worker_registered ") for line in lines), err
    assert any(line.startswith("reasonbroker.client client_connected ") for line in lines), err
    # One readable line per event for a plain stdlib formatter, not a dict repr.
    failed = [line for line in lines if " worker_connect_failed " in line]
    assert failed, err
    assert "error='cannot connect to tcp://127.0.0.1:" in failed[0]


# --------------------------------------------------------------------------- 5: retries


class _Records(logging.Handler):
    def __init__(self, event: str, count: int) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.enough = asyncio.Event()
        self._event, self._count = event, count

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if sum(1 for r in self.records if _event(r) == self._event) >= self._count:
            self.enough.set()


def _event(record: logging.LogRecord) -> Any:
    return _field(record, "event")


def _field(record: logging.LogRecord, key: str) -> Any:
    return record.msg.get(key) if isinstance(record.msg, dict) else None


@pytest.fixture
def worker_records(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Records]:
    monkeypatch.setattr(worker_mod, "reconnect_delay", lambda attempt: 0.0)
    handler = _Records("worker_reconnecting", 100)
    logger = logging.getLogger("reasonbroker.worker")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_unreachable_broker_is_logged_on_change_then_at_a_backoff(
    worker_records: _Records,
) -> None:
    w = Worker(_refused_url(), handlers={"echo": echo})
    serving = asyncio.create_task(w.run())
    async with asyncio.timeout(WAIT_S):
        await worker_records.enough.wait()
    w.stop()
    await serving
    records = worker_records.records
    retries = [r for r in records if _event(r) == "worker_reconnecting"]
    assert all(r.levelno == logging.DEBUG for r in retries)
    failed = [r for r in records if _event(r) == "worker_connect_failed"]
    attempts = max(_field(r, "attempt") for r in retries) + 1
    # The 1st, 2nd, 4th, 8th... failure, then every 64th: not one line per retry.
    expected = [n for n in range(1, attempts + 1) if n & (n - 1) == 0 or n % 64 == 0]
    assert [_field(r, "attempts") for r in failed] == expected[: len(failed)]
    assert len(failed) >= len(expected) - 1
    assert len(failed) <= 8 < len(retries)
    assert all(r.levelno == logging.WARNING for r in failed)
    assert "Connection refused" in _field(failed[0], "error")


# --------------------------------------------------------------------------- 5: wait_registered


async def test_wait_registered_times_out_naming_the_broker_and_the_error() -> None:
    url = _refused_url()
    w = Worker(url, handlers={"echo": echo})
    serving = asyncio.create_task(w.run())
    try:
        with pytest.raises(ConnectTimeout) as info:
            await w.wait_registered(0.2)
        assert isinstance(info.value, TimeoutError)
        message = str(info.value)
        assert message.startswith(f"not registered with the broker at {url} within 0.2 s")
        assert "last error: cannot connect to" in message
    finally:
        w.stop()
        await serving
    # Once run() has ended there is nothing to wait for.
    with pytest.raises(BrokerConnectionError, match="the worker has stopped: not registered"):
        await w.wait_registered(WAIT_S)


async def test_wait_registered_returns_once_registered(broker: Broker) -> None:
    async with Worker(broker.address("worker"), handlers={"echo": echo}) as w:
        await w.wait_registered(WAIT_S)
        assert w.registered.is_set()
        await w.wait_registered(0)  # already registered: at once


# --------------------------------------------------------------------------- 6: who cancelled


@pytest.fixture
async def gated(broker: Broker) -> AsyncIterator[tuple[Client, Gate]]:
    gate = Gate()
    async with Worker(broker.address("worker"), handlers={"gate": gate}, capacity=1) as w:
        await w.wait_registered(WAIT_S)
        async with Client(broker.address("client")) as client:
            yield client, gate
        gate.release.set()


async def test_a_running_job_cancelled_by_this_client_says_so(
    gated: tuple[Client, Gate],
) -> None:
    client, gate = gated
    handle = await client.submit("gate", 1)
    async with asyncio.timeout(WAIT_S):
        await gate.entered.wait()
    await handle.cancel()
    with pytest.raises(Cancelled) as info:
        async with asyncio.timeout(WAIT_S):
            await handle
    assert info.value.by == "client"
    assert str(info.value) == "CANCELLED: cancelled by this client (JobHandle.cancel())"
    assert gate.cancelled.is_set()


async def test_a_queued_job_cancelled_by_this_client_says_so(gated: tuple[Client, Gate]) -> None:
    client, gate = gated
    running = await client.submit("gate", 1)
    async with asyncio.timeout(WAIT_S):
        await gate.entered.wait()
    queued = await client.submit("gate", 2)  # capacity 1: it waits in the queue
    await queued.cancel()
    with pytest.raises(Cancelled) as info:
        async with asyncio.timeout(WAIT_S):
            await queued
    assert info.value.by == "client"
    assert "cancelled by this client" in str(info.value)
    gate.release.set()
    async with asyncio.timeout(WAIT_S):
        assert await running == 1


def test_a_cancelled_result_nobody_asked_for_is_the_brokers() -> None:
    assert Cancelled("cancelled by client").by == "broker"


# --------------------------------------------------------------------------- 3: never retrieved


async def test_jobs_left_pending_at_close_print_no_never_retrieved(
    gated: tuple[Client, Gate],
) -> None:
    client, gate = gated
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        handles = [await client.submit("gate", i) for i in range(2)]
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
        await handles[1].cancel()  # cancelled and never awaited
        await client.close()  # the other one pending at close, never awaited
        assert all(h.done() for h in handles)
        del handles
        gc.collect()
    finally:
        loop.set_exception_handler(old)
    assert [c.get("message") for c in reported] == []
