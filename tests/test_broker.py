"""The broker over real loopback sockets (TCP and Unix), spoken to with raw packets.

These check what only a real event loop shows: framing errors closing exactly
one connection, the outbox, timers, disconnect handling and the drain.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
import structlog

from reasonbroker.core.actions import Close, Send
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Cancel,
    Codec,
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
from reasonbroker.sdk.worker import Worker
from tests import rawpeer
from tests.rawpeer import WAIT_S, RawPeer


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
    async with Broker(_config(cancel_grace_ms=200)) as b:
        yield b


async def until(cond: Callable[[], bool]) -> None:
    """Wait for a condition of the broker's state that no packet announces.

    A legacy worker's REGISTER or the start of a drain has no reply to await,
    so this polls the predicate itself (bounded by WAIT_S) rather than
    sleeping a fixed time and hoping.
    """
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


async def hello_worker(
    b: Broker, capacity: int = 1, pipelines: tuple[str, ...] | None = None
) -> RawPeer:
    return await rawpeer.hello_worker(b.address("worker"), capacity, pipelines)


async def hello_client(b: Broker, url: str | None = None) -> RawPeer:
    return await rawpeer.hello_client(url or b.address("client"))


async def echo_once(b: Broker, c: RawPeer, w: RawPeer, payload: object) -> None:
    cookie = new_cookie()
    c.send(Run(cookie, "echo", payload))
    run = await w.recv_type(Run)
    assert run.cookie != cookie  # the worker leg has the broker's own cookie
    w.send(Result(run.cookie, ResultCode.OK, result=run.variables))
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, payload)


async def test_round_trip_over_tcp(broker: Broker) -> None:
    w = await hello_worker(broker, capacity=2)
    c = await hello_client(broker)
    await echo_once(broker, c, w, {"n": 1, "blob": b"\x00\xff" * 100})
    assert broker.board.slots(broker.board.workers()[0]) == (2, 0)


async def test_legacy_peers_without_hello(broker: Broker) -> None:
    w = await RawPeer.connect(broker.address("worker"))
    w.send(Register(1))
    await until(lambda: bool(broker.board.workers()))
    c = await RawPeer.connect(broker.address("client"))
    await echo_once(broker, c, w, "text")


async def test_unix_socket_listener_for_both_roles() -> None:
    with tempfile.TemporaryDirectory(prefix="rb") as tmp:
        path = Path(tmp) / "b.sock"
        cfg = Config(listeners=(ListenerConfig(f"unix://{path}", ListenerRole.BOTH),))
        async with Broker(cfg) as b:
            assert b.addresses == [("both", f"unix://{path}")]
            w = await hello_worker(b)
            c = await hello_client(b)
            await echo_once(b, c, w, [1, 2, 3])


BAD_FRAMES = {
    "zero length": b"\x00\x00\x00\x00",
    "oversize length": (64 * 1024 * 1024).to_bytes(4, "big"),
    "neither codec": b"\x00\x00\x00\x03abc",
    "msgpack array": b"\x00\x00\x00\x02\x91\x01",
    "truncated msgpack map": b"\x00\x00\x00\x02\x81\xa1",
    "invalid JSON": b"\x00\x00\x00\x03{x}",
    "JSON array": b"\x00\x00\x00\x02[]",
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_malformed_frame_closes_only_that_connection(broker: Broker, frame: bytes) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    bad = await RawPeer.connect(broker.address("client"))
    bad.send_bytes(frame)
    assert await bad.closed_by_peer()
    assert bad.inbox == []  # nothing is sent after a protocol error
    assert broker.protocol_errors == 1
    await echo_once(broker, c, w, "still serving")


async def test_codec_switch_mid_connection_is_a_protocol_error(broker: Broker) -> None:
    w = await hello_worker(broker)
    bad = await hello_client(broker)
    bad.send_bytes(b"\x00\x00\x00\x02{}")
    assert await bad.closed_by_peer()
    c = await hello_client(broker)
    await echo_once(broker, c, w, 1)


async def test_good_packets_before_garbage_in_one_write_still_count(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", 7))
    run = await w.recv_type(Run)
    # The worker's RESULT and then garbage arrive in one read.
    from reasonbroker.core.protocol import encode

    w.send_bytes(encode(Result(run.cookie, ResultCode.OK, result=7)) + b"\x00\x00\x00\x00")
    res = await c.recv_type(Result)
    assert (res.rc, res.result) == (ResultCode.OK, 7)
    assert await w.closed_by_peer()


async def test_wrong_field_types_get_bad_packet_and_the_connection_stays(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    body = msgpack.packb({"packet_type": "RUN", "cookie": cookie, "pipeline": 42})
    c.send_bytes(len(body).to_bytes(4, "big") + body)
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (cookie, ResultCode.BAD_PACKET)
    assert res.error is not None and "pipeline" in res.error
    await echo_once(broker, c, w, "after bad packet")


async def test_unknown_packet_type_is_answered_and_the_connection_stays(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    body = msgpack.packb({"packet_type": "FROBNICATE", "cookie": cookie})
    c.send_bytes(len(body).to_bytes(4, "big") + body)
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (cookie, ResultCode.UNSUPPORTED_PACKET_TYPE)
    await echo_once(broker, c, w, "after unknown type")


async def test_worker_loss_requeues_to_another_worker(broker: Broker) -> None:
    w1 = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", "x", max_attempts=2))
    first = await w1.recv_type(Run)
    w2 = await hello_worker(broker)
    await w1.close()
    second = await w2.recv_type(Run)
    assert second.cookie != first.cookie and second.variables == "x"
    w2.send(Result(second.cookie, ResultCode.OK, result="done"))
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, "done")
    assert broker.board.stats.requeued == 1


async def test_worker_loss_without_attempts_left_is_worker_went_away(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", "x"))
    await w.recv_type(Run)
    await w.close()
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (cookie, ResultCode.WORKER_WENT_AWAY)


async def test_client_loss_cancels_its_running_job_on_the_worker(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    c.send(Run(new_cookie(), "echo", "x"))
    run = await w.recv_type(Run)
    await c.close()
    cancel = await w.recv_type(Cancel)
    assert cancel.cookie == run.cookie
    w.send(Result(run.cookie, ResultCode.CANCELLED))
    await until(lambda: broker.board.running == 0)


async def test_deadline_fires_from_the_real_timer(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", "slow", timeout_ms=50))
    run = await w.recv_type(Run)
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc) == (cookie, ResultCode.TIMEOUT)
    assert (await w.recv_type(Cancel)).cookie == run.cookie
    # The slot is held until the worker answers; the late answer is not delivered.
    assert broker.board.running == 1
    w.send(Result(run.cookie, ResultCode.OK, result="late"), Ping())
    await w.recv_type(Pong)
    assert broker.board.running == 0
    await echo_once(broker, c, w, "next")


async def test_cancel_grace_answers_for_a_silent_worker(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", "x"))
    await w.recv_type(Run)
    c.send(Cancel(cookie))
    await w.recv_type(Cancel)
    res = await c.recv_type(Result)  # after cancel_grace_ms=200, from the broker
    assert (res.cookie, res.rc) == (cookie, ResultCode.CANCELLED)


async def test_max_connections_refuses_the_excess() -> None:
    async with Broker(_config(max_connections=2)) as b:
        w = await hello_worker(b)
        c = await hello_client(b)
        extra = await RawPeer.connect(b.address("client"))
        assert await extra.closed_by_peer()
        assert b.refused_connections == 1
        await echo_once(b, c, w, "ok")


async def test_slow_consumer_is_cut_off_and_others_keep_going() -> None:
    limits = {"max_frame_bytes": 256 * 1024, "outbox_high_water_bytes": 512 * 1024}
    async with Broker(_config(**limits)) as b:
        big_worker = await hello_worker(b, capacity=64, pipelines=("big",))
        w = await hello_worker(b, pipelines=("echo",))
        healthy = await hello_client(b)
        slow = await RawPeer.connect(b.address("client"), rcvbuf=4096)
        slow.send(Hello(role=Role.CLIENT))
        for _ in range(64):
            slow.send(Run(new_cookie(), "big", None))

        async def serve_big() -> None:
            big = b"x" * (200 * 1024)
            while True:
                packet = await big_worker.recv()
                if isinstance(packet, Run):
                    big_worker.send(Result(packet.cookie, ResultCode.OK, result=big))
                elif isinstance(packet, Cancel):
                    # Once cut off, the slow client's running jobs are
                    # cancelled on the worker, exactly as for a disconnect.
                    big_worker.send(Result(packet.cookie, ResultCode.CANCELLED))

        server = asyncio.create_task(serve_big())
        try:
            await until(lambda: b.slow_consumers == 1)
            await echo_once(b, healthy, w, "unaffected")
            await until(lambda: b.board.running == 0)
        finally:
            server.cancel()
        assert await slow.closed_by_peer()
        assert b.board.slots(b.board.workers()[0]) == (64, 0)


async def test_graceful_drain_lets_running_jobs_finish() -> None:
    async with Broker(_config(drain_timeout_s=WAIT_S)) as b:
        w = await hello_worker(b)
        c = await hello_client(b)
        running = new_cookie()
        c.send(Run(running, "echo", "r"))
        run = await w.recv_type(Run)
        serving = asyncio.create_task(b.serve())
        b.shutdown()
        await until(lambda: b.board.draining)
        late = new_cookie()
        c.send(Run(late, "echo", "l"))
        refused = await c.recv_type(Result)
        assert (refused.cookie, refused.rc) == (late, ResultCode.BROKER_WENT_AWAY)
        w.send(Result(run.cookie, ResultCode.OK, result="finished"))
        res = await c.recv_type(Result)
        assert (res.cookie, res.rc, res.result) == (running, ResultCode.OK, "finished")
        async with asyncio.timeout(WAIT_S):
            await serving
        assert await c.closed_by_peer()


async def test_drain_timeout_answers_broker_went_away() -> None:
    async with Broker(_config(drain_timeout_s=0.1)) as b:
        w = await hello_worker(b)
        c = await hello_client(b)
        cookie = new_cookie()
        c.send(Run(cookie, "echo", "stuck"))
        await w.recv_type(Run)
        b.shutdown()
        async with asyncio.timeout(WAIT_S):
            await b.serve()
        res = await c.recv_type(Result)
        assert (res.cookie, res.rc) == (cookie, ResultCode.BROKER_WENT_AWAY)
        assert await c.closed_by_peer()


async def test_forced_shutdown_skips_the_drain() -> None:
    async with Broker(_config(drain_timeout_s=3600)) as b:
        w = await hello_worker(b)
        c = await hello_client(b)
        cookie = new_cookie()
        c.send(Run(cookie, "echo", "stuck"))
        await w.recv_type(Run)
        serving = asyncio.create_task(b.serve())
        b.shutdown()
        await until(lambda: b.board.draining)
        b.shutdown(force=True)
        async with asyncio.timeout(WAIT_S):
            await serving
        res = await c.recv_type(Result)
        assert res.rc == ResultCode.BROKER_WENT_AWAY


async def test_json_peer_is_answered_in_json(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await RawPeer.connect(broker.address("client"), codec=Codec.JSON)
    cookie = new_cookie()
    c.send(Run(cookie, "echo", '{"k": 1}'))
    run = await w.recv_type(Run)
    assert run.variables == '{"k": 1}'
    w.send(Result(run.cookie, ResultCode.OK, result='"v"'))
    res = await c.recv_type(Result)
    assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, '"v"')


async def test_silent_hello_peer_is_dropped_and_its_jobs_requeued() -> None:
    async def echo(variables: object) -> object:
        return variables

    async with Broker(_config(heartbeat_ms=40)) as b:
        # A raw worker that stops reading and answering, like a SIGSTOPped
        # process; the client and the healthy worker are the real libraries,
        # which answer the broker's PINGs.
        frozen = await hello_worker(b)
        async with Client(b.address("client")) as client:
            handle = await client.submit("echo", "x", max_attempts=2)
            await frozen.recv_type(Run)
            async with Worker(b.address("worker"), handlers={"echo": echo}):
                assert await handle == "x"  # the second attempt, on the healthy worker
        assert b.dead_peers == 1
        assert b.board.stats.requeued == 1


async def test_legacy_peer_is_never_pinged() -> None:
    async with Broker(_config(heartbeat_ms=20)) as b:
        legacy = await RawPeer.connect(b.address("worker"))
        legacy.send(Register(1))
        await until(lambda: bool(b.board.workers()))
        watcher = await hello_client(b)  # a HELLO'd peer that never answers PING
        await until(lambda: b.dead_peers == 1)  # three beats have passed: it was dropped
        assert await watcher.closed_by_peer()
        assert Ping() in watcher.inbox
        assert b.board.workers()  # the equally silent legacy worker is still served
        b.shutdown()
        await b.serve()
        assert await legacy.closed_by_peer()
        assert legacy.inbox == []  # everything it was ever sent: no PING


async def test_connection_that_never_speaks_is_closed() -> None:
    async with Broker(_config(idle_timeout_ms=50)) as b:
        mute = await RawPeer.connect(b.address("client"))
        assert await mute.closed_by_peer()
        assert b.dead_peers == 1


async def test_role_violations_are_refused_logged_and_closed(broker: Broker) -> None:
    w = await hello_worker(broker)
    c = await hello_client(broker)
    with structlog.testing.capture_logs() as logs:
        # A worker on the clients' listener: HELLO'd, so it gets UNAUTHORIZED itself.
        wrong_worker = await RawPeer.connect(broker.address("client"))
        wrong_worker.send(Hello(role=Role.WORKER))
        res = await wrong_worker.recv_type(Result)
        assert res.rc == ResultCode.UNAUTHORIZED and res.error is not None
        assert "workers are not accepted" in res.error
        assert await wrong_worker.closed_by_peer()
        # A legacy client on the workers' listener: our code travels as EXCEPTION.
        wrong_client = await RawPeer.connect(broker.address("worker"))
        cookie = new_cookie()
        wrong_client.send(Run(cookie, "echo", 1))
        res = await wrong_client.recv_type(Result)
        assert (res.cookie, res.rc) == (cookie, ResultCode.EXCEPTION)
        assert res.error is not None and res.error.startswith("UNAUTHORIZED: ")
        assert await wrong_client.closed_by_peer()
    refused = [e for e in logs if e["event"] == "role_refused"]
    assert [(e["role"], e["listener"]) for e in refused] == [
        ("worker", "clients"),
        ("client", "workers"),
    ]
    assert broker.board.stats.accepted == 0  # the refused RUN never became a job
    await echo_once(broker, c, w, "others unaffected")


@pytest.mark.parametrize("size", [100, 40_000], ids=["joined", "over-64KiB"])
async def test_results_answered_together_reach_the_client_whole_and_in_order(
    broker: Broker, size: int
) -> None:
    # The broker writes one turn's frames for a peer as one joined write, or
    # (past 64 KiB, so big payloads are not copied again) hands the list to
    # the transport: either way every frame arrives whole and in order.
    w = await hello_worker(broker, capacity=8)
    c = await hello_client(broker)
    cookies = [new_cookie() for _ in range(6)]
    c.send(*(Run(cookie, "echo", n) for n, cookie in enumerate(cookies)))
    runs = [await w.recv_type(Run) for _ in cookies]
    payloads = [bytes([n]) * size for n in range(len(runs))]
    w.send(
        *(Result(r.cookie, ResultCode.OK, result=p) for r, p in zip(runs, payloads, strict=True))
    )
    got = [await c.recv_type(Result) for _ in cookies]
    assert [(r.cookie, r.result) for r in got] == [
        (cookies[run.variables], payloads[n]) for n, run in enumerate(runs)
    ]


async def test_a_burst_goes_out_to_one_worker_and_the_next_turn_starts_afresh() -> None:
    # Batch affinity (docs/protocol.md): RUNs in one write stay on one worker
    # within dispatch_batch_slack; the broker ends the batch when it flushes,
    # so a RUN in a later write goes to the least-loaded worker again.
    async with Broker(_config(dispatch_batch_slack=1.0)) as b:
        w1 = await hello_worker(b, capacity=8)
        w2 = await hello_worker(b, capacity=8)
        c = await hello_client(b)
        c.send(*(Run(new_cookie(), "echo", n) for n in range(3)))  # one write
        firsts = [await w1.recv_type(Run) for _ in range(3)]
        assert [r.variables for r in firsts] == [0, 1, 2]
        c.send(Run(new_cookie(), "echo", 3))  # a later write: least loaded is w2
        assert (await w2.recv_type(Run)).variables == 3
        assert [b.board.slots(w)[1] for w in b.board.workers()] == [3, 1]


async def test_actions_for_interleaved_peers_reach_each_peer_in_order(broker: Broker) -> None:
    # apply keeps the last destination it looked up; sends alternating
    # between peers, and to a peer closed earlier in the same batch, must
    # still land where they are addressed, in order, or nowhere.
    c1 = await hello_client(broker)
    id1 = max(broker._conns)
    c2 = await hello_client(broker)
    id2 = max(broker._conns)
    c3 = await hello_client(broker)
    id3 = max(broker._conns)
    ck = [new_cookie() for _ in range(5)]
    broker.apply(
        [
            Send(id1, Result(ck[0], ResultCode.OK)),
            Send(id2, Result(ck[1], ResultCode.OK)),
            Send(id3, Result(ck[4], ResultCode.OK)),
            Close(id3, "closed by the test"),
            Send(id3, Result(ck[0], ResultCode.OK)),
            Send(id1, Result(ck[2], ResultCode.OK)),
            Send(id1, Result(ck[3], ResultCode.OK)),
            Send(id2, Result(ck[4], ResultCode.OK)),
        ]
    )
    assert [(await c1.recv_type(Result)).cookie for _ in range(3)] == [ck[0], ck[2], ck[3]]
    assert [(await c2.recv_type(Result)).cookie for _ in range(2)] == [ck[1], ck[4]]
    assert await c3.closed_by_peer()
    assert [p.cookie for p in c3.inbox if isinstance(p, Result)] == [ck[4]]
