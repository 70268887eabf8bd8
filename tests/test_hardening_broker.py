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
from reasonbroker.daemon.ratelimit import LogRateLimiter
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


# -- item 14: peer-caused log events are rate-limited, with a summary ---------------


def test_rate_limiter_allows_a_few_per_window_then_summarises() -> None:
    limiter = LogRateLimiter(per_s=2)
    assert [limiter.allow("bad_packet", 0.0 + i / 100)[0] for i in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert limiter.allow("protocol_error", 0.1) == (True, 0)  # each event its own budget
    assert limiter.allow("connection_opened", 0.1) == (True, 0)  # not peer-caused: never limited
    # The next window's first line reports the suppressed ones of the last.
    assert limiter.allow("bad_packet", 1.5) == (True, 3)
    for _ in range(4):
        limiter.allow("bad_packet", 1.6)
    assert limiter.flush(2.0) == []  # that window is not over yet
    assert limiter.flush(2.6) == [("bad_packet", 3)]  # 1 + 1 allowed, 3 not
    assert limiter.flush(9.0) == []
    assert LogRateLimiter(per_s=0).allow("bad_packet", 0.0) == (True, 0)


async def test_a_flood_of_bad_connections_logs_a_few_lines_and_a_summary() -> None:
    config = _config(peer_log_lines_per_s=3, heartbeat_ms=400)
    with structlog.testing.capture_logs() as logs:
        async with Broker(config) as broker:
            url = broker.address("client")
            for _ in range(12):
                peer = await RawPeer.connect(url)
                peer.send_bytes(b"\x00\x00\x00\x03abc")  # neither msgpack nor JSON
                assert await peer.closed_by_peer()
                await peer.close()
            await until(lambda: broker.protocol_errors == 12)
            await until(lambda: any(e["event"] == "log_suppressed" for e in logs))
    errors = [e for e in logs if e["event"] == "protocol_error"]
    summaries = [e for e in logs if e["event"] == "log_suppressed"]
    assert 3 <= len(errors) < 12
    assert all(e["of"] == "protocol_error" for e in summaries)
    assert len(errors) + sum(e["suppressed"] for e in summaries) == 12
