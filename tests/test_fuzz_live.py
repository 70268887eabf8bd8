"""Fuzzing a LIVE broker over loopback while a healthy client and worker keep working.

Hypothesis makes inputs -- valid packets (protocol.encode) and random maps,
then mutated: flipped bytes, truncation, inserted bytes, lying length
headers, deep nesting, random bytes -- and each one is sent on a fresh
connection to the clients' or the workers' listener, followed by EOF. The
broker runs in a background thread with its own event loop, where the Client
and Worker libraries keep a stream of jobs going the whole time.

Asserted: every fuzz connection is closed by the broker (never hangs), the
broker answers a probe after every input, nothing is logged as an internal
error, the healthy stream never sees an error, and afterwards the switchboard
holds no job, no leaked slot and no fuzz connection.

A fuzz input that registers a worker serving the healthy pipeline (a
REGISTER without `pipelines`, which serves all) is skipped: such a worker
could legitimately be sent the healthy client's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Any

import msgpack
import structlog
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reasonbroker.core.errors import EncodeError, RemoteProtocolError
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Cancel,
    Codec,
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
    Shutdown,
    Started,
    encode,
)
from reasonbroker.daemon import broker as broker_module
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import JobError
from reasonbroker.sdk.worker import Worker

HEALTHY = "healthy"  # the only pipeline the healthy client uses
MAX_EXAMPLES = 400
MIN_INPUTS = 300
IO_TIMEOUT_S = 10.0
LIMITS = Limits(max_frame_bytes=1024 * 1024, outbox_high_water_bytes=4 * 1024 * 1024)

# --------------------------------------------------------------------------- strategies

COOKIE = st.binary(min_size=16, max_size=16)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=24),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=8,
)
PIPELINES = st.sampled_from(["fuzz", HEALTHY, "nobody"])
KNOWN_TYPES = ["RUN", "RESULT", "CANCEL", "REGISTER", "HELLO", "PING", "PONG", "STARTED"]
PACKET_TYPES = st.sampled_from(
    [*KNOWN_TYPES, "PROGRESS", "SHUTDOWN", "run", "", "RUN\x00", "FROBNICATE"]
) | st.text(max_size=12)
KEYS = (
    "cookie pipeline variables detach priority timeout_ms max_attempts rc error stacktrace "
    "result capacity pipelines role token features name version heartbeat_ms"
).split()
FIELD_VALUES = st.one_of(
    VALUES,
    COOKIE,
    st.uuids().map(str),
    st.sampled_from([rc.value for rc in ResultCode]),
    st.sampled_from(["client", "worker", "fuzz"]),
    st.lists(st.text(max_size=8), max_size=3),
)

PACKETS: st.SearchStrategy[Packet] = st.one_of(
    st.builds(
        Run,
        COOKIE,
        PIPELINES,
        VALUES,
        st.booleans(),
        st.integers(-3, 3),
        st.none() | st.integers(1, 5000),
        st.none() | st.integers(1, 4),
    ),
    st.builds(
        Result,
        st.none() | COOKIE,
        st.sampled_from(list(ResultCode)),
        st.none() | st.text(max_size=20),
        st.none() | st.lists(st.text(max_size=10), max_size=2).map(tuple),
        VALUES,
    ),
    st.builds(Cancel, COOKIE),
    st.builds(Register, st.integers(1, 4), st.just(("fuzz",))),
    st.builds(
        Hello,
        st.none() | st.sampled_from(list(Role)),
        st.none() | st.text(max_size=8),
        st.lists(st.sampled_from(["started", "progress", "x"]), max_size=3).map(tuple),
        st.none() | st.text(max_size=8),
    ),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(Started, COOKIE),
    st.builds(Progress, COOKIE, VALUES),
    st.just(Shutdown()),
)


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _encode_map(d: dict[Any, Any], codec: Codec) -> bytes:
    if codec is Codec.JSON:
        with contextlib.suppress(TypeError, ValueError):
            return _frame(json.dumps(d).encode())
    return _frame(msgpack.packb(d, use_bin_type=True))


@st.composite
def frames(draw: st.DrawFn, codec: Codec) -> bytes:
    kind = draw(st.sampled_from(["packet"] * 3 + ["map"] * 2 + ["random", "deep"]))
    if kind == "packet":
        packet = draw(PACKETS)
        try:
            return encode(packet, codec)
        except EncodeError:  # JSON carries payloads as strings only
            return encode(packet, Codec.MSGPACK)
    if kind == "map":
        d: dict[Any, Any] = {}
        if draw(st.integers(0, 9)):
            d["packet_type"] = draw(PACKET_TYPES | FIELD_VALUES)
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
            d[key] = draw(FIELD_VALUES)
        return _encode_map(d, codec)
    if kind == "random":
        length = draw(
            st.sampled_from([0, 1, 2, 0xFFFFFFFF, 0x7FFFFFFF, 8 * 1024 * 1024]) | st.integers(0, 64)
        )
        return length.to_bytes(4, "big") + draw(st.binary(max_size=64))
    depth = draw(st.integers(1, 3000))
    where = draw(st.sampled_from(["variables", "top", "json"]))
    if where == "variables":
        body = msgpack.packb({"packet_type": "RUN", "cookie": b"c" * 16, "pipeline": "nobody"})
        body = b"\x84" + body[1:] + b"\xa9variables" + b"\x91" * depth + b"\xc0"
    elif where == "top":
        body = b"\x81\xa1a" + b"\x91" * depth + b"\xc0"
    else:
        body = b'{"packet_type":"RUN","variables":' + b"[" * depth + b"]" * depth + b"}"
    return _frame(body)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    op = draw(
        st.sampled_from(["none"] * 4 + ["flip"] * 2 + ["truncate", "insert", "header", "append"])
    )
    if op == "flip" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if op == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if op == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if op == "header" and len(data) >= 4:
        lie = draw(st.sampled_from([0, 1, 0xFFFFFFFF, 2**24]) | st.integers(0, 2 * len(data)))
        return lie.to_bytes(4, "big") + data[4:]
    if op == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    return data


@st.composite
def fuzz_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    target = draw(st.sampled_from(["client", "worker"]))
    codec = draw(st.sampled_from([Codec.MSGPACK, Codec.MSGPACK, Codec.JSON]))
    parts = []
    if draw(st.booleans()):  # a valid HELLO first, so the rest meets a known peer
        role = Role.WORKER if target == "worker" else Role.CLIENT
        parts.append(encode(Hello(role=role, name="fuzz"), codec))
    if target == "worker" and draw(st.booleans()):  # a registered worker, then garbage
        parts.append(encode(Register(draw(st.integers(1, 4)), ("fuzz",)), codec))
    for _ in range(draw(st.integers(1, 4))):
        parts.append(draw(frames(codec)))
    return target, draw(mutated(b"".join(parts)))


def registers_for_healthy(data: bytes) -> bool:
    """Whether the broker would register this input as a worker serving HEALTHY."""
    decoder = PacketDecoder(LIMITS.max_frame_bytes)
    try:
        packets = decoder.feed(data)
    except RemoteProtocolError:
        return False
    return any(
        isinstance(p, Register) and (p.pipelines is None or HEALTHY in p.pipelines) for p in packets
    )


# --------------------------------------------------------------------------- the live broker


class _CountEvents:
    """Replaces the broker's logger: counts events by name, prints nothing."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        self.counts[str(event.get("event"))] += 1
        raise structlog.DropEvent


