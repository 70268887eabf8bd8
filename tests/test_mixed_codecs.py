"""Mixed fleets over loopback: JSON (ReasonChip's codec) and msgpack peers on one broker.

The JSON peers here behave like ReasonChip's own client and worker: they
never say HELLO (so they are "legacy" peers), send pydantic-style frames with
all ten SocketPacket keys (null for unset), cookies as canonical UUID strings
and payloads as JSON text. Frames the broker sends them are read raw, so the
tests see exactly the bytes ReasonChip's `SocketPacket.model_validate_json`
would see.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    LEGACY_RESULT_CODES,
    Cancel,
    Codec,
    Result,
    ResultCode,
    Run,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from tests import rawpeer
from tests.rawpeer import WAIT_S, RawPeer

# The keys of ReasonChip's SocketPacket, which dumps every one of them.
TEN_KEYS = frozenset(
    (
        "packet_type",
        "cookie",
        "capacity",
        "pipeline",
        "variables",
        "detach",
        "rc",
        "error",
        "stacktrace",
        "result",
    )
)


def _config(**limits: int | float) -> Config:
    return Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
        ),
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(_config()) as b:
        yield b


async def until(cond: Callable[[], bool]) -> None:
    """Poll broker state that no packet announces (a legacy REGISTER has no reply)."""
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a bounded predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


# -- ReasonChip-style JSON peers ---------------------------------------------------


def send_json(peer: RawPeer, **fields: Any) -> None:
    """Send a frame exactly as ReasonChip's pydantic SocketPacket dumps it."""
    packet = dict.fromkeys(sorted(TEN_KEYS)) | fields
    body = json.dumps(packet, separators=(",", ":")).encode()
    peer.send_bytes(len(body).to_bytes(4, "big") + body)


async def recv_json(peer: RawPeer) -> dict[str, Any]:
    """Read one raw frame and check it is what ReasonChip's SocketPacket expects."""
    assert not peer.inbox and peer.decoder.buffered == 0, "mixing raw and decoded reads"
    async with asyncio.timeout(WAIT_S):
        size = int.from_bytes(await peer.reader.readexactly(4), "big")
        body = await peer.reader.readexactly(size)
    assert body[:1] == b"{", body
    packet = json.loads(body)
    assert isinstance(packet, dict)
    assert set(packet) == TEN_KEYS, f"not the ten SocketPacket keys: {sorted(packet)}"
    cookie = packet["cookie"]
    if cookie is not None:
        assert isinstance(cookie, str) and str(uuid.UUID(cookie)) == cookie, cookie
    for key in ("variables", "result"):
        assert packet[key] is None or isinstance(packet[key], str), (key, packet[key])
    return packet


async def legacy_json_worker(b: Broker, capacity: int) -> RawPeer:
    """A worker that behaves like ReasonChip's: no HELLO, a JSON REGISTER."""
    before = len(b.board.workers())
    w = await RawPeer.connect(b.address("worker"), codec=Codec.JSON)
    send_json(w, packet_type="REGISTER", capacity=capacity)
    await until(lambda: len(b.board.workers()) > before)
    return w


async def legacy_json_client(b: Broker) -> RawPeer:
    return await RawPeer.connect(b.address("client"), codec=Codec.JSON)


def json_run(peer: RawPeer, pipeline: str, variables: str | None, **extra: Any) -> str:
    """A ReasonChip client's RUN (plus any reasonbroker fields in `extra`); returns the cookie."""
    cookie = str(uuid.uuid4())
    send_json(
        peer,
        packet_type="RUN",
        cookie=cookie,
        pipeline=pipeline,
        variables=variables,
        detach=False,
        **extra,
    )
    return cookie


def json_result(peer: RawPeer, cookie: str, rc: str = "OK", **fields: Any) -> None:
    send_json(peer, packet_type="RESULT", cookie=cookie, rc=rc, **fields)


# -- payloads that cross codecs ---------------------------------------------------


