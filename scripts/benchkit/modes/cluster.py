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
reasonbroker nodes (summed) or of the pattern's Python processes (its producer is this
process), of the load generator (this process) and the worker process for the rb rows
("cl+wk"), and the messages per job the servers' client connections sent and got (/connz).
Ratios printed: each reasonbroker row / the jetstream pattern of its round.

    --cluster-topologies 1,3     which (1: one server, R1; 3: three, R3)
    --cluster-cells pattern,1node,2nodes
    --cluster-builds /work/main  another checkout's nodes too, after this one's, each round
    --repeats N                  rounds (each: the pattern, then every build's rows)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..common import HOST, RB_NATIVE, ROOT, log, run_async
from ..loadgen import Cell, run_closed
from ..processes import Broker, child_setup, free_port, start_workers, stop_process, wait_listening
from ..procfs import cpu_seconds
from .jetstream import CONSUMER_SLOTS, Consumer, Window, pattern_cell, pattern_stream

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def start_node(
    name: str, urls: list[str], replicas: int, prefix: str, tmp: Path, build: Path = ROOT
) -> Broker:
    """`reasonbroker serve --cluster` of `build` (a checkout: its .venv's interpreter, its
    source and compiled modules; this checkout's by default)."""
    python = sys.executable if build == ROOT else str(build / ".venv" / "bin" / "python")
    client_port, worker_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env.update(REASONBROKER_CLUSTER_REPLICAS=str(replicas), REASONBROKER_CLUSTER_PREFIX=prefix)
    log_path = tmp / f"node-{prefix}-{name}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "reasonbroker", "serve",
            "--client", f"tcp://{HOST}:{client_port}",
            "--worker", f"tcp://{HOST}:{worker_port}",
            "--cluster", ",".join(urls), "--node", name, "--log-level", "warning",
            cwd=build, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
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
    msgs: Callable[[], Awaitable[tuple[int, int]]],
    k: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    pool = await start_workers(RB_NATIVE, worker_node, 1, CONSUMER_SLOTS, args)
    try:
        nodes = sorted({client_node.pid, worker_node.pid})
        m0 = await msgs()
        n0 = sum(cpu_seconds(p) for p in nodes)
        s0 = sum(cpu_seconds(p) for p in server_pids)
        run = await run_closed(RB_NATIVE, client_node, pool, Cell("closed", k, 1, 100), args)
        n1 = sum(cpu_seconds(p) for p in nodes)
        s1 = sum(cpu_seconds(p) for p in server_pids)
        m1 = await msgs()
    finally:
        await pool.stop()
    # The node whose worker left keeps its pull requests until they expire (1 s) and gives
    # back (nak) what they brought then: let that pass, so the next row starts clean.
    await asyncio.sleep(2.0)
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
        # The load generator (this process) and the worker process, over the window.
        "client_worker_cpu_us_per_job": round(
            (run.gen_cpu_us_per_job or 0.0) + (run.worker_cpu_us_per_job or 0.0), 1
        ),
        "msgs_in_per_job": round((m1[0] - m0[0]) * share / jobs, 2),
        "msgs_out_per_job": round((m1[1] - m0[1]) * share / jobs, 2),
        "errors": run.errors,
        "error": run.error,
    }


def client_msgs(cluster: Any) -> Callable[[], Awaitable[tuple[int, int]]]:
    """The messages the servers' client connections (not routes) sent them and were sent,
    summed over the servers (/connz): publishes, acks, fetch and KV requests in; deliveries,
    replies and acks out."""
    from tests.natscluster import http_json

    def read() -> tuple[int, int]:
        got_in = got_out = 0
        for node in cluster.nodes:
            connz = http_json(node.http_port, "/connz?limit=4096") or {}
            for conn in connz.get("connections", []):
                got_in += int(conn.get("in_msgs", 0))
                got_out += int(conn.get("out_msgs", 0))
        return got_in, got_out

    async def msgs() -> tuple[int, int]:
        return await asyncio.to_thread(read)

    return msgs


def node_warnings(path: Path) -> dict[str, int]:
    """How often a node logged each cluster_* event (its log is at --log-level warning)."""
    import re

    counts: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return counts
    for event in re.findall(r"\b(cluster_[a-z_]+)", text):
        counts[event] = counts.get(event, 0) + 1
    return counts