async def _echo(variables: Any) -> Any:
    return variables


async def _until(cond: Callable[[], bool], timeout_s: float = IO_TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.005)


class LiveBroker:
    """A broker, a healthy Worker and a healthy Client on an event loop in a thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.broker: Broker | None = None
        self.ok = 0
        self.errors: list[str] = []
        self.loop_errors: list[str] = []
        self.fatal: str | None = None
        self.final: dict[str, Any] = {}
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="live-broker", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(30), "the live broker did not start"
        assert self.fatal is None, self.fatal

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the live broker did not stop"

    def address(self, role: str) -> tuple[str, int]:
        assert self.broker is not None
        host, _, port = self.broker.address(role).removeprefix("tcp://").rpartition(":")
        return host, int(port)

    def probe(self) -> int:
        """Ask the broker's loop for its connection count: proves it is alive and serving."""
        assert self.loop is not None

        async def connections() -> int:
            assert self.broker is not None
            return self.broker.connections

        return asyncio.run_coroutine_threadsafe(connections(), self.loop).result(IO_TIMEOUT_S)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.fatal = repr(exc)
        finally:
            self.ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        loop.set_exception_handler(lambda _, ctx: self.loop_errors.append(repr(ctx)))
        self._stop = asyncio.Event()
        config = Config(
            listeners=(
                ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
                ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
            ),
            limits=LIMITS,
        )
        async with Broker(config) as b:
            self.broker = b
            worker = Worker(b.address("worker"), handlers={HEALTHY: _echo}, capacity=4)
            async with worker, Client(b.address("client")) as client:
                async with asyncio.timeout(IO_TIMEOUT_S):
                    await worker.registered.wait()
                lanes = [asyncio.create_task(self._lane(client, i)) for i in range(3)]
                self.ready.set()
                await self._stop.wait()
                self._stopping = True
                await asyncio.gather(*lanes)
                board = b.board
                await _until(
                    lambda: (
                        board.live_jobs == 0
                        and all(board.slots(w) == (4, 0) for w in board.workers())
                    )
                )
                self.final["after"] = await client.run(HEALTHY, "after", timeout=IO_TIMEOUT_S)
                self.final["live_jobs"] = board.live_jobs
                self.final["slots"] = [board.slots(w) for w in board.workers()]
                self.final["conns"] = (sorted(board._conns), sorted(b._conns))
                self.final["protocol_errors"] = b.protocol_errors
                self.final["bad_packets"] = board.stats.bad_packets

    async def _lane(self, client: Client, lane: int) -> None:
        n = 0
        while not self._stopping:
            value = f"{lane}:{n}"
            try:
                got = await client.run(HEALTHY, value, timeout=IO_TIMEOUT_S)
            except JobError as exc:
                self.errors.append(f"{value}: {exc!r}")
                return
            if got != value:
                self.errors.append(f"sent {value!r}, got {got!r}")
                return
            self.ok += 1
            n += 1
            await asyncio.sleep(0.005)  # a steady stream, not a CPU hog