async def test_json_client_and_msgpack_worker_both_directions(broker: Broker) -> None:
    w = await rawpeer.hello_worker(broker.address("worker"))
    c = await legacy_json_client(broker)
    for text in ('{"name": "a", "n": 1}', "h\u00e9llo \u2713 \U0001f600", ""):
        cookie = json_run(c, "echo", text)
        run = await w.recv_type(Run)
        assert run.pipeline == "echo"
        assert run.variables == text  # a str in msgpack, as the JSON client sent it
        assert len(run.cookie) == 16 and run.cookie != uuid.UUID(cookie).bytes
        w.send(Result(run.cookie, ResultCode.OK, result=text[::-1]))
        res = await recv_json(c)
        assert res == dict.fromkeys(TEN_KEYS) | {
            "packet_type": "RESULT",
            "cookie": cookie,
            "rc": "OK",
            "result": text[::-1],
        }


async def test_msgpack_client_and_json_worker_both_directions(broker: Broker) -> None:
    w = await legacy_json_worker(broker, capacity=2)
    c = await rawpeer.hello_client(broker.address("client"))
    cookie = new_cookie()
    c.send(Run(cookie, "echo", "d\u00e9j\u00e0 vu", priority=5, timeout_ms=60_000, max_attempts=2))
    run = await recv_json(w)
    # Only ReasonChip's keys: priority, timeout_ms, max_attempts stay with the broker.
    assert run == dict.fromkeys(TEN_KEYS) | {
        "packet_type": "RUN",
        "cookie": run["cookie"],
        "pipeline": "echo",
        "variables": "d\u00e9j\u00e0 vu",
    }
    assert run["cookie"] == run["cookie"].lower()
    json_result(w, run["cookie"], result='{"ok": true}')
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, '{"ok": true}')

    # A PROCESSOR_EXCEPTION with its stack trace crosses too.
    cookie = new_cookie()
    c.send(Run(cookie, "fail", None))
    run = await recv_json(w)
    assert run["variables"] is None
    stack = ["Processor Stack Trace:", "    fail - 1"]
    json_result(w, run["cookie"], "PROCESSOR_EXCEPTION", error="n < 0", stacktrace=stack)
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.error) == (cookie, ResultCode.PROCESSOR_EXCEPTION, "n < 0")
    assert res.stacktrace == tuple(stack)
    assert broker.board.slots(broker.board.workers()[0]) == (2, 0)


# SocketPacket's fields in its own order, as its model_dump_json() writes them.
CHIP_ORDER = ("packet_type", "cookie", "capacity", "pipeline", "variables", "detach", "rc",
              "error", "stacktrace", "result")  # fmt: skip


def chip_body(**fields: Any) -> bytes:
    """A body as ReasonChip's pydantic writes it: its order, no spaces, UTF-8 raw."""
    packet = dict.fromkeys(CHIP_ORDER) | fields
    return json.dumps(packet, separators=(",", ":"), ensure_ascii=False).encode()


async def recv_body(peer: RawPeer) -> bytes:
    async with asyncio.timeout(WAIT_S):
        size = int.from_bytes(await peer.reader.readexactly(4), "big")
        return await peer.reader.readexactly(size)


async def test_json_client_to_json_worker_payloads_pass_through_byte_for_byte(
    broker: Broker,
) -> None:
    # What ReasonChip's client sends reaches ReasonChip's worker as the very bytes
    # the broker would write anyway (it passes the literal on), and back.
    w = await legacy_json_worker(broker, capacity=1)
    c = await legacy_json_client(broker)
    texts = [
        '{"name": "x", "big": 123456789012345678901234567890, "f": 1e400, "n": {"a": [1, null]}}',
        'caf\u00e9 \u2028 \U0001f600 \\ " \t\n \x01 \x7f',
        "x" * 65536,
    ]
    for text in texts:
        cookie = str(uuid.uuid4())
        body = chip_body(packet_type="RUN", cookie=cookie, pipeline="echo", variables=text,
                         detach=False)  # fmt: skip
        c.send_bytes(len(body).to_bytes(4, "big") + body)
        got = await recv_body(w)
        wcookie = json.loads(got)["cookie"]
        assert got == chip_body(packet_type="RUN", cookie=wcookie, pipeline="echo", variables=text)
        body = chip_body(packet_type="RESULT", cookie=wcookie, rc="OK", result=text[::-1])
        w.send_bytes(len(body).to_bytes(4, "big") + body)
        got = await recv_body(c)
        assert got == chip_body(packet_type="RESULT", cookie=cookie, rc="OK", result=text[::-1])


