"""Cluster mode (docs/cluster.md): nodes that act as one over a real NATS JetStream.

Each test starts real nats-server processes on loopback (tests/natscluster.py)
and two or three reasonbroker nodes in this process (ClusterNode, the same
object `reasonbroker serve --cluster` runs), with SDK clients and workers on
different nodes. Skipped, saying why, without nats-py or a nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[cluster]'")

import nats

from reasonbroker.cluster.bridge import RECHECK_FIRST_S
from reasonbroker.cluster.node import (
    JOIN_REQUEST_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    ClusterError,
    ClusterNode,
)
from reasonbroker.cluster.wire import EVENT_RESULT, JobMessage, Names, Outcome, key, pack_value
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.daemon.config import ClusterConfig, Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import BrokerConnectionError, CookieNotFound, JobError
from reasonbroker.sdk.worker import Worker, progress
from tests.natscluster import NatsCluster, nats_cluster, nats_server

__all__ = ["nats_cluster", "nats_server"]  # the fixtures, imported to be found by pytest

WAIT_S = 30.0


ADMIN_TOKEN = "cluster-test-admin-token"


def _config(servers: list[str], node: str, tmp: Path, **cluster: Any) -> Config:
    return Config(
        listeners=(
            ListenerConfig(
                f"unix://{tmp / f'{node}-clients.sock'}",
                ListenerRole.CLIENTS,
                admin_token=ADMIN_TOKEN,
            ),
            ListenerConfig(f"unix://{tmp / f'{node}-workers.sock'}", ListenerRole.WORKERS),
        ),
        # The default heartbeat (5 s): a client gives up after 3 silent ones. A node holds
        # a job's packets while a new stream leader is elected (4-7 s here), never PONG.
        limits=Limits(),
        cluster=ClusterConfig(servers=tuple(servers), node=node, **cluster),
    )


@contextlib.asynccontextmanager
async def _nodes(
    nats_urls: list[str], tmp: Path, names: tuple[str, ...] = ("a", "b"), **cluster: Any
) -> AsyncIterator[dict[str, ClusterNode]]:
    nodes: dict[str, ClusterNode] = {}
    serving: list[asyncio.Task[None]] = []
    try:
        for name in names:
            node = ClusterNode(_config(nats_urls, name, tmp, **cluster))
            await node.__aenter__()
            nodes[name] = node
            serving.append(asyncio.create_task(node.serve()))
        yield nodes
    finally:
        for node in nodes.values():
            node.shutdown(force=True)
        for task in serving:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        for node in nodes.values():
            await node.__aexit__(None, None, None)


async def _until(cond: Any) -> None:
    """Poll `cond` (counters of other tasks, with no event to wait on) up to WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def echo(variables: Any) -> Any:
    return {"echo": variables}