def exchange(address: tuple[str, int], data: bytes) -> None:
    """Send `data` on a fresh connection, then EOF; read until the broker closes."""
    with socket.create_connection(address, timeout=IO_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return  # the broker closed first (a protocol error mid-send)
        deadline = time.monotonic() + IO_TIMEOUT_S
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                return
            except TimeoutError:
                raise AssertionError(
                    f"the broker kept a connection open after EOF: {data!r}"
                ) from None
            if not chunk:
                return
            assert time.monotonic() < deadline, f"the broker keeps talking: {data!r}"


# --------------------------------------------------------------------------- the test


def test_fuzzed_connections_never_hurt_the_broker_or_the_healthy_stream() -> None:
    events = _CountEvents()
    saved_log = broker_module._log
    broker_module._log = structlog.wrap_logger(
        None,
        processors=[events],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    live = LiveBroker()
    tried = Counter[str]()
    try:
        live.start()

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(fuzz_inputs())
        def one_input(case: tuple[str, bytes]) -> None:
            target, data = case
            assume(not (target == "worker" and registers_for_healthy(data)))
            tried[target] += 1
            bugs_before = events.counts["internal_error"] + events.counts["encode_failed"]
            exchange(live.address(target), data)
            assert live.probe() >= 2  # alive, and the healthy client and worker are there
            assert live.errors == [], live.errors
            # Logged before the broker closed the connection, so already counted.
            bugs = events.counts["internal_error"] + events.counts["encode_failed"]
            assert bugs == bugs_before, "this input made the broker log internal_error"

        one_input()
        ok_during = live.ok
    finally:
        live.stop()
        broker_module._log = saved_log
    n = sum(tried.values())
    print(f"fuzz: {n} inputs ({dict(tried)}), healthy jobs during: {ok_during}")
    print(f"fuzz: broker events {dict(events.counts.most_common())}")
    assert n >= MIN_INPUTS
    assert tried["client"] > 0 and tried["worker"] > 0
    assert live.fatal is None, live.fatal
    assert live.errors == [], live.errors
    assert live.loop_errors == [], live.loop_errors
    assert events.counts["internal_error"] == 0, dict(events.counts)
    assert events.counts["encode_failed"] == 0, dict(events.counts)
    assert ok_during > 0
    final = live.final
    assert final["after"] == "after"
    assert final["live_jobs"] == 0
    assert final["slots"] == [(4, 0)]
    switchboard_conns, broker_conns = final["conns"]
    assert switchboard_conns == broker_conns and len(broker_conns) == 2  # no fuzz peer left
    assert final["protocol_errors"] > 0 and final["bad_packets"] > 0  # the fuzz got in


def test_registers_for_healthy_sees_what_the_broker_would() -> None:
    """The filter above decodes like the broker: a serve-all REGISTER is caught."""
    hello = encode(Hello(role=Role.WORKER))
    assert registers_for_healthy(hello + encode(Register(1)))
    assert registers_for_healthy(encode(Register(2, (HEALTHY, "x"))))
    assert not registers_for_healthy(hello + encode(Register(1, ("fuzz",))))
    assert not registers_for_healthy(b"\x00\x00\x00\x00" + encode(Register(1)))
