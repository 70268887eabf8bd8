"""Cluster baseline (`--cluster-baseline`): the JetStream work-queue pattern issue #14's cluster
store will run per job, driven by nats-py directly, on 1 server (replicas 1) and on a 3-server
cluster (replicas 3), each started here on loopback (tests/natscluster.py, `sync_interval:
always`, temporary stores, stopped at the end).

Per job (the "pattern" cells, K jobs in flight, closed loop):
  producer (this process)  publish to the pipeline's work-queue stream with Nats-Msg-Id = job
                           id and a reply subject header, await the publish ack, then await
                           the result on its reply subject
  consumer (a subprocess)  one durable pull consumer; fetch batches sized to its free slots
                           (128), `in_progress` once per job, KV `create` of the result (first
                           writer wins; a KeyWrongLastSequence = duplicate, dropped), publish
                           the result to the reply subject (core NATS), ack
"pattern -inpr": the same at K=128 without in_progress.
The building blocks alone at K=128: publish-with-ack only; fetch+ack only (a prefilled stream
drained in batches of 128, plain acks, timed until the stream is empty); KV create only.

Printed per cell: jobs/s, p50/p99 per job (pattern: publish to result at the producer; pub and
kv: per call), CPU per job of the nats-server processes (summed) and of the Python processes
(producer + consumer), from /proc over the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..common import ROOT, SMALL_PAYLOAD, log, make_payload, perf, run_async
from ..procfs import cpu_seconds

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHKIT_PARENT = Path(__file__).resolve().parents[2]  # scripts/: `-m benchkit...` runs there
CONSUMER_SLOTS = 128
FETCH_MAX = 128
DURABLE = "workers"


def _nats() -> Any:
    try:
        import nats
    except ImportError:
        return None
    return nats


# -- the consumer process -----------------------------------------------------------------


async def consumer_main(cfg: dict[str, Any]) -> int:
    """Serve jobs until SIGTERM: fetch to free slots, in_progress, KV create, reply, ack."""
    import nats
    import nats.errors
    import nats.js.errors

    nc = await nats.connect(servers=cfg["urls"], name="bench-consumer", pending_size=64 << 20)
    js = nc.jetstream(timeout=10.0)
    sub = await js.pull_subscribe_bind(durable=DURABLE, stream=cfg["stream"])
    kv = await js.key_value(cfg["bucket"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    slots = int(cfg["slots"])
    running = 0
    freed = asyncio.Event()
    dropped = 0
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        nonlocal running, dropped
        try:
            if cfg.get("in_progress", True):
                await msg.in_progress()
            hdr = msg.headers or {}
            job = hdr["Nats-Msg-Id"]
            try:
                await kv.create(job, msg.data, validate_keys=False)
            except nats.js.errors.KeyWrongLastSequenceError:
                dropped += 1  # a redelivered job whose result exists: ack and drop
            else:
                await nc.publish(hdr["Rb-Reply"], msg.data, headers={"Rb-Job": job})
            await msg.ack()
        finally:
            running -= 1
            freed.set()

    print("ready", flush=True)
    while not stop.is_set():
        free = slots - running
        if free <= 0:
            freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), 0.5)
            continue
        try:
            msgs = await sub.fetch(batch=min(free, int(cfg["fetch_max"])), timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            continue  # nothing to fetch (nats-py raises either TimeoutError), or no leader yet
        for m in msgs:
            running += 1
            t = asyncio.create_task(handle(m))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    await nc.close()
    print(json.dumps({"dropped": dropped}), flush=True)
    return 0


# -- the bench side -----------------------------------------------------------------------


class Consumer:
    """The consumer subprocess (this module run with -m), started once per pattern cell."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def for_pattern(
        cls, urls: list[str], stream: str, bucket: str, in_progress: bool = True
    ) -> Consumer:
        """The pattern's consumer process on `stream`, writing results to `bucket`."""
        cfg: dict[str, Any] = {
            "urls": urls,
            "stream": stream,
            "bucket": bucket,
            "slots": CONSUMER_SLOTS,
            "fetch_max": FETCH_MAX,
        }
        if not in_progress:
            cfg["in_progress"] = False
        return await cls.start(cfg)

    @classmethod
    async def start(cls, cfg: dict[str, Any]) -> Consumer:
        env = dict(os.environ, PYTHONPATH=str(BENCHKIT_PARENT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchkit.modes.jetstream",
            json.dumps(cfg),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self = cls(proc)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError(f"consumer did not start (said {line!r})")
        return self

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Window:
    """Counts, latencies and CPU of the given pids over warmup + duration."""

    def __init__(
        self,
        server_pids: list[int],
        py_pids: list[int],
        msgs: Callable[[], Awaitable[tuple[int, int]]] | None = None,
    ) -> None:
        self.server_pids = server_pids
        self.py_pids = py_pids
        self.msgs = msgs  # the servers' client messages (in, out) so far, if counted
        self.measuring = False
        self.done = 0
        self.lat: list[float] = []

    def record(self, seconds: float) -> None:
        if self.measuring:
            self.done += 1
            self.lat.append(seconds)

    async def run(self, warmup: float, duration: float) -> dict[str, Any]:
        await asyncio.sleep(warmup)
        m0 = await self.msgs() if self.msgs else (0, 0)
        s0 = sum(cpu_seconds(p) for p in self.server_pids)
        p0 = sum(cpu_seconds(p) for p in self.py_pids)
        t0 = perf()
        self.measuring = True
        await asyncio.sleep(duration)
        self.measuring = False
        elapsed = perf() - t0
        s1 = sum(cpu_seconds(p) for p in self.server_pids)
        p1 = sum(cpu_seconds(p) for p in self.py_pids)
        res = result(self.done, elapsed, self.lat, s1 - s0, p1 - p0)
        if self.msgs:
            m1 = await self.msgs()
            n = self.done or 1
            res["msgs_in_per_job"] = round((m1[0] - m0[0]) / n, 2)
            res["msgs_out_per_job"] = round((m1[1] - m0[1]) / n, 2)
        return res


def result(n: int, elapsed: float, lat: list[float], srv: float, py: float) -> dict[str, Any]:
    def us(x: float | None) -> float | None:
        return None if x is None else round(x * 1e6, 1)

    return {
        "jobs": n,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_us": us(statistics.median(lat)) if lat else None,
        "p99_us": us(pct(lat, 0.99)),
        "server_cpu_us_per_job": us(srv / n) if n else None,
        "python_cpu_us_per_job": us(py / n) if n else None,
    }


async def closed_loop(
    k: int, op: Callable[[int], Awaitable[None]], win: Window, args: argparse.Namespace
) -> dict[str, Any]:
    """K lanes each running op(i) back to back until the window ends (bounded)."""
    stop = False
    counter = itertools.count()
    errors = 0

    async def lane() -> None:
        nonlocal errors
        while not stop:
            t = perf()
            try:
                await asyncio.wait_for(op(next(counter)), 10)
            except Exception as e:  # counted and shown: a failed op is not a job
                errors += 1
                if errors <= 3:
                    log(f"  op failed: {e!r}")
                continue
            win.record(perf() - t)

    lanes = [asyncio.create_task(lane()) for _ in range(k)]
    try:
        res = await win.run(args.warmup, args.duration)
    finally:
        stop = True
        _, pending = await asyncio.wait(lanes, timeout=15)
        for t in pending:
            t.cancel()
    res["errors"] = errors
    return res


async def pattern_cell(
    nc: Any, js: Any, stream: str, subject: str, k: int, win: Window, args: argparse.Namespace
) -> dict[str, Any]:
    """The producer side of one pattern cell: publish with Nats-Msg-Id and a reply subject,
    await the publish ack, then the result on the reply subject."""
    payload = make_payload(SMALL_PAYLOAD)
    inbox = f"rbres.{stream}"
    pending: dict[str, asyncio.Future[None]] = {}
    loop = asyncio.get_running_loop()

    async def on_result(msg: Any) -> None:
        fut = pending.pop((msg.headers or {}).get("Rb-Job", ""), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    rsub = await nc.subscribe(inbox, cb=on_result)

    async def job(i: int) -> None:
        jid = f"{stream}-{i}"
        fut: asyncio.Future[None] = loop.create_future()
        pending[jid] = fut
        try:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": jid, "Rb-Reply": inbox})
            await fut
        finally:
            pending.pop(jid, None)

    try:
        return await closed_loop(k, job, win, args)
    finally:
        await rsub.unsubscribe()


async def pattern_stream(js: Any, rid: str, replicas: int, with_kv: bool) -> tuple[str, str, str]:
    """A fresh work-queue stream, its durable consumer and (with_kv) a results bucket:
    (stream, subject, bucket), named after `rid`."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType

    stream, subject, bucket = f"JOBS{rid}", f"jobs.{rid}.echo", f"res{rid}"
    await js.add_stream(
        name=stream,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=4 * CONSUMER_SLOTS,
        ),
    )
    if with_kv:
        await js.create_key_value(
            bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas
        )
    return stream, subject, bucket


class Topology:
    def __init__(self, name: str, size: int, replicas: int) -> None:
        self.name, self.size, self.replicas = name, size, replicas


async def run_topology(topo: Topology, args: argparse.Namespace) -> list[dict[str, Any]]:
    import nats
    import nats.js.errors

    from tests.natscluster import NatsCluster

    rows: list[dict[str, Any]] = []
    payload = make_payload(SMALL_PAYLOAD)
    run_ids = itertools.count()
    with NatsCluster(size=topo.size, sync_always=not args.js_no_sync) as cluster:
        log(f"{topo.name}: nats-server {cluster.version} at {', '.join(cluster.urls)}")
        nc = await nats.connect(servers=cluster.urls, name="bench-producer", pending_size=64 << 20)
        js = nc.jetstream(timeout=10.0)
        me = os.getpid()

        async def fresh(with_kv: bool) -> tuple[str, str, str]:
            return await pattern_stream(js, str(next(run_ids)), topo.replicas, with_kv)

        async def drop(stream: str, bucket: str | None) -> None:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
            if bucket:
                with contextlib.suppress(Exception):
                    await js.delete_key_value(bucket)

        def row(cell: str, k: int, res: dict[str, Any]) -> None:
            res.update(topology=topo.name, cell=cell, k=k)
            rows.append(res)
            log(
                f"  {cell:<14} K={k:<4} {res['jobs_per_s']:>9.0f} jobs/s  p50 {res['p50_us']} us"
                f"  p99 {res['p99_us']} us  srv {res['server_cpu_us_per_job']} us/job"
                f"  py {res['python_cpu_us_per_job']} us/job  errors {res.get('errors', 0)}"
            )

        # The whole pattern, K = 1, 16, 128.
        for k in args.inflight_list:
            stream, subject, bucket = await fresh(with_kv=True)
            consumer = await Consumer.for_pattern(cluster.urls, stream, bucket)
            try:
                win = Window(cluster.pids, [me, consumer.proc.pid])
                row("pattern", k, await pattern_cell(nc, js, stream, subject, k, win, args))
            finally:
                await consumer.stop()
                await drop(stream, bucket)

        k = max(args.inflight_list)
        # The pattern without in_progress: what a cadence (one per ack_wait/3 while a job
        # runs, none for a job shorter than that) saves on short jobs.
        stream, subject, bucket = await fresh(with_kv=True)
        consumer = await Consumer.for_pattern(cluster.urls, stream, bucket, in_progress=False)
        try:
            win = Window(cluster.pids, [me, consumer.proc.pid])
            row("pattern -inpr", k, await pattern_cell(nc, js, stream, subject, k, win, args))
        finally:
            await consumer.stop()
            await drop(stream, bucket)

        # Publish with ack only.
        stream, subject, _ = await fresh(with_kv=False)
        try:

            async def pub(i: int, subject: str = subject, stream: str = stream) -> None:
                await js.publish(subject, payload, headers={"Nats-Msg-Id": f"{stream}-{i}"})

            row("publish+ack", k, await closed_loop(k, pub, Window(cluster.pids, [me]), args))
        finally:
            await drop(stream, None)

        # KV create only.
        stream, _, bucket = await fresh(with_kv=True)
        try:
            kv = await js.key_value(bucket)

            async def create(i: int) -> None:
                await kv.create(f"job-{i}", payload, validate_keys=False)

            row("kv create", k, await closed_loop(k, create, Window(cluster.pids, [me]), args))
        finally:
            await drop(stream, bucket)

        # Fetch + ack only: prefill, then drain in batches of FETCH_MAX.
        stream, subject, _ = await fresh(with_kv=False)
        try:
            n = min(args.js_prefill, 500) if args.smoke else args.js_prefill
            t = perf()
            futs = []
            for _ in range(n):
                futs.append(await js.publish_async(subject, payload))
            await asyncio.wait_for(asyncio.gather(*futs), 120)
            log(f"  prefilled {n} in {perf() - t:.1f} s")
            sub = await js.pull_subscribe_bind(durable=DURABLE, stream=stream)
            s0 = sum(cpu_seconds(p) for p in cluster.pids)
            p0 = cpu_seconds(me)
            t0 = perf()
            got = 0
            limit = t0 + 120
            while got < n and perf() < limit:
                try:
                    msgs = await sub.fetch(batch=FETCH_MAX, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)
            await nc.flush()
            while (await js.stream_info(stream)).state.messages and perf() < limit:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # a poll: the stream has no "empty" event
            elapsed = perf() - t0
            res = result(
                got,
                elapsed,
                [],
                sum(cpu_seconds(p) for p in cluster.pids) - s0,
                cpu_seconds(me) - p0,
            )
            res["batch"] = FETCH_MAX
            row("fetch+ack", FETCH_MAX, res)
        finally:
            await drop(stream, None)
        await nc.close()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'topology':<22} {'cell':<14} {'K':>4} {'jobs/s':>9} {'p50 us':>8} {'p99 us':>8} "
        f"{'srv us/job':>10} {'py us/job':>9}"
    )
    print(head)
    print("-" * len(head))

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for r in rows:
        print(
            f"{r['topology']:<22} {r['cell']:<14} {r['k']:>4} {r['jobs_per_s']:>9.0f} "
            f"{f(r['p50_us']):>8} {f(r['p99_us']):>8} {f(r['server_cpu_us_per_job']):>10} "
            f"{f(r['python_cpu_us_per_job']):>9}"
        )


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..report import meta

    if _nats() is None:
        log("--cluster-baseline needs nats-py: pip install -e '.[cluster]'")
        return None
    from tests.natscluster import ServerNotFound, find_server

    try:
        binary, version = find_server()
    except ServerNotFound as e:
        log(str(e))
        return None
    sync = "default" if args.js_no_sync else "always"
    log(f"nats-server {version}: {binary}; sync_interval {sync}")
    load_at_start = list(os.getloadavg())
    topologies = [Topology("1 server, R1", 1, 1), Topology("3 servers, R3", 3, 3)]
    rows: list[dict[str, Any]] = []
    for topo in topologies:
        rows += run_async(lambda topo=topo: run_topology(topo, args))
    print_table(rows)
    report = {"meta": meta(args, ["nats-jetstream"], {}), "rows": rows}
    report["meta"].update(
        nats_server=version,
        sync_interval="default" if args.js_no_sync else "always",
        consumer_slots=CONSUMER_SLOTS,
        fetch_max=FETCH_MAX,
        loadavg_at_start=load_at_start,  # meta() runs after the cells: it read the end
        loadavg_at_end=list(os.getloadavg()),
    )
    return report


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    sys.exit(int(run_async(lambda: consumer_main(cfg))))