async def test_a_job_accepted_on_one_node_runs_on_a_worker_of_another(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    async with _nodes(nats_server.urls, tmp_path) as nodes:
        a, b = nodes["a"], nodes["b"]
        events: list[Any] = []

        async def steps(variables: Any) -> Any:
            await progress({"step": 1})
            await progress({"step": 2})
            return variables * 2

        async with (
            Worker(b.address("worker"), handlers={"double": steps, "echo": echo}, capacity=4),
            Client(a.address("client")) as client,
        ):
            handle = await client.submit("double", 21, on_progress=events.append)
            assert handle.accepted  # after JetStream acknowledged the job
            assert await asyncio.wait_for(handle, WAIT_S) == 42
            assert events == [{"step": 1}, {"step": 2}]  # in order, before the RESULT
            results = await asyncio.gather(
                *(client.run("echo", i, timeout=WAIT_S) for i in range(50))
            )
            assert results == [{"echo": i} for i in range(50)]
        assert b.bridge is not None and b.bridge.stats.fetched == 51
        assert a.bridge is not None and a.bridge.stats.fetched == 0  # a has no workers


async def test_a_new_pipeline_reaches_a_node_whose_worker_serves_every_pipeline_at_once(
    nats_server: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that serves every pipeline (REGISTER without pipelines) on node b, which has
    read the cluster's pipelines (none yet) since it came; then the first job of a pipeline
    on node a. Node b learns the pipeline from a's announcement, not its next poll of the
    pipelines bucket: with the poll 2 s apart, the bench's every job waited for it once in a
    while (a 2 s stall); here the poll is an hour apart, so only the announcement can do it."""
    from reasonbroker.cluster import bridge as bridge_module
    from reasonbroker.core import protocol as p
    from reasonbroker.sdk.peer import Peer, library_logger

    monkeypatch.setattr(bridge_module, "PIPELINES_POLL_S", 3600.0)
    async with _nodes(nats_server.urls, tmp_path) as nodes:
        a, b = nodes["a"], nodes["b"]
        assert a.bridge is not None and b.bridge is not None
        bridge_b = b.bridge
        await _until(lambda: bridge_b.stats.pipelines_read == 1)  # at its start: none there
        worker = await Peer.connect(
            b.address("worker"),
            p.Hello(role=p.Role.WORKER, name="every"),
            log=library_logger("test"),
        )

        async def serve() -> None:
            async for packet in worker.packets():
                if isinstance(packet, p.Run):
                    worker.send_nowait(p.Result(packet.cookie, p.ResultCode.OK, None, None, None))

        serving = asyncio.create_task(serve())
        try:
            worker.send_nowait(p.Register(capacity=4))  # no pipelines: every one
            # b saw the worker and read the pipelines bucket again for it: none there yet.
            await _until(lambda: bool(bridge_b._every) and bridge_b.stats.pipelines_read == 2)
            assert bridge_b._known == set()
            async with Client(a.address("client")) as client:
                assert await client.run("brand-new", 1, timeout=WAIT_S) is None
            assert bridge_b.stats.fetched == 1 and a.bridge.stats.fetched == 0
        finally:
            serving.cancel()
            await worker.aclose()


async def test_a_cancel_reaches_the_worker_on_another_node(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(variables: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with _nodes(nats_server.urls, tmp_path) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"slow": forever}),
            Client(nodes["a"].address("client")) as client,
        ):
            handle = await client.submit("slow", None)
            await asyncio.wait_for(started.wait(), WAIT_S)
            await handle.cancel()
            with pytest.raises(JobError) as caught:
                await asyncio.wait_for(handle, WAIT_S)
            assert caught.value.rc.value == "CANCELLED"
            await asyncio.wait_for(cancelled.wait(), WAIT_S)  # the worker's task, on node b


async def test_a_deadline_counts_queue_time_with_no_worker_anywhere(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    async with _nodes(nats_server.urls, tmp_path) as nodes:
        async with Client(nodes["a"].address("client")) as client:
            handle = await client.submit("nobody-serves-this", None, timeout=0.3)
            assert handle.accepted  # a cluster job waits for a worker: no NO_CAPACITY
            with pytest.raises(JobError) as caught:
                await asyncio.wait_for(handle, WAIT_S)
            assert caught.value.rc.value == "TIMEOUT"
        # The end is in the results bucket, so a node that fetches the job later drops it.
        nc = await nats.connect(servers=nats_server.urls)
        try:
            kv = await nc.jetstream().key_value(Names("rb").results)
            entry = await kv.get(key(handle.cookie.bytes), validate_keys=False)
            assert entry.value is not None and b"TIMEOUT" in entry.value
        finally:
            await nc.close()


async def test_a_detached_job_is_collected_by_attach_after_it_ran_elsewhere(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    async with _nodes(nats_server.urls, tmp_path) as nodes:
        async with Worker(nodes["b"].address("worker"), handlers={"echo": echo}):
            async with Client(nodes["a"].address("client")) as client:
                handle = await client.submit("echo", "later", detach=True)
                assert handle.accepted
                cookie = handle.cookie
            async with Client(nodes["a"].address("client")) as other:
                attached = await other.attach(cookie)
                assert await asyncio.wait_for(attached, WAIT_S) == {"echo": "later"}


async def test_a_job_delivered_twice_ends_once_and_the_duplicate_is_dropped(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    """Two nodes with workers both get the same job (published twice under two message
    ids, as a redelivery after a node's death would): the first result written to the
    bucket is the one its client gets, the other node's is dropped."""
    runs: list[str] = []

    def worker_on(node: str) -> Any:
        async def handler(variables: Any) -> Any:
            runs.append(node)
            return node

        return handler

    async with _nodes(nats_server.urls, tmp_path, names=("a", "b", "c")) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"twice": worker_on("b")}),
            Worker(nodes["c"].address("worker"), handlers={"twice": worker_on("c")}),
            Client(nodes["a"].address("client")) as client,
        ):
            handle = await client.submit("twice", None, timeout=WAIT_S)
            # The same job again, as JetStream would redeliver it.
            message = JobMessage(handle.cookie.bytes, "twice", None, 0, None, None, 1, "a", 0.0)
            nc = await nats.connect(servers=nats_server.urls)
            try:
                js = nc.jetstream()
                names = Names("rb")
                await js.publish(
                    names.jobs("twice"), message.encode(), headers={"Nats-Msg-Id": "again"}
                )
                winner = await asyncio.wait_for(handle, WAIT_S)
                assert winner in ("b", "c")
                await _until(lambda: len(runs) == 2)
            finally:
                await nc.close()
            bridges = [nodes[n].bridge for n in ("b", "c")]
            await _until(lambda: sum(b.stats.duplicates_dropped for b in bridges if b) == 1)
            # Nothing else reached the client: a later job's answer is its own.
            assert await client.run("twice", None, timeout=WAIT_S) in ("b", "c")


