"""The nats-server harness (tests/natscluster.py) against real servers: a replicas-3 work-queue
stream keeps every acknowledged message and takes new publishes when one server of three is
SIGKILLed (its leader), a single server's file store survives a SIGKILL, and KV create is
first-writer-wins. Skipped, with the reason, when nats-py or a server binary is missing.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[cluster]'")

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
)

from tests.natscluster import NatsCluster, nats_cluster, nats_server

__all__ = ["nats_cluster", "nats_server"]  # the fixtures, imported to be found by pytest

STREAM = "JOBS"
SUBJECT = "jobs.echo"


RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


async def connect(cluster: NatsCluster) -> NATS:
    return await nats.connect(
        servers=cluster.urls,
        connect_timeout=2,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        name="test_natscluster",
    )


async def publish_acked(js: JetStreamContext, i: int, deadline: float) -> PubAck:
    """Publish job i (Nats-Msg-Id job-i) until JetStream acks it or the deadline passes: a
    retry after a lost ack is deduplicated by the server, as the cluster store will rely on."""
    while True:
        try:
            return await js.publish(
                SUBJECT, f"job-{i}".encode(), timeout=1.0, headers={"Nats-Msg-Id": f"job-{i}"}
            )
        except RETRYABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # backoff between retries while a leader is elected


async def stream_messages(js: JetStreamContext, deadline: float) -> int:
    """The stream's message count, asked again while a leader is being elected."""
    while True:
        try:
            return (await js.stream_info(STREAM)).state.messages
        except RETRYABLE:
            if time.monotonic() > deadline:
                raise


async def workers(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """The durable pull consumer every node shares (made before any fault, as the store will)."""
    return await js.pull_subscribe(
        SUBJECT,
        durable="workers",
        stream=STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=3.0),
    )


async def drain(sub: JetStreamContext.PullSubscription, want: int, deadline: float) -> set[bytes]:
    """Fetch and ack until `want` distinct messages or the deadline (an ack lost to a failover
    means a redelivery after ack_wait: counted once)."""
    got: set[bytes] = set()
    while len(got) < want and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(batch=64, timeout=1.0)
        except RETRYABLE:  # nothing yet, or the consumer's new leader not elected yet
            continue
        for msg in msgs:
            got.add(msg.data)
            try:
                await msg.ack_sync(timeout=2.0)
            except RETRYABLE:
                pass  # redelivered after ack_wait, then acked again
    return got


async def test_replicas3_stream_survives_sigkill_of_its_leader(nats_cluster: NatsCluster) -> None:
    nc = await connect(nats_cluster)
    try:
        js = nc.jetstream(timeout=5.0)
        await js.add_stream(
            name=STREAM,
            subjects=["jobs.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=3,
            duplicate_window=120.0,
        )
        sub = await workers(js)
        deadline = time.monotonic() + 30
        first = await asyncio.gather(*(publish_acked(js, i, deadline) for i in range(100)))
        assert sorted(a.seq for a in first) == list(range(1, 101))
        assert not any(a.duplicate for a in first)

        info = await js.stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader is not None
        leader = info.cluster.leader
        victim = next(i for i, n in enumerate(nats_cluster.nodes) if n.name == leader)
        t_kill = time.monotonic()
        nats_cluster.kill(victim)
        assert len(nats_cluster.urls) == 2

        # New publishes are acked by the two that remain (a new stream leader is elected);
        # a resend of an acked id is answered as a duplicate, not stored twice.
        second = await asyncio.gather(*(publish_acked(js, i, deadline) for i in range(100, 200)))
        assert all(a.stream == STREAM for a in second)
        print(f"100 publishes acked {time.monotonic() - t_kill:.2f} s after the SIGKILL")
        again = await publish_acked(js, 7, deadline)
        assert again.duplicate

        assert await stream_messages(js, deadline) == 200
        t_drain = time.monotonic()
        got = await drain(sub, 200, deadline)
        assert got == {f"job-{i}".encode() for i in range(200)}
        # Work queue: an acked message is removed, but in a replicated stream that follows the
        # ack (even an ack_sync) through the stream's own log: polled with a deadline.
        while await stream_messages(js, deadline) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert await stream_messages(js, deadline) == 0
        print(f"drained in {time.monotonic() - t_drain:.2f} s")

        # The killed server comes back on its store and the cluster is whole again.
        nats_cluster.restart(victim)
        assert len(nats_cluster.urls) == 3
    finally:
        await nc.close()


async def test_single_server_file_store_survives_sigkill(nats_server: NatsCluster) -> None:
    nc = await connect(nats_server)
    try:
        js = nc.jetstream(timeout=5.0)
        await js.add_stream(
            name=STREAM,
            subjects=["jobs.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
        deadline = time.monotonic() + 20
        acks = await asyncio.gather(*(publish_acked(js, i, deadline) for i in range(50)))
        assert len({a.seq for a in acks}) == 50
    finally:
        await nc.close()
    nats_server.kill(0)
    nats_server.restart(0)
    nc = await connect(nats_server)
    try:
        js = nc.jetstream(timeout=5.0)
        got = await drain(await workers(js), 50, time.monotonic() + 20)
        assert got == {f"job-{i}".encode() for i in range(50)}
    finally:
        await nc.close()


async def test_kv_create_first_writer_wins(nats_server: NatsCluster) -> None:
    nc = await connect(nats_server)
    try:
        js = nc.jetstream(timeout=5.0)
        kv = await js.create_key_value(bucket="results", history=1, storage=StorageType.FILE)
        results = await asyncio.gather(
            *(kv.create("job-1", f"worker-{w}".encode()) for w in range(8)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, nats.js.errors.KeyWrongLastSequenceError)]
        assert len(won) == 1 and len(lost) == 7, results
        entry = await kv.get("job-1")
        assert entry.value is not None and entry.value.startswith(b"worker-")
    finally:
        await nc.close()