UNCARRIABLE = {
    "bytes": b"\x00\xffraw",
    "map": {"k": 1},
    "list": [1, 2],
    "int": 42,
    "bool": True,
}


@pytest.mark.parametrize("payload", UNCARRIABLE.values(), ids=UNCARRIABLE.keys())
async def test_variables_a_json_worker_cannot_carry_fail_only_that_job(
    broker: Broker, payload: object
) -> None:
    w = await legacy_json_worker(broker, capacity=1)
    c = await rawpeer.hello_client(broker.address("client"))
    bad = new_cookie()
    c.send(Run(bad, "echo", payload))
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (bad, ResultCode.BAD_PACKET)
    assert res.error is not None and "json" in res.error
    # The broker passes msgpack payloads on unparsed, yet names what it could not carry.
    assert f"({type(payload).__name__})" in res.error
    assert broker.board.slots(broker.board.workers()[0]) == (1, 0)
    # The client's connection and the worker are untouched: the worker's first
    # frame is the next job (nothing was sent for the bad one).
    good = new_cookie()
    c.send(Run(good, "echo", "fine"))
    run = await recv_json(w)
    assert (run["packet_type"], run["variables"]) == ("RUN", "fine")
    json_result(w, run["cookie"], result="fine too")
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (good, ResultCode.OK, "fine too")


@pytest.mark.parametrize("payload", UNCARRIABLE.values(), ids=UNCARRIABLE.keys())
async def test_result_a_json_client_cannot_carry_fails_only_that_job(
    broker: Broker, payload: object
) -> None:
    w = await rawpeer.hello_worker(broker.address("worker"))
    c = await legacy_json_client(broker)
    bad = json_run(c, "echo", "x")
    run = await w.recv_type(Run)
    w.send(Result(run.cookie, ResultCode.OK, result=payload))
    res = await recv_json(c)
    assert (res["cookie"], res["rc"], res["result"]) == (bad, "BAD_PACKET", None)
    assert "json" in res["error"] and f"({type(payload).__name__})" in res["error"]
    assert broker.board.slots(broker.board.workers()[0]) == (1, 0)
    good = json_run(c, "echo", "y")
    run = await w.recv_type(Run)
    w.send(Result(run.cookie, ResultCode.OK, result="y"))
    res = await recv_json(c)
    assert (res["cookie"], res["rc"], res["result"]) == (good, "OK", "y")


# -- reasonbroker's own codes reach legacy peers as EXCEPTION -------------------------


