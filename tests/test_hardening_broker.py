"""Hardening against hostile peers (issue 19, items 12-22), the broker's own
rules: a real Broker on loopback (port 0) and raw peers. Every wait is
bounded (WAIT_S); every flood is a small, fixed count.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import pytest
import structlog

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.packets import Hello, Ping, Pong, Register, Result, Role
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from tests.rawpeer import WAIT_S, RawPeer


def _config(**limits: Any) -> Config:
    return Config(
        listeners=(ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH),),
        limits=Limits(**limits),
    )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(_config()) as b:
        yield b


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


def _line_bytes(event: MutableMapping[str, Any]) -> int:
    return len(json.dumps(event, default=str))


# -- item 12: no log line grows with what a peer sends ------------------------------


async def test_repeated_registers_of_many_long_pipelines_log_small_lines(broker: Broker) -> None:
    url = broker.address("worker")
    with structlog.testing.capture_logs() as logs:
        w = await RawPeer.connect(url)
        w.send(Hello(role=Role.WORKER, name="n" * 200))
        await w.recv_type(Hello)
        names = tuple(f"{i:05}" + "p" * 1000 for i in range(2000))
        for _ in range(3):  # the probe's repeated REGISTER of the same list
            w.send(Register(1, names))
        w.send(Register(1, ("x" * 2000,)))  # over max_pipeline_name_bytes
        w.send(Ping())
        await w.recv_type(Result)
        await w.recv_type(Pong)
        await w.close()
        await until(lambda: broker.connections == 0)
    registered = [e for e in logs if e["event"] == "worker_registered"]
    assert len(registered) == 3
    assert registered[0]["pipelines_total"] == 2000
    assert registered[1]["pipelines"] == [] and registered[2]["pipelines"] == []
    assert any(e["event"] == "bad_packet" for e in logs)
    assert max(_line_bytes(e) for e in logs) < 8_000, max(logs, key=_line_bytes)