async def test_a_run_resent_to_another_node_after_its_first_node_published_it_ends(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    """A node published a job and died before its ACCEPTED reached the client, which
    resumed on node a and sent the RUN again (same cookie): a's publish is a duplicate,
    the job in the stream names the dead node as its origin, so its RESULT is sent
    there. Node a gets it from the results bucket. (Found by `scripts/chaos
    --cluster`: the job was lost.)"""
    cookie = uuid.uuid4()
    names = Names("rb")
    async with _nodes(nats_server.urls, tmp_path, names=("a", "b")) as nodes:
        nc = await nats.connect(servers=nats_server.urls)
        try:
            message = JobMessage(cookie.bytes, "resent", None, 0, None, None, 1, "gone", 0.0)
            ack = await nc.jetstream().publish(
                names.jobs("resent"), message.encode(), headers={"Nats-Msg-Id": key(cookie.bytes)}
            )
            assert not ack.duplicate
        finally:
            await nc.close()
        async with Client(nodes["a"].address("client")) as client:
            handle = await client.submit("resent", 5, cookie=cookie)
            assert handle.accepted
            async with Worker(nodes["b"].address("worker"), handlers={"resent": echo}):
                # The job the stream holds ran (its variables None: the dead node's copy).
                assert await asyncio.wait_for(handle, WAIT_S) == {"echo": None}


async def test_a_job_whose_result_a_dead_node_wrote_reaches_its_client_when_run_again(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    """A node wrote a job's result to the bucket and was SIGKILLed before it told the
    job's node (nor acked it): JetStream gives the job to node b, whose result loses
    the create; b tells the job's node the result that won, and its client gets it.
    (Found by `scripts/chaos --cluster`: the job was lost.)"""
    async with _nodes(nats_server.urls, tmp_path, names=("a", "b")) as nodes:
        async with Client(nodes["a"].address("client")) as client:
            handle = await client.submit("late", 1)  # no worker anywhere yet: queued
            nc = await nats.connect(servers=nats_server.urls)
            try:
                kv = await nc.jetstream().key_value(Names("rb").results)
                won = Outcome(
                    handle.cookie.bytes, "OK", None, None, pack_value("by the dead node"),
                    "gone", 1, time.time(), "late",
                )  # fmt: skip
                await kv.create(key(handle.cookie.bytes), won.encode(), validate_keys=False)
            finally:
                await nc.close()
            async with Worker(nodes["b"].address("worker"), handlers={"late": echo}):
                assert await asyncio.wait_for(handle, WAIT_S) == "by the dead node"
            bridge = nodes["b"].bridge
            assert bridge is not None and bridge.stats.duplicates_dropped == 1


async def test_a_result_event_lost_in_transit_is_found_in_the_bucket(
    nats_server: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core NATS drops what is sent to a node's subject while a connection is down (a
    nats-server lost): the job's node asks the bucket for it when its connection comes
    back, and for any job still waiting after RECHECK_FIRST_S. (Found by `scripts/chaos
    --cluster`: a result written just before a nats-server was SIGKILLed was lost.)"""
    async with _nodes(nats_server.urls, tmp_path, names=("a", "b")) as nodes:
        a, b = nodes["a"].bridge, nodes["b"].bridge
        assert a is not None and b is not None
        publish = b._publish
        dropped: list[bytes] = []

        async def lossy(subject: str, data: bytes) -> None:
            if data[:1] == EVENT_RESULT:
                dropped.append(data)  # lost on the way to node a
                return
            await publish(subject, data)

        monkeypatch.setattr(b, "_publish", lossy)
        async with (
            Worker(nodes["b"].address("worker"), handlers={"echo": echo}),
            Client(nodes["a"].address("client")) as client,
        ):
            # No reconnect seen (the event was lost on the sender's side): the recheck.
            first = await client.submit("echo", 1)
            assert await asyncio.wait_for(first, WAIT_S) == {"echo": 1}
            assert len(dropped) == 1 and a.stats.recovered == 1
            second = await client.submit("echo", 2)
            await _until(lambda: len(dropped) == 2)
            began = time.monotonic()
            a.reconnected()  # as nats-py calls it when the connection is back
            assert await asyncio.wait_for(second, WAIT_S) == {"echo": 2}
            assert time.monotonic() - began < RECHECK_FIRST_S  # not the recheck's
        assert a.stats.recovered == 2


async def test_jobs_survive_losing_a_nats_server_of_three(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with _nodes(nats_cluster.urls, tmp_path, replicas=3) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"echo": echo}, capacity=8),
            Client(nodes["a"].address("client")) as client,
        ):
            first = await asyncio.gather(*(client.run("echo", i, timeout=60) for i in range(20)))
            nats_cluster.kill(0)
            second = await asyncio.gather(
                *(client.run("echo", i, timeout=60) for i in range(20, 40))
            )
        lost = 40 - len(first) - len(second)
        print(f"cluster: 40 jobs, one nats-server of 3 SIGKILLed midway: {lost} lost")
        assert first + second == [{"echo": i} for i in range(40)]


async def test_a_bands_requests_are_all_accounted_when_they_expire_awaiting_a_quorum(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Two lingering requests of one band at a replicas-3 consumer, whose deliveries wait for
    a quorum (its two followers stopped) while both expire: the server sends each request's
    408, after its deliveries, only if each has a reply subject of its own; with one shared
    subject, one 408 came (the last one's unfilled count), so the band counted the other's
    unfilled jobs as still asked for and asked for no more: a stall until the lost-request
    rule fired. Here every job asked for came or was said not to."""
    import signal

    from reasonbroker.cluster.bridge import Bridge
    from reasonbroker.cluster.requests import Requests
    from tests.natscluster import http_json

    names = Names("rb")
    leader_node = None

    def consumer_state(durable: str, what: str) -> int | None:
        """The consumer's num_waiting or num_pending as its leader has it (no quorum needed)."""
        assert leader_node is not None
        jsz = http_json(leader_node.http_port, "/jsz?accounts=true&streams=true&consumers=true")
        for account in (jsz or {}).get("account_details", []):
            for stream in account.get("stream_detail", []):
                for consumer in stream.get("consumer_detail", []):
                    if consumer.get("name") == durable:
                        return int(consumer.get(what, 0))
        return None

    async def until_state(durable: str, what: str, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while await asyncio.to_thread(consumer_state, durable, what) != n:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    def bridge_on(nc: Any) -> Bridge:
        js = nc.jetstream(timeout=10.0)
        return Bridge(nc, js, Requests(nc, 10.0), None, None, names, "t", Limits(), 30.0)

    async with _nodes(nats_cluster.urls, tmp_path, names=("a",), replicas=3):  # the stream
        nc_all = await nats.connect(servers=nats_cluster.urls)
        nc: Any = None
        stopped: list[int] = []
        try:
            await bridge_on(nc_all)._ensure_pullers("p", {}, asyncio.Event())  # the consumers
            durable = names.consumer("p", "normal")
            info = await nc_all.jetstream().consumer_info(names.stream, durable)
            leader_node = next(n for n in nats_cluster.nodes if n.name == info.cluster.leader)
            nc = await nats.connect(servers=[leader_node.url])  # the requests go there directly
            bridge = bridge_on(nc)
            pullers: dict[str, Any] = {}
            await bridge._ensure_pullers("p", pullers, asyncio.Event())
            normal = pullers["normal"]
            for i in range(3):
                await nc_all.jetstream().publish(names.jobs("p", "normal"), b"job %d" % i)
            await until_state(durable, "num_pending", 3)  # the leader has them all
            stopped = [n.pid for n in nats_cluster.nodes if n is not leader_node]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            await bridge._linger(normal, 10)
            await bridge._linger(normal, 10)
            await until_state(durable, "num_waiting", 2)
            await until_state(durable, "num_waiting", 0)  # both expired, deliveries unsent
            assert normal.credit == 20 and not normal.held
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        try:
            # The deliveries are sent once their quorum is back, then the 408s.
            with contextlib.suppress(TimeoutError):
                await _until(lambda: len(normal.held) == 3 and normal.credit == 0)
            assert (len(normal.held), normal.credit) == (3, 0)
        finally:
            await nc.close()
            await nc_all.close()


async def test_a_node_started_before_jetstream_has_a_quorum_waits_and_joins(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    # Two of three servers down: the one left accepts connections but its JetStream
    # API has no meta leader to answer. The node retries until a second server is back.
    url = nats_cluster.urls[0]
    nats_cluster.kill(1)
    nats_cluster.kill(2)
    node = ClusterNode(_config([url], "a", tmp_path, replicas=3))
    joining = asyncio.create_task(node.__aenter__())
    try:
        # Bounded by the node's own limits, not the test's usual wait: on a loaded
        # machine the first request takes its whole timeout, and after the restart the
        # servers elect a meta leader before the node's next try (up to 2 s later) works.
        deadline = time.monotonic() + JOIN_REQUEST_TIMEOUT_S * 4
        while node.join_retries == 0:
            assert not joining.done(), joining.exception()
            assert time.monotonic() < deadline, "the node never had to retry"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(nats_cluster.restart, 1)
        async with asyncio.timeout(JOIN_TIMEOUT_S):
            await joining
        serving = asyncio.create_task(node.serve())
        try:
            async with (
                Worker(node.address("worker"), handlers={"echo": echo}, capacity=2),
                Client(node.address("client")) as client,
            ):
                assert await client.run("echo", 7, timeout=WAIT_S) == {"echo": 7}
        finally:
            node.shutdown(force=True)
            await serving
    finally:
        if not joining.done():
            joining.cancel()
        with contextlib.suppress(BaseException):
            await joining
        await node.__aexit__(None, None, None)


async def test_a_stream_with_other_settings_is_reported_not_changed(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    nc = await nats.connect(servers=nats_server.urls)
    try:
        await nc.jetstream().add_stream(name="RB_JOBS", subjects=["something.else.>"])
    finally:
        await nc.close()
    with pytest.raises(ClusterError, match="RB_JOBS exists with other settings"):
        async with ClusterNode(_config(nats_server.urls, "a", tmp_path)):
            pass


def test_serve_exits_2_naming_the_nats_it_cannot_reach(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    proc = subprocess.run(
        [
            sys.executable, "-m", "reasonbroker", "serve",
            "--client", f"unix://{tmp_path / 'c.sock'}",
            "--worker", f"unix://{tmp_path / 'w.sock'}",
            "--cluster", "nats://127.0.0.1:9", "--node", "a",
        ],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach NATS at nats://127.0.0.1:9" in proc.stderr


def test_without_cluster_nothing_of_nats_is_imported() -> None:
    code = (
        "import sys, reasonbroker.cli, reasonbroker.daemon.broker; "
        "sys.exit(1 if 'nats' in sys.modules or 'reasonbroker.cluster' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_both_listener_is_refused_in_cluster_mode(tmp_path: Path) -> None:
    config = dataclasses.replace(
        _config(["nats://127.0.0.1:4222"], "a", tmp_path),
        listeners=(ListenerConfig(f"unix://{tmp_path / 'b.sock'}", ListenerRole.BOTH),),
    )
    with pytest.raises(ClusterError, match="both listener"):
        ClusterNode(config)


async def test_a_node_sigkilled_mid_job_loses_nothing_another_node_runs_it(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    """Node b is a `reasonbroker serve --cluster` process whose worker is running a job
    when b is SIGKILLed; JetStream gives the job to node c after ack_wait (2 s here), and
    the client on node a gets its one RESULT."""
    worker_sock = tmp_path / "b-workers.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env["REASONBROKER_CLUSTER_ACK_WAIT_S"] = "2"
    b = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reasonbroker", "serve",
        "--client", f"unix://{tmp_path / 'b-clients.sock'}",
        "--worker", f"unix://{worker_sock}",
        "--cluster", ",".join(nats_server.urls), "--node", "b", "--log-format", "json",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert b.stderr is not None
    try:
        async with asyncio.timeout(WAIT_S):
            while b"cluster_joined" not in await b.stderr.readline():
                pass
        started_on_b = asyncio.Event()

        async def stuck(variables: Any) -> Any:
            started_on_b.set()
            await asyncio.sleep(3600)  # until its node dies

        async def quick(variables: Any) -> Any:
            return f"done on c: {variables}"

        async with _nodes(nats_server.urls, tmp_path, names=("a",), ack_wait_s=2) as nodes:
            on_b = Worker(f"unix://{worker_sock}", handlers={"job": stuck}, reconnect=False)
            serving_b = asyncio.create_task(on_b.run())
            async with Client(nodes["a"].address("client")) as client:
                handle = await client.submit("job", 7, timeout=60)
                await asyncio.wait_for(started_on_b.wait(), WAIT_S)
                b.kill()
                await b.wait()
                with pytest.raises(BrokerConnectionError):  # its node is gone
                    await asyncio.wait_for(serving_b, WAIT_S)
                async with _nodes(nats_server.urls, tmp_path, names=("c",), ack_wait_s=2) as c:
                    async with Worker(c["c"].address("worker"), handlers={"job": quick}):
                        result = await asyncio.wait_for(handle, WAIT_S)
                        stats = c["c"].bridge.stats if c["c"].bridge else None
        lost = 0 if result == "done on c: 7" else 1
        print(f"cluster: node b SIGKILLed with a job running: {lost} lost, re-run on node c")
        assert result == "done on c: 7"
        assert stats is not None and stats.redelivered == 1
    finally:
        if b.returncode is None:
            b.kill()
            await b.wait()


async def test_attach_on_another_node_collects_a_running_and_an_ended_job(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    release, began = asyncio.Event(), asyncio.Event()

    async def gated(variables: Any) -> Any:
        if variables == "wait":
            began.set()
            await release.wait()
        return f"ran {variables}"

    async with _nodes(nats_server.urls, tmp_path, names=("a", "b", "c")) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"gated": gated}, capacity=4),
            Client(nodes["a"].address("client")) as on_a,
            Client(nodes["c"].address("client")) as on_c,
        ):
            detached = (await on_a.submit("gated", "early", detach=True)).cookie
            running = await on_a.submit("gated", "wait")
            await asyncio.wait_for(began.wait(), WAIT_S)
            # Node c never saw either job; its client asks by cookie.
            later = await on_c.attach(running.cookie)
            release.set()
            assert await asyncio.wait_for(later, WAIT_S) == "ran wait"
            assert await asyncio.wait_for(running, WAIT_S) == "ran wait"  # on a too, once
            collected = await on_c.attach(detached)  # ended by now, or adopted until it does
            assert await asyncio.wait_for(collected, WAIT_S) == "ran early"
            info = await on_c.job(detached)  # answered from what node c now retains
            assert info.state.value == "ended" and info.rc is not None
            assert info.rc.value == "OK"
            with pytest.raises(CookieNotFound):  # no node has it, nor the bucket
                await on_c.job(uuid.uuid4())
        assert nodes["c"].bridge is not None and nodes["c"].bridge.stats.adopted >= 1


async def test_a_resuming_client_whose_node_stops_gets_its_result_from_another_node(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    release, started = asyncio.Event(), asyncio.Event()

    async def gated(variables: Any) -> Any:
        started.set()
        await release.wait()
        return f"ran {variables}"

    async with _nodes(nats_server.urls, tmp_path, names=("a", "b", "c")) as nodes:
        urls = [nodes["a"].address("client"), nodes["c"].address("client")]
        async with (
            Worker(nodes["b"].address("worker"), handlers={"gated": gated}),
            Client(urls, resume=True, resume_timeout=WAIT_S) as client,
        ):
            handle = await client.submit("gated", 1)
            await asyncio.wait_for(started.wait(), WAIT_S)
            nodes["a"].shutdown(force=True)  # the client's node goes away mid-job
            await _until(lambda: client.url == urls[1])  # resumed on node c, re-ATTACHed
            release.set()
            assert await asyncio.wait_for(handle, WAIT_S) == "ran 1"


async def test_status_and_metrics_show_the_cluster(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    from reasonbroker.cli import format_status
    from reasonbroker.core import protocol as p
    from reasonbroker.sdk.peer import Peer, library_logger

    async with _nodes(nats_server.urls, tmp_path) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"echo": echo}, capacity=3, name="wb"),
            Client(nodes["a"].address("client")) as client,
        ):
            assert await client.run("echo", 1, timeout=WAIT_S) == {"echo": 1}
            a = nodes["a"]
            assert a.bridge is not None and a.client_side is not None
            await _until(lambda: len(a.bridge.status()["nodes"]) == 2)  # surveyed
            peer = await Peer.connect(
                a.address("client"),
                p.Hello(role=p.Role.ADMIN, name="test", token=ADMIN_TOKEN),
                log=library_logger("test"),
            )
            try:
                await peer.send(p.Status())
                async with asyncio.timeout(WAIT_S):
                    async for packet in peer.packets():
                        if isinstance(packet, p.Status) and packet.status is not None:
                            status = packet.status
                            break
            finally:
                await peer.aclose()
            cluster = status["cluster"]
            assert cluster["node"] == "a" and cluster["stream"] == "RB_JOBS"
            by_node = {n["node"]: n for n in cluster["nodes"]}
            assert set(by_node) == {"a", "b"}
            assert (by_node["b"]["workers"], by_node["b"]["slots"]) == (1, 3)
            assert by_node["a"]["workers"] == 0
            text = format_status(status)
            assert "cluster: node a" in text and "nodes (2)" in text
            metrics = dict((name, value) for name, _, value in a.bridge.metrics())
            assert metrics["reasonbroker_cluster_nodes"] == 2
            assert metrics["reasonbroker_cluster_relayed_total"] == 1
            b = nodes["b"].bridge
            assert b is not None and b.status()["workers"][0]["name"] == "wb"


class _FirstHolds:
    """A handler that records the order jobs ran in and holds the job "first" until
    `release` is set (`began`: it has started), so the jobs after it queue up."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = asyncio.Event()
        self.began = asyncio.Event()

    async def handler(self, variables: Any) -> Any:
        if variables == "first":
            self.began.set()
            await self.release.wait()
        self.order.append(variables)
        return variables


async def test_priority_bands_across_nodes_run_higher_first(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    gate = _FirstHolds()

    async with _nodes(nats_server.urls, tmp_path) as nodes:
        async with (
            Worker(nodes["b"].address("worker"), handlers={"p": gate.handler}, capacity=1),
            Client(nodes["a"].address("client")) as client,
        ):
            first = await client.submit("p", "first")
            await asyncio.wait_for(gate.began.wait(), WAIT_S)  # the worker's one slot is taken
            handles = [
                await client.submit("p", name, priority=priority)
                for name, priority in (("low", -1), ("normal", 0), ("high", 5))
            ]
            gate.release.set()
            await asyncio.wait_for(asyncio.gather(first, *handles), WAIT_S)
    assert gate.order == ["first", "high", "normal", "low"]


async def test_priority_bands_hold_when_the_jobs_come_after_every_pull_request_ended(
    nats_server: NatsCluster, tmp_path: Path
) -> None:
    """The worker's one slot is taken until every band's lingering pull request has
    expired (none is renewed without a free slot); then low, normal and high are queued.
    When the slot frees, the three bands are asked afresh and their jobs arrive in any
    order: a held low job waits for the probes of the higher bands, so the order is
    still high, normal, low."""
    gate = _FirstHolds()

    async with _nodes(nats_server.urls, tmp_path) as nodes:
        b = nodes["b"].bridge
        assert b is not None
        async with (
            Worker(nodes["b"].address("worker"), handlers={"p": gate.handler}, capacity=1),
            Client(nodes["a"].address("client")) as client,
        ):
            first = await client.submit("p", "first")
            await asyncio.wait_for(gate.began.wait(), WAIT_S)
            pullers = [pl for (pipeline, _), pl in b._subs.items() if pipeline == "p"]
            assert len(pullers) == 3
            await _until(lambda: all(pl.credit == 0 for pl in pullers))  # all expired
            handles = [
                await client.submit("p", name, priority=priority)
                for name, priority in (("low", -1), ("normal", 0), ("high", 5))
            ]
            gate.release.set()
            await asyncio.wait_for(asyncio.gather(first, *handles), WAIT_S)
    assert gate.order == ["first", "high", "normal", "low"]


async def test_requests_answer_a_publish_and_a_create_and_time_out_a_silent_one(
    nats_server: NatsCluster,
) -> None:
    """The shared-inbox requests the hot path uses: a JetStream publish's ack (a resend
    of its Nats-Msg-Id comes back a duplicate), a KV create refused with err_code 10071
    when the key has a value, a request nobody answers timing out, one nobody hears
    refused (no responders)."""
    import nats.errors
    from nats.js.api import StreamConfig

    from reasonbroker.cluster.requests import ERR_WRONG_LAST_SEQUENCE, PublishError, Requests
    from reasonbroker.cluster.wire import create_headers

    nc = await nats.connect(nats_server.urls)
    requests = Requests(nc, timeout_s=0.5)
    await requests.start()
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="REQ", subjects=["req.>"]))
        ack = await requests.publish("req.a", b"one", {"Nats-Msg-Id": "m1"})
        assert ack["stream"] == "REQ" and not ack.get("duplicate")
        again = await requests.publish("req.a", b"one", {"Nats-Msg-Id": "m1"})
        assert again.get("duplicate") is True and again["seq"] == ack["seq"]
        await js.create_key_value(bucket="req_kv")
        created = await requests.publish("$KV.req_kv.k", b"v1", create_headers())
        assert created["seq"] >= 1
        with pytest.raises(PublishError) as refused:
            await requests.publish("$KV.req_kv.k", b"v2", create_headers())
        assert refused.value.err_code == ERR_WRONG_LAST_SEQUENCE
        kv = await js.key_value("req_kv")
        assert (await kv.get("k")).value == b"v1"  # the first writer's value stands
        await nc.subscribe("silent", cb=_ignore)
        with pytest.raises(nats.errors.TimeoutError):
            await requests.request("silent", b"", {})
        with pytest.raises(nats.errors.NoRespondersError):
            await requests.request("nobody.listens", b"", {"X": "1"})
    finally:
        await requests.close()
        await nc.close()


async def _ignore(msg: Any) -> None:
    pass


def test_the_delivery_count_is_read_from_the_ack_subject() -> None:
    from nats.aio.msg import Msg

    from reasonbroker.cluster.bridge import _delivered

    v1 = "$JS.ACK.RB_JOBS.rb_abc_normal.3.17.12.1796349157576148795.0"
    client: Any = None
    assert _delivered(Msg(client, subject="rb.jobs.p.normal", reply=v1)) == 3
    # With a domain and an account hash (12 tokens): read by nats-py's metadata.
    v2 = "$JS.ACK.dom.ACCHASH.RB_JOBS.rb_abc_normal.2.17.12.1796349157576148795.0.rand"
    assert _delivered(Msg(client, subject="rb.jobs.p.normal", reply=v2)) == 2