async def test_legacy_json_client_gets_our_codes_as_exception() -> None:
    async with Broker(_config(cancel_grace_ms=60_000)) as b:
        w = await rawpeer.hello_worker(b.address("worker"))
        c = await legacy_json_client(b)

        # TIMEOUT: the client may add timeout_ms to its JSON RUN (ReasonChip's doesn't).
        late = json_run(c, "slow", "x", timeout_ms=50)
        run = await w.recv_type(Run)
        res = await recv_json(c)
        assert (res["cookie"], res["rc"]) == (late, "EXCEPTION")
        assert res["error"].startswith("TIMEOUT: ")
        assert (await w.recv_type(Cancel)).cookie == run.cookie
        w.send(Result(run.cookie, ResultCode.OK, result="too late"))  # dropped: no 2nd answer

        # CANCELLED: a queued job (the worker's one slot is busy) is cancelled at once.
        busy = json_run(c, "echo", "a")
        running = await w.recv_type(Run)
        queued = json_run(c, "echo", "b")
        await until(lambda: b.board.queue_depth == 1)
        send_json(c, packet_type="CANCEL", cookie=queued)
        res = await recv_json(c)
        assert res["cookie"] == queued
        assert (res["rc"], res["error"]) == ("EXCEPTION", "CANCELLED: cancelled by client")
        w.send(Result(running.cookie, ResultCode.OK, result="a"))
        res = await recv_json(c)
        assert (res["cookie"], res["rc"], res["result"]) == (busy, "OK", "a")
        assert b.board.stats.abandoned_results == 1

        # UNAUTHORIZED: a client on the workers' listener, answered then closed.
        stray = await RawPeer.connect(b.address("worker"), codec=Codec.JSON)
        cookie = json_run(stray, "echo", "x")
        res = await recv_json(stray)
        assert (res["cookie"], res["rc"]) == (cookie, "EXCEPTION")
        assert res["error"].startswith("UNAUTHORIZED: ")
        assert await stray.closed_by_peer()
        assert stray.inbox == []


async def test_legacy_codes_are_only_reasonchips_ten() -> None:
    assert {rc.value for rc in LEGACY_RESULT_CODES} == {
        "OK",
        "BAD_PACKET",
        "UNSUPPORTED_PACKET_TYPE",
        "NO_CAPACITY",
        "COOKIE_NOT_FOUND",
        "COOKIE_COLLISION",
        "WORKER_WENT_AWAY",
        "BROKER_WENT_AWAY",
        "PROCESSOR_EXCEPTION",
        "EXCEPTION",
    }


# -- a legacy worker that exits on CANCEL (as ReasonChip's 0.0.6 does) ----------------


@pytest.mark.parametrize("client_kind", ["msgpack-hello", "legacy-json"])
async def test_legacy_worker_that_exits_on_cancel_ends_the_job_cancelled(
    client_kind: str,
) -> None:
    # A long grace: the CANCELLED must come from the worker leaving, not the timer.
    async with Broker(_config(cancel_grace_ms=60_000)) as b:
        w1 = await legacy_json_worker(b, capacity=2)
        if client_kind == "msgpack-hello":
            mc = await rawpeer.hello_client(b.address("client"))
            doomed, other = new_cookie(), new_cookie()
            mc.send(Run(doomed, "slow", "1", max_attempts=3))
            mc.send(Run(other, "other", "2", max_attempts=3))
        else:
            jc = await legacy_json_client(b)
            doomed_s = json_run(jc, "slow", "1", max_attempts=3)
            other_s = json_run(jc, "other", "2", max_attempts=3)
        runs = {}
        for _ in range(2):
            run = await recv_json(w1)
            runs[run["pipeline"]] = run["cookie"]
        w2 = await legacy_json_worker(b, capacity=2)  # somewhere a re-run could go

        if client_kind == "msgpack-hello":
            mc.send(Cancel(doomed))
        else:
            send_json(jc, packet_type="CANCEL", cookie=doomed_s)
        cancel = await recv_json(w1)
        assert cancel == dict.fromkeys(TEN_KEYS) | {
            "packet_type": "CANCEL",
            "cookie": runs["slow"],
        }
        await w1.close()  # ReasonChip's worker exits on CANCEL, sending nothing

        # The cancelled job ends CANCELLED; the worker's other job is re-run
        # on w2 (attempts left), as on any worker loss.
        if client_kind == "msgpack-hello":
            res = await mc.recv_type(Result)
            assert (res.cookie, res.rc) == (doomed, ResultCode.CANCELLED)
        else:
            jres = await recv_json(jc)
            assert jres["cookie"] == doomed_s
            assert (jres["rc"], jres["error"]) == ("EXCEPTION", "CANCELLED: cancelled by client")
        rerun = await recv_json(w2)
        assert (rerun["pipeline"], rerun["variables"]) == ("other", "2")
        json_result(w2, rerun["cookie"], result="done")
        if client_kind == "msgpack-hello":
            res = await mc.recv_type(Result)
            assert (res.cookie, res.rc, res.result) == (other, ResultCode.OK, "done")
            mc.send(Run(new_cookie(), "probe", "3"))
        else:
            jres = await recv_json(jc)
            assert (jres["cookie"], jres["rc"], jres["result"]) == (other_s, "OK", "done")
            json_run(jc, "probe", "3")
        # The cancelled job never ran again: w2's next frame is the probe.
        probe = await recv_json(w2)
        assert (probe["packet_type"], probe["pipeline"]) == ("RUN", "probe")
        assert b.board.stats.requeued == 1
        assert b.board.stats.completed["CANCELLED"] == 1