def builds(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(label suffix, checkout) of each build whose nodes run: this one, then --cluster-builds."""
    out: list[tuple[str, Path]] = [("", ROOT)]
    for d in filter(None, (x.strip() for x in args.cluster_builds.split(","))):
        path = Path(d).resolve()
        if not (path / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"--cluster-builds: {path} has no .venv/bin/python")
        out.append((f" [{path.name}]", path))
    return out


async def topology(
    size: int, replicas: int, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:

    from tests.natscluster import NatsCluster

    cells = {c.strip() for c in args.cluster_cells.split(",")}
    unknown = cells - {"pattern", "1node", "2nodes"}
    if unknown:
        raise SystemExit(f"--cluster-cells: unknown {', '.join(sorted(unknown))}")
    rows: list[dict[str, Any]] = []
    name = f"{size} server{'s' if size > 1 else ''}, R{replicas}"
    with NatsCluster(size=size) as cluster:
        log(f"{name}: nats-server {cluster.version} at {', '.join(cluster.urls)}")
        for k in args.inflight_list:
            for rnd in range(args.repeats):
                if "pattern" in cells:
                    rows.append(await pattern_row(name, cluster, replicas, k, rnd, args))
                # reasonbroker nodes on the same NATS (their own prefix, so their own stream),
                # each build's in turn.
                for b, (suffix, build) in enumerate(builds(args)):
                    prefix = f"b{k}r{rnd}x{b}"
                    a = await start_node("a", cluster.urls, replicas, prefix, tmp, build)
                    nb = await start_node("b", cluster.urls, replicas, prefix, tmp, build)
                    try:
                        for cell, label, client_node, worker_node in (
                            ("1node", "rb 1 node", a, a),
                            ("2nodes", "rb 2 nodes", a, nb),
                        ):
                            if cell not in cells:
                                continue
                            row = await rb_row(
                                label + suffix,
                                client_node,
                                worker_node,
                                cluster.pids,
                                client_msgs(cluster),
                                k,
                                args,
                            )
                            row["round"] = rnd
                            rows.append(row)
                            log(
                                f"  {name} K={k} {label + suffix}: "
                                f"{row['error'] or row['jobs_per_s']} jobs/s"
                            )
                    finally:
                        for node in (a, nb):
                            await stop_process(node.proc)
                        for node in (a, nb):
                            warned = node_warnings(node.log_path)
                            if warned:
                                log(f"  {node.system}{suffix} logged: {warned}")
        for row in rows:
            row["topology"] = name
    return rows


async def pattern_row(
    name: str, cluster: Any, replicas: int, k: int, rnd: int, args: argparse.Namespace
) -> dict[str, Any]:
    import nats

    nc = await nats.connect(servers=cluster.urls, pending_size=64 << 20)
    js = nc.jetstream(timeout=10.0)
    stream, subject, bucket = await pattern_stream(js, f"P{k}R{rnd}", replicas, True)
    consumer = await Consumer.for_pattern(cluster.urls, stream, bucket)
    try:
        win = Window(cluster.pids, [os.getpid(), consumer.proc.pid], client_msgs(cluster))
        res = await pattern_cell(nc, js, stream, subject, k, win, args)
        res.update(cell="jetstream pattern", k=k, round=rnd)
        res["node_cpu_us_per_job"] = res.pop("python_cpu_us_per_job")
        log(f"  {name} K={k} jetstream pattern: {res['jobs_per_s']:,.0f} jobs/s")
        return res
    finally:
        await consumer.stop()
        await nc.close()


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'topology':<16} {'cell':<24} {'K':>4} {'jobs/s':>9} {'p50 us':>9} {'p99 us':>9} "
        f"{'srv us/job':>10} {'node us/job':>11} {'cl+wk us/job':>12} {'msgs in/out':>11} "
        f"{'/pattern':>8}"
    )
    print(head)
    print("-" * len(head))
    base: dict[tuple[str, int, int], float] = {}
    for r in rows:
        if r["cell"] == "jetstream pattern":
            base[(r["topology"], r["k"], r.get("round", 0))] = r["jobs_per_s"]
    for r in rows:
        ref = base.get((r["topology"], r["k"], r.get("round", 0)))
        ratio = (
            "" if r["cell"] == "jetstream pattern" or not ref else f"{r['jobs_per_s'] / ref:.2f}x"
        )

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:,.0f}"

        m = (
            f"{r['msgs_in_per_job']:.1f}/{r['msgs_out_per_job']:.1f}"
            if "msgs_in_per_job" in r
            else "-"
        )
        print(
            f"{r['topology']:<16} {r['cell']:<24} {r['k']:>4} {r['jobs_per_s']:>9,.0f} "
            f"{f(r['p50_us']):>9} {f(r['p99_us']):>9} {f(r['server_cpu_us_per_job']):>10} "
            f"{f(r['node_cpu_us_per_job']):>11} {f(r.get('client_worker_cpu_us_per_job')):>12} "
            f"{m:>11} {ratio:>8}"
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
    sizes = {int(x) for x in args.cluster_topologies.split(",") if x.strip()}
    topologies = [(1, 1)] if args.smoke else [(n, n) for n in (1, 3) if n in sizes]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rb-bench-cluster-") as tmp:
        for size, replicas in topologies:
            rows += run_async(lambda s=size, r=replicas: topology(s, r, args, Path(tmp)))
    print_table(rows)
    report = {"meta": meta(args, ["reasonbroker-cluster", "nats-jetstream"], {}), "rows": rows}
    report["meta"].update(nats_server=version, loadavg_at_start=load)
    return report
