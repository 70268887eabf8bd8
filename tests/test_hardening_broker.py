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
from reasonbroker.core.packets import Hello, Ping, Pong, Register, Result, ResultCode, Role
from reasonbroker.daemon.authguard import AuthThrottle, Verdict, source_of
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


# -- item 13: failed authentication throttled per source address --------------------

TOKEN = "a-long-enough-t0ken-for-tests"


def test_auth_throttle_delays_then_blocks_then_forgets() -> None:
    limits = Limits(
        auth_failures_before_delay=2,
        auth_failures_before_block=4,
        auth_block_s=10.0,
        auth_failure_delay_ms=250,
    )
    throttle = AuthThrottle(limits)
    verdicts = [throttle.failed("10.0.0.1", float(i)) for i in range(4)]
    assert verdicts == [Verdict.CLOSE, Verdict.DELAY, Verdict.DELAY, Verdict.BLOCK]
    assert throttle.delay_s == 0.25
    assert throttle.blocked("10.0.0.1", 5.0) and not throttle.blocked("10.0.0.2", 5.0)
    assert not throttle.blocked("10.0.0.1", 13.5)  # blocked from 3.0 for 10 s
    throttle.prune(14.0)
    assert len(throttle) == 0
    assert throttle.failed("10.0.0.1", 14.0) is Verdict.CLOSE  # a fresh window


def test_source_address_is_the_host() -> None:
    assert source_of("127.0.0.1:5555") == "127.0.0.1"
    assert source_of("[::1]:5555") == "[::1]"
    assert source_of("unix:/tmp/rb.sock") == "unix"


async def _refused_after(url: str, token: str) -> tuple[float, list[Any]]:
    loop = asyncio.get_running_loop()
    peer = await RawPeer.connect(url)
    started = loop.time()
    peer.send(Hello(role=Role.CLIENT, token=token))
    assert await peer.closed_by_peer()
    await peer.close()
    return loop.time() - started, peer.inbox


async def test_repeated_wrong_tokens_are_delayed_then_the_address_is_blocked() -> None:
    config = Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH, token=TOKEN),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH),
        ),
        limits=Limits(
            auth_failures_before_delay=2,
            auth_failures_before_block=4,
            auth_failure_delay_ms=300,
            auth_block_s=30.0,
        ),
    )
    with structlog.testing.capture_logs() as logs:
        async with Broker(config) as broker:
            url, plain = broker.addresses[0][1], broker.addresses[1][1]
            took, inbox = await _refused_after(url, "wrong-1")
            assert took < 0.25 and [p.rc for p in inbox] == [ResultCode.UNAUTHORIZED]
            for n in (2, 3, 4):  # held before the answer from the 2nd on
                took, inbox = await _refused_after(url, f"wrong-{n}")
                assert took >= 0.28, n
                assert [p.rc for p in inbox] == [ResultCode.UNAUTHORIZED]
            # Blocked: even the right token is closed at once, unanswered.
            took, inbox = await _refused_after(url, TOKEN)
            assert inbox == [] and took < 0.25
            assert (broker.auth_failures, broker.auth_refused) == (4, 1)
            # A listener without a token is not affected.
            peer = await RawPeer.connect(plain)
            peer.send(Hello(role=Role.CLIENT), Ping())
            await peer.recv_type(Hello)
            await peer.recv_type(Pong)
            await peer.close()
            metrics = {m.name: m for m in broker.metrics_registry.collect()}
            assert metrics["reasonbroker_auth_failures"].samples[0].value == 4
            assert metrics["reasonbroker_auth_refused"].samples[0].value == 1
    blocked = [e for e in logs if e["event"] == "auth_blocked"]
    assert len(blocked) == 1 and blocked[0]["source"] == "127.0.0.1"
    assert all(TOKEN not in json.dumps(e, default=str) for e in logs)


async def test_a_short_token_is_warned_about_at_start_up_without_showing_it() -> None:
    config = Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS, token="sh0rt"),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS, token=TOKEN),
        )
    )
    with structlog.testing.capture_logs() as logs:
        async with Broker(config):
            pass
    short = [e for e in logs if e["event"] == "token_short"]
    assert [(e["key"], e["bytes"]) for e in short] == [("token", 5)]
    assert all("sh0rt" not in json.dumps(e, default=str) for e in logs)


# -- item 17: unfinished frames are bounded in time and in bytes ---------------------


async def test_a_frame_begun_and_never_finished_is_closed_after_frame_timeout() -> None:
    config = _config(frame_timeout_ms=300, heartbeat_ms=60_000)
    with structlog.testing.capture_logs() as logs:
        async with Broker(config) as broker:
            peer = await RawPeer.connect(broker.address("client"))
            peer.send(Hello(role=Role.CLIENT), Ping())
            await peer.recv_type(Hello)
            await peer.recv_type(Pong)
            loop = asyncio.get_running_loop()
            started = loop.time()
            peer.send_bytes((1024 * 1024).to_bytes(4, "big") + b"\x84" + bytes(1000))
            await until(lambda: broker.buffered_input > 0)
            assert await peer.closed_by_peer()
            took = loop.time() - started
            await peer.close()
            assert 0.25 <= took < 2.0
            assert broker.buffered_input == 0
    assert any(e["event"] == "frame_timeout" for e in logs)


async def test_buffered_partial_input_is_capped_across_connections() -> None:
    config = _config(max_frame_bytes=512 * 1024, max_buffered_input_bytes=1024 * 1024)
    async with Broker(config) as broker:
        url = broker.address("client")
        partial = (500 * 1024).to_bytes(4, "big") + b"\x84" + bytes(400 * 1024)
        first, second, third = [await RawPeer.connect(url) for _ in range(3)]
        first.send_bytes(partial)
        await until(lambda: broker.buffered_input >= 400 * 1024)
        second.send_bytes(partial)
        await until(lambda: broker.buffered_input >= 800 * 1024)
        third.send_bytes(partial)  # past the cap: this one is closed
        assert await third.closed_by_peer()
        assert broker.input_drops == 1
        assert broker.connections == 2
        await until(lambda: broker.buffered_input <= 1024 * 1024)
        for peer in (first, second, third):
            await peer.close()
        await until(lambda: broker.connections == 0)
        assert broker.buffered_input == 0


def test_max_buffered_input_must_hold_one_frame() -> None:
    from reasonbroker.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Limits(max_frame_bytes=1024, max_buffered_input_bytes=1000, outbox_high_water_bytes=4096)
    assert info.value.key == "max_buffered_input_bytes"