# -- a legacy worker is never sent a RESULT, nor more RUNs than its capacity -------------


async def test_legacy_worker_gets_no_result_and_no_runs_beyond_capacity(broker: Broker) -> None:
    w = await legacy_json_worker(broker, capacity=2)
    wid = broker.board.workers()[0]
    c = await rawpeer.hello_client(broker.address("client"))
    cookies = [new_cookie() for _ in range(4)]
    for i, cookie in enumerate(cookies):
        c.send(Run(cookie, "echo", str(i)))
    first = await recv_json(w)
    second = await recv_json(w)
    assert [first["variables"], second["variables"]] == ["0", "1"]
    await until(lambda: broker.board.queue_depth == 2)
    assert broker.board.slots(wid) == (2, 2)

    # Things a worker gets a RESULT for if it said HELLO: a legacy one gets nothing.
    json_result(w, str(uuid.uuid4()), result="who?")  # unknown cookie: dropped
    send_json(w, packet_type="RESULT", cookie=first["cookie"], rc="NOT_A_CODE")
    send_json(w, packet_type="SHUTDOWN")  # reserved: UNSUPPORTED_PACKET_TYPE to HELLO peers
    send_json(w, packet_type="FROBNICATE", cookie=str(uuid.uuid4()))
    # The malformed RESULT above ended job 0 (BAD_PACKET to its client) and
    # freed its slot: the worker's next frame is job 2's RUN, not a RESULT.
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (cookies[0], ResultCode.BAD_PACKET)
    third = await recv_json(w)
    assert (third["packet_type"], third["variables"]) == ("RUN", "2")
    assert broker.board.slots(wid) == (2, 2)

    json_result(w, second["cookie"], result="r1")
    json_result(w, second["cookie"], result="r1 again")  # duplicate: dropped
    fourth = await recv_json(w)
    assert (fourth["packet_type"], fourth["variables"]) == ("RUN", "3")
    assert broker.board.slots(wid) == (2, 2)
    json_result(w, third["cookie"], result="r2")
    json_result(w, fourth["cookie"], result="r3")
    got = [await c.recv_type(Result) for _ in range(3)]
    assert [(r.cookie, r.rc, r.result) for r in got] == [
        (cookies[1], ResultCode.OK, "r1"),
        (cookies[2], ResultCode.OK, "r2"),
        (cookies[3], ResultCode.OK, "r3"),
    ]
    assert broker.board.slots(wid) == (2, 0)
    assert broker.board.stats.results_dropped == 2  # the unknown cookie and the duplicate

    # Still connected and served; nothing else was ever sent to it.
    probe = new_cookie()
    c.send(Run(probe, "echo", "p"))
    run = await recv_json(w)
    assert (run["packet_type"], run["variables"]) == ("RUN", "p")
    json_result(w, run["cookie"], result="p")
    res = await c.recv_type(Result)
    assert (res.cookie, res.result) == (probe, "p")
    assert c.inbox == []
