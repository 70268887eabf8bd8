"""`scripts/bench --cluster`: reasonbroker cluster nodes beside the bare JetStream pattern (#14).

Per topology (1 nats-server with replicas 1; 3 nats-servers with replicas 3; `--smoke`: the
first only), each started here on loopback (tests/natscluster.py, `sync_interval: always`,
temporary stores), at each K (default 128), 100 B payloads, closed loop, in one run:

    jetstream pattern   nats-py driving JetStream directly, as a taskiq-nats-style queue
                        does (modes/jetstream.py): publish with ack, one consumer process
                        with 128 slots (fetch, in_progress, KV create, reply, ack)
    rb 1 node           `reasonbroker serve --cluster` node a; the bench's client and one
                        echo worker process (128 slots) both on node a
    rb 2 nodes          client on node a, the worker on node b: every job crosses nodes

jobs/s, p50/p99 per job at the client, and CPU per job of the nats-servers (summed), of the
reasonbroker nodes (summed) or of the pattern's Python processes. Ratios printed:
each reasonbroker row / the jetstream pattern.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..common import HOST, RB_NATIVE, ROOT, log, run_async
from ..loadgen import Cell, run_closed
from ..processes import Broker, child_setup, free_port, start_workers, stop_process, wait_listening
from ..procfs import cpu_seconds
from .jetstream import CONSUMER_SLOTS, FETCH_MAX, Consumer, Window, pattern_cell, pattern_stream

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def start_node(name: str, urls: list[str], replicas: int, prefix: str, tmp: Path) -> Broker:
    client_port, worker_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env.update(REASONBROKER_CLUSTER_REPLICAS=str(replicas), REASONBROKER_CLUSTER_PREFIX=prefix)
    log_path = tmp / f"node-{name}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reasonbroker", "serve",
            "--client", f"tcp://{HOST}:{client_port}",
            "--worker", f"tcp://{HOST}:{worker_port}",
            "--cluster", ",".join(urls), "--node", name, "--log-level", "warning",
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            preexec_fn=child_setup, env=env,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    node = Broker(f"node-{name}", proc, client_port, worker_port, log_path)
    try:
        await wait_listening(proc, [client_port, worker_port], f"node {name}")
    except BaseException:
        await stop_process(proc)
        raise
    return node


async def rb_row(
    label: str,
    client_node: Broker,
    worker_node: Broker,
    server_pids: list[int],
    k: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    pool = await start_workers(RB_NATIVE, worker_node, 1, CONSUMER_SLOTS, args)
    try:
        nodes = sorted({client_node.pid, worker_node.pid})
        n0 = sum(cpu_seconds(p) for p in nodes)
        s0 = sum(cpu_seconds(p) for p in server_pids)
        run = await run_closed(RB_NATIVE, client_node, pool, Cell("closed", k, 1, 100), args)
        n1 = sum(cpu_seconds(p) for p in nodes)
        s1 = sum(cpu_seconds(p) for p in server_pids)
    finally:
        await pool.stop()
    # The CPU readings span warm-up and drain too: per job of the whole span's jobs is
    # not known, so the window's jobs over the window's share is approximated by the ratio.
    span = args.warmup + run.seconds
    share = run.seconds / span if span else 1.0
    jobs = run.jobs or 1
    return {
        "cell": label,
        "k": k,
        "jobs_per_s": round(run.jobs_per_s, 1),
        "p50_us": round(run.p50_us, 1),
        "p99_us": round(run.p99_us, 1),
        "server_cpu_us_per_job": round((s1 - s0) * share / jobs * 1e6, 1),
        "node_cpu_us_per_job": round((n1 - n0) * share / jobs * 1e6, 1),
        "errors": run.errors,
        "error": run.error,
    }


async def topology(
    size: int, replicas: int, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    import nats

    from tests.natscluster import NatsCluster

    rows: list[dict[str, Any]] = []
    name = f"{size} server{'s' if size > 1 else ''}, R{replicas}"
    with NatsCluster(size=size) as cluster:
        log(f"{name}: nats-server {cluster.version} at {', '.join(cluster.urls)}")
        for k in args.inflight_list:
            # The bare pattern.
            nc = await nats.connect(servers=cluster.urls, pending_size=64 << 20)
            js = nc.jetstream(timeout=10.0)
            stream, subject, bucket = await pattern_stream(js, f"P{k}", replicas, True)
            consumer = await Consumer.start(
                {
                    "urls": cluster.urls,
                    "stream": stream,
                    "bucket": bucket,
                    "slots": CONSUMER_SLOTS,
                    "fetch_max": FETCH_MAX,
                }
            )
            try:
                win = Window(cluster.pids, [os.getpid(), consumer.proc.pid])
                res = await pattern_cell(nc, js, stream, subject, k, win, args)
                res.update(cell="jetstream pattern", k=k)
                res["node_cpu_us_per_job"] = res.pop("python_cpu_us_per_job")
                rows.append(res)
                log(f"  {name} K={k} jetstream pattern: {res['jobs_per_s']:,.0f} jobs/s")
            finally:
                await consumer.stop()
                await nc.close()
            # reasonbroker nodes on the same NATS (their own prefix, so their own stream).
            prefix = f"b{k}"
            a = await start_node("a", cluster.urls, replicas, prefix, tmp)
            b = await start_node("b", cluster.urls, replicas, prefix, tmp)
            try:
                for label, client_node, worker_node in (
                    ("rb 1 node", a, a),
                    ("rb 2 nodes", a, b),
                ):
                    row = await rb_row(label, client_node, worker_node, cluster.pids, k, args)
                    rows.append(row)
                    log(f"  {name} K={k} {label}: {row['error'] or row['jobs_per_s']} jobs/s")
            finally:
                for node in (a, b):
                    await stop_process(node.proc)
        for row in rows:
            row["topology"] = name
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'topology':<16} {'cell':<18} {'K':>4} {'jobs/s':>9} {'p50 us':>9} {'p99 us':>9} "
        f"{'srv us/job':>10} {'node us/job':>11} {'/pattern':>8}"
    )
    print(head)
    print("-" * len(head))
    base: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["cell"] == "jetstream pattern":
            base[(r["topology"], r["k"])] = r["jobs_per_s"]
    for r in rows:
        ref = base.get((r["topology"], r["k"]))
        ratio = (
            "" if r["cell"] == "jetstream pattern" or not ref else f"{r['jobs_per_s'] / ref:.2f}x"
        )

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:,.0f}"

        print(
            f"{r['topology']:<16} {r['cell']:<18} {r['k']:>4} {r['jobs_per_s']:>9,.0f} "
            f"{f(r['p50_us']):>9} {f(r['p99_us']):>9} {f(r['server_cpu_us_per_job']):>10} "
            f"{f(r['node_cpu_us_per_job']):>11} {ratio:>8}"
        )


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..report import meta

    try:
        import nats  # noqa: F401
    except ImportError:
        log("--cluster needs nats-py: pip install -e '.[cluster]'")
        return None
    from tests.natscluster import ServerNotFound, find_server

    try:
        _, version = find_server()
    except ServerNotFound as e:
        log(str(e))
        return None
    load = list(os.getloadavg())
    topologies = [(1, 1)] if args.smoke else [(1, 1), (3, 3)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rb-bench-cluster-") as tmp:
        for size, replicas in topologies:
            rows += run_async(lambda s=size, r=replicas: topology(s, r, args, Path(tmp)))
    print_table(rows)
    report = {"meta": meta(args, ["reasonbroker-cluster", "nats-jetstream"], {}), "rows": rows}
    report["meta"].update(nats_server=version, loadavg_at_start=load)
    return report
