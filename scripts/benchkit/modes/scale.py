"""Scale mode (`--scale`, reasonbroker only): broker RSS per held client connection, RSS
per queued job and the drain time once held workers release, jobs/s with 1..N clients;
each phase against a fresh broker. Its own figures on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from ..adapters import make_client
from ..adapters.base import Client
from ..adapters.reasonbroker import RBClient
from ..common import HOST, RB_NATIVE, SMALL_PAYLOAD, log, make_payload, perf, run_async
from ..loadgen import Gen, close_clients, measure, open_clients
from ..processes import Broker, raise_nofile, start_broker, start_workers, stop_process
from ..procfs import status_kib
from ..report import meta


async def scale_main(args: argparse.Namespace) -> dict[str, Any]:
    """Three phases, each against a fresh broker (so one phase's freed memory cannot hide
    the next one's growth)."""
    tmp = Path(tempfile.mkdtemp(prefix="rb-scale-"))
    report: dict[str, Any] = {"meta": meta(args, [RB_NATIVE], {}), "scale": {}}
    nofile = raise_nofile()
    log(f"RLIMIT_NOFILE {nofile} (raised to the hard limit here and in the broker)")
    phases: list[tuple[str, Callable[[Broker], Awaitable[Any]]]] = [
        ("connections", lambda b: scale_connections(b, args, nofile)),
        ("queued", lambda b: scale_queued(b, args)),
        ("clients", lambda b: scale_clients(b, args)),
    ]
    try:
        for name, phase in phases:
            broker = await start_broker(RB_NATIVE, args, tmp)
            try:
                report["scale"][name] = await phase(broker)
            finally:
                await stop_process(broker.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


async def scale_connections(
    broker: Broker, args: argparse.Namespace, nofile: int
) -> dict[str, Any]:
    """N idle client connections held open (each said HELLO and got the answer)."""
    n = min(args.scale_conns, max(0, nofile - 200))
    loop = asyncio.get_running_loop()
    gen = Gen(loop)
    payload = make_payload(SMALL_PAYLOAD)
    rss0 = status_kib(broker.pid, "VmRSS")
    conns: list[Client] = []
    t0 = perf()
    try:
        async with asyncio.timeout(120):
            batch = 200
            for start in range(0, n, batch):
                protos = [
                    make_client(RB_NATIVE, gen, payload, hello=True)
                    for _ in range(min(batch, n - start))
                ]
                await asyncio.gather(
                    *(
                        loop.create_connection(lambda p=p: p, HOST, broker.client_port)
                        for p in protos
                    )
                )
                conns += protos
                await asyncio.gather(*(p.ready for p in protos))
        opened = perf() - t0
        rss1 = status_kib(broker.pid, "VmRSS")
        result = {
            "connections": n,
            "requested": args.scale_conns,
            "open_s": round(opened, 3),
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_per_connection_kib": round((rss1 - rss0) / n, 2) if n else None,
        }
        # A few jobs through the crowd would need workers; the held connections are the point.
        log(
            f"connections: {n} open in {opened:.1f} s; broker RSS {rss0 / 1024:.1f} -> "
            f"{rss1 / 1024:.1f} MiB = {result['rss_per_connection_kib']} KiB/connection"
        )
    finally:
        close_clients(conns)
    return result


async def scale_queued(broker: Broker, args: argparse.Namespace) -> dict[str, Any]:
    """N jobs queued behind 4 held workers: broker RSS, then the drain time once released."""
    n = args.scale_queued
    loop = asyncio.get_running_loop()
    cap = args.scale_hold_capacity
    pool = await start_workers(RB_NATIVE, broker, 4, cap, args, hold=True)
    gen = Gen(loop)
    gen.refill = False
    payload = make_payload(SMALL_PAYLOAD)
    conns = await open_clients(RB_NATIVE, broker, 4, gen, payload, hello=True)
    try:
        rss0 = status_kib(broker.pid, "VmRSS")
        t0 = perf()
        gen.measuring = True
        per, extra = divmod(n, len(conns))
        for i, c in enumerate(conns):
            k = per + (1 if i < extra else 0)
            now = perf()
            for start in range(0, k, 5000):
                c.send([now] * min(5000, k - start))
            gen.outstanding += k
        await asyncio.wait_for(asyncio.gather(*(cast(RBClient, c).ping() for c in conns)), 120)
        submitted = perf() - t0
        rss1 = status_kib(broker.pid, "VmRSS")
        queued_note = f"{n - 4 * cap} queued + {4 * cap} held by workers"
        log(
            f"queued: {n} jobs submitted in {submitted:.1f} s ({queued_note}); broker RSS "
            f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB"
        )
        t1 = perf()
        await pool.release()
        unanswered = await gen.drain(300.0)
        drained = perf() - t1
        log(
            f"queued: drained through 4 workers in {drained:.2f} s = "
            f"{gen.done / drained:,.0f} jobs/s"
        )
        return {
            "jobs": n,
            "workers": 4,
            "worker_capacity": cap,
            "submit_s": round(submitted, 3),
            "rss_before_kib": rss0,
            "rss_queued_kib": rss1,
            "rss_per_queued_job_bytes": round((rss1 - rss0) * 1024 / n, 1) if n else None,
            "drain_s": round(drained, 3),
            "drain_jobs_per_s": round(gen.done / drained, 1) if drained > 0 else None,
            "completed": gen.done,
            "errors": gen.errors,
            "unanswered": unanswered,
            "failure": gen.failure,
        }
    finally:
        close_clients(conns)
        await pool.stop()


async def scale_clients(broker: Broker, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Closed-loop jobs/s with 1..N connected clients, one job in flight each, 4 workers."""
    counts = args.scale_client_counts
    loop = asyncio.get_running_loop()
    pool = await start_workers(RB_NATIVE, broker, 4, max(counts), args)
    out: list[dict[str, Any]] = []
    try:
        for n in counts:
            gen = Gen(loop)
            conns = await open_clients(RB_NATIVE, broker, n, gen, make_payload(SMALL_PAYLOAD))
            try:
                now = perf()
                for c in conns:
                    c.send([now])
                    gen.outstanding += 1
                run = await measure(gen, broker, pool, args.warmup, args.duration)
                run.unanswered = await gen.drain(10.0)
            finally:
                close_clients(conns)
            row = {"clients": n, **run.as_dict()}
            out.append(row)
            log(
                f"clients: {n:>5} -> {run.jobs_per_s:,.0f} jobs/s  p50 {run.p50_us:,.0f} us  "
                f"p99 {run.p99_us:,.0f} us  cpu {run.broker_cpu_us_per_job:.1f} us/job"
            )
    finally:
        await pool.stop()
    return out


def print_scale(report: dict[str, Any]) -> None:
    s = report["scale"]
    c, q = s["connections"], s["queued"]
    print("reasonbroker scale figures")
    print(
        f"  {c['connections']:,} client connections: RSS {c['rss_before_kib'] / 1024:.1f} -> "
        f"{c['rss_after_kib'] / 1024:.1f} MiB = {c['rss_per_connection_kib']} KiB per connection "
        f"(opened in {c['open_s']} s)"
    )
    print(
        f"  {q['jobs']:,} queued jobs: RSS {q['rss_before_kib'] / 1024:.1f} -> "
        f"{q['rss_queued_kib'] / 1024:.1f} MiB = {q['rss_per_queued_job_bytes']} B per job; "
        f"drained through {q['workers']} workers (capacity {q['worker_capacity']}) in "
        f"{q['drain_s']} s = {q['drain_jobs_per_s']:,.0f} jobs/s"
    )
    print(f"  {'clients':>8} {'jobs/s':>9} {'p50 us':>8} {'p99 us':>8} {'cpu us/job':>10}")
    for row in s["clients"]:
        print(
            f"  {row['clients']:>8} {row['jobs_per_s']:>9,.0f} {row['p50_us']:>8,.0f} "
            f"{row['p99_us']:>8,.0f} {row['broker_cpu_us_per_job']:>10.1f}"
        )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """--scale: the three phases, the figures on stdout, the report."""
    report: dict[str, Any] = run_async(lambda: scale_main(args))
    print_scale(report)
    return report
