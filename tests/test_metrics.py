"""Metrics: the switchboard's latency histogram (pure), the metrics_address
setting, and the /metrics endpoint of a real broker over loopback."""

from __future__ import annotations

import asyncio
import bisect
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from reasonbroker.cli import main
from reasonbroker.core.actions import Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.errors import ConfigError
from reasonbroker.core.limits import ListenerRole
from reasonbroker.core.protocol import Register, Result, ResultCode, Run
from reasonbroker.core.state import LATENCY_BOUNDS_S, Latency
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig, load_config
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import NoCapacity, ProcessorException
from reasonbroker.sdk.worker import Worker
from tests.rawpeer import WAIT_S

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# --------------------------------------------------------------------------- the histogram


def test_latency_buckets_by_upper_bound() -> None:
    h = Latency(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(seconds)
    # A value equal to a bound counts in that bound's bucket (Prometheus' "le").
    assert h.counts == [2, 2, 1]
    assert h.count == 5
    assert h.sum == pytest.approx(8.65)


@given(st.floats(0.0, 1000.0) | st.sampled_from(LATENCY_BOUNDS_S))
def test_latency_bucket_is_bisect_left(seconds: float) -> None:
    h = Latency()
    h.observe(seconds)
    assert h.counts.index(1) == bisect.bisect_left(LATENCY_BOUNDS_S, seconds)


def test_latency_defaults_and_bad_bounds() -> None:
    h = Latency()
    assert h.bounds == LATENCY_BOUNDS_S
    assert h.counts == [0] * (len(LATENCY_BOUNDS_S) + 1)
    with pytest.raises(ValueError, match="increasing"):
        Latency(bounds=(1.0, 0.5))


def test_switchboard_times_jobs_from_acceptance_to_terminal_result() -> None:
    board = Switchboard(Config().limits)
    board.connect(1, ListenerRole.CLIENTS)
    board.connect(2, ListenerRole.WORKERS)
    board.receive(2, Register(1), 0.0)
    (send,) = [a for a in board.receive(1, Run(b"c1", "p"), 10.0) if isinstance(a, Send)]
    assert isinstance(send.packet, Run)
    # The one slot is busy: this job queues, then times out (answered deep in tick).
    board.receive(1, Run(b"c2", "p", timeout_ms=250), 16.0)
    board.tick(16.25)
    board.receive(2, Result(send.packet.cookie, ResultCode.OK), 20.5)
    latency = board.latency
    assert latency.count == 2 == sum(board.stats.completed.values())
    assert latency.sum == 10.75
    assert latency.counts[LATENCY_BOUNDS_S.index(0.25)] == 1
    assert latency.counts[LATENCY_BOUNDS_S.index(30.0)] == 1  # 10.5 s: in (10, 30]


# --------------------------------------------------------------------------- configuration


def test_metrics_address_is_off_by_default_and_set_by_each_layer(tmp_path: Path) -> None:
    assert Config().metrics_address is None
    assert load_config(EXAMPLE, {}, {}).metrics_address is None
    # The example file names the key, commented out: TOML has no null for "off".
    assert '# metrics_address = "127.0.0.1:9464"' in EXAMPLE.read_text(encoding="utf-8")
    path = tmp_path / "rb.toml"
    path.write_text('metrics_address = "127.0.0.1:9464"\n', encoding="utf-8")
    assert load_config(path, {}, {}).metrics_address == "127.0.0.1:9464"
    env = {"REASONBROKER_METRICS_ADDRESS": "[::1]:9000"}
    assert load_config(path, env, {}).metrics_address == "[::1]:9000"
    flags = {"metrics_address": "localhost:0"}
    assert load_config(path, env, flags).metrics_address == "localhost:0"
    assert load_config(path, {}, {"metrics_address": ""}).metrics_address is None


@pytest.mark.parametrize("bad", ["9464", "host:", ":9464", "::1:9464", "h:99999", "h:x"])
def test_bad_metrics_address_names_its_key(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "rb.toml"
    path.write_text(f"metrics_address = {bad!r}\n".replace("'", '"'), encoding="utf-8")
    for args, key in (
        ((path, {}, {}), "metrics_address"),
        ((None, {"REASONBROKER_METRICS_ADDRESS": bad}, {}), "REASONBROKER_METRICS_ADDRESS"),
        ((None, {}, {"metrics_address": bad}), "metrics_address"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(*args)
        assert info.value.key == key
    with pytest.raises(ConfigError) as info:
        Config(metrics_address=bad)
    assert info.value.key == "metrics_address"


def test_serve_metrics_flag_error_names_the_flag() -> None:
    result = CliRunner().invoke(main, ["serve", "--metrics", "nope"])
    assert result.exit_code == 2
    assert "--metrics" in result.output


# --------------------------------------------------------------------------- the endpoint


def _listeners() -> tuple[ListenerConfig, ...]:
    return (
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
    )


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


async def _http(address: str, request: bytes) -> bytes:
    """Everything the server sends back for `request`, up to its close."""
    reader, writer = await asyncio.open_connection(*_host_port(address))
    try:
        writer.write(request)
        async with asyncio.timeout(WAIT_S):
            return await reader.read()
    finally:
        writer.close()


async def _scrape(address: str) -> Samples:
    response = await _http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    status, *headers = head.decode().split("\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert any(h.lower().startswith("content-type: text/plain; version=") for h in headers)
    assert f"Content-Length: {len(body)}" in headers
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


async def echo(variables: object) -> object:
    return variables


async def boom(variables: object) -> object:
    raise ValueError("boom")


async def test_metrics_endpoint_reports_the_broker() -> None:
    config = Config(listeners=_listeners(), metrics_address="127.0.0.1:0")
    async with (
        Broker(config) as broker,
        Worker(broker.address("worker"), handlers={"echo": echo, "boom": boom}, capacity=2) as w,
        Client(broker.address("client")) as client,
    ):
        assert broker.metrics_address is not None
        await w.registered.wait()
        for i in range(3):
            assert await client.run("echo", i) == i
        with pytest.raises(ProcessorException):
            await client.run("boom", None)
        with pytest.raises(NoCapacity):
            await client.run("nobody-serves-this", None)
        # A connection that has not said anything yet has no role.
        _, idle = await asyncio.open_connection(*_host_port(broker.address("client")))
        try:
            async with asyncio.timeout(WAIT_S):
                while broker.connections < 3:  # noqa: ASYNC110 - the accept has no event to await
                    await asyncio.sleep(0.002)
            m = await _scrape(broker.metrics_address)
        finally:
            idle.close()

    assert m[("reasonbroker_connections", (("role", "client"),))] == 1
    assert m[("reasonbroker_connections", (("role", "worker"),))] == 1
    assert m[("reasonbroker_connections", (("role", "unidentified"),))] == 1
    assert m[("reasonbroker_workers", ())] == 1
    assert m[("reasonbroker_slots_total", ())] == 2
    assert m[("reasonbroker_slots_free", ())] == 2
    assert m[("reasonbroker_queue_depth", ())] == 0
    assert m[("reasonbroker_jobs_running", ())] == 0
    assert m[("reasonbroker_jobs_accepted_total", ())] == 4
    assert m[("reasonbroker_jobs_dispatched_total", ())] == 4
    assert m[("reasonbroker_jobs_completed_total", (("code", "OK"),))] == 3
    assert m[("reasonbroker_jobs_completed_total", (("code", "PROCESSOR_EXCEPTION"),))] == 1
    assert m[("reasonbroker_jobs_rejected_total", (("code", "NO_CAPACITY"),))] == 1
    for name in ("requeues", "cancels", "protocol_errors", "slow_consumers", "dead_peers"):
        assert m[(f"reasonbroker_{name}_total", ())] == 0
    assert m[("reasonbroker_uptime_seconds", ())] > 0
    assert m[("reasonbroker_job_latency_seconds_count", ())] == 4
    assert m[("reasonbroker_job_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert 0 < m[("reasonbroker_job_latency_seconds_sum", ())] < WAIT_S


async def test_metrics_are_off_by_default() -> None:
    async with Broker(Config(listeners=_listeners())) as broker:
        assert broker.metrics_address is None


async def test_metrics_endpoint_answers_404_to_anything_else() -> None:
    async with Broker(Config(listeners=_listeners(), metrics_address="127.0.0.1:0")) as broker:
        address = broker.metrics_address
        assert address is not None
        # Neither /metrics nor the dashboard's (/, /static/..., /api/...; test_dashboard.py).
        response = await _http(address, b"GET /nothing-here HTTP/1.1\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 404 Not Found\r\n")
        # Other methods: 405 (tests/test_metrics_http.py).
        # A request head past the size limit is not answered: the connection closes.
        assert await _http(address, b"GET /" + b"x" * 20_000) == b""
    # Closed with the broker.
    with pytest.raises(OSError):
        await asyncio.open_connection(*_host_port(address))
