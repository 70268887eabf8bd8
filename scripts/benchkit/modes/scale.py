"""Scale mode (`--scale`, reasonbroker only): broker RSS per held client connection, RSS
per queued job and the drain time once held workers release, jobs/s with 1..N clients,
broker CPU per job with 4..N registered workers; each phase against a fresh broker. Its
own figures on stdout.
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
    """Four phases, each against a fresh broker (so one phase's freed memory cannot hide
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
    only = getattr(args, "scale_phases", None)
    if only:
        phases = [ph for ph in phases if ph[0] in only]
    try:
        for name, phase in phases:
            broker = await start_broker(RB_NATIVE, args, tmp)
            try:
                report["scale"][name] = await phase(broker)
            finally:
                await stop_process(broker.proc)
        if not only or "workers" in only:
            rows = await scale_workers(args, tmp, nofile)
            report["scale"]["workers"] = rows
            report["scale"]["workers_cpu_ratio"] = workers_ratio(rows)
        if not only or "workers" in only or "workers-idle" in only:
            rows = await scale_workers_idle(args, tmp, nofile)
            report["scale"]["workers_idle"] = rows
            report["scale"]["workers_idle_cpu_ratio"] = workers_ratio(rows)
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


WORKER_PROCS = 2  # the registered workers are held in two processes (asyncio protocols)


async def scale_workers(args: argparse.Namespace, tmp: Path, nofile: int) -> list[dict[str, Any]]:
    """Broker CPU per job with N registered workers, a fresh broker for each N.

    Every worker is an echo worker REGISTERed for the bench pipeline with capacity
    ceil(K/N) (so at least K free slots in all: with N >= K each worker holds at most one
    job, and every one of the N is eligible for the next dispatch); K jobs kept in flight
    (closed loop) by 4 clients. The workers live in two processes; the broker's CPU is read
    from /proc, apart from the generator's and the workers'."""
    return await _scale_workers(args, tmp, nofile, idle_others=False)


async def scale_workers_idle(
    args: argparse.Namespace, tmp: Path, nofile: int
) -> list[dict[str, Any]]:
    """The same load on the same 4 workers (capacity ceil(K/4)) every time, with N-4 more
    workers connected and REGISTERed for another pipeline (idle, never eligible): what
    dispatch pays per connected worker when the work itself does not change shape."""
    return await _scale_workers(args, tmp, nofile, idle_others=True)


async def _scale_workers(
    args: argparse.Namespace, tmp: Path, nofile: int, idle_others: bool
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    k = args.scale_workers_inflight
    out: list[dict[str, Any]] = []
    for n in args.scale_worker_counts:
        n_eff = min(n, max(4, nofile - 300))
        cap = max(1, -(-k // (4 if idle_others else n_eff)))
        broker = await start_broker(RB_NATIVE, args, tmp)
        try:
            t0 = perf()
            if idle_others:
                pools = [await start_workers(RB_NATIVE, broker, 1, cap, args, conns=4)]
                others = n_eff - 4
                procs = min(WORKER_PROCS, others)
                per, extra = divmod(others, max(1, procs))
                for i in range(procs):
                    pools.append(
                        await start_workers(
                            RB_NATIVE, broker, 1, 1, args, conns=per + (i < extra),
                            serve="idle-elsewhere",
                        )
                    )  # fmt: skip
            else:
                procs = min(WORKER_PROCS, n_eff)
                per, extra = divmod(n_eff, procs)
                pools = [
                    await start_workers(RB_NATIVE, broker, 1, cap, args, conns=per + (i < extra))
                    for i in range(procs)
                ]
            registered = perf() - t0
            try:
                gen = Gen(loop)
                conns = await open_clients(RB_NATIVE, broker, 4, gen, make_payload(SMALL_PAYLOAD))
                try:
                    now = perf()
                    per_c, extra_c = divmod(k, len(conns))
                    for i, c in enumerate(conns):
                        c.send([now] * (per_c + (i < extra_c)))
                    gen.outstanding += k
                    run = await measure(gen, broker, pools[0], args.warmup, args.duration)
                    run.unanswered = await gen.drain(10.0)
                finally:
                    close_clients(conns)
            finally:
                for pool in pools:
                    await pool.stop()
        finally:
            await stop_process(broker.proc)
        row = {
            "workers": n_eff,
            "requested": n,
            "worker_capacity": cap,
            "inflight": k,
            "register_s": round(registered, 3),
            **run.as_dict(),
        }
        out.append(row)
        log(
            f"workers: {n_eff:>6} (capacity {cap}) registered in {registered:.1f} s -> "
            f"{run.jobs_per_s:,.0f} jobs/s  p50 {run.p50_us:,.0f} us  p99 {run.p99_us:,.0f} us  "
            f"cpu {run.broker_cpu_us_per_job:.1f} us/job"
        )
    return out


def workers_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The largest N's broker us/job over the smallest N's (issue #15: within 1.2)."""
    if len(rows) < 2:
        return None
    lo = min(rows, key=lambda r: r["workers"])
    hi = max(rows, key=lambda r: r["workers"])
    a, b = lo.get("broker_cpu_us_per_job"), hi.get("broker_cpu_us_per_job")
    return round(b / a, 3) if a and b else None


def print_scale(report: dict[str, Any]) -> None:
    s = report["scale"]
    print("reasonbroker scale figures")
    if "connections" in s and "queued" in s and "clients" in s:
        print_classic(s)
    for key, title in (
        ("workers", "all N serve the pipeline, capacity ceil(K/N)"),
        ("workers_idle", "4 serve it (capacity ceil(K/4)); N-4 registered for another, idle"),
    ):
        if key not in s:
            continue
        rows = s[key]
        k = rows[0]["inflight"] if rows else 0
        print(f"  workers: {title}, K={k}")
        print(f"  {'workers':>8} {'jobs/s':>9} {'p50 us':>8} {'p99 us':>8} {'cpu us/job':>10}")
        for row in rows:
            print(
                f"  {row['workers']:>8} {row['jobs_per_s']:>9,.0f} {row['p50_us']:>8,.0f} "
                f"{row['p99_us']:>8,.0f} {row['broker_cpu_us_per_job']:>10.1f}"
            )
        ratio = s.get(f"{key}_cpu_ratio")
        if ratio is not None:
            print(f"  broker us/job, most workers / fewest: {ratio:.2f}x")


def print_classic(s: dict[str, Any]) -> None:
    c, q = s["connections"], s["queued"]
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
    """--scale: the four phases, the figures on stdout, the report."""
    report: dict[str, Any] = run_async(lambda: scale_main(args))
    print_scale(report)
    return report
