"""`scripts/bench --durable`: what the journal costs, beside gearmand's SQLite queue (#13).

Rows, in one run, at each K (default 128) and W (default 4), repeats interleaved:

    reasonbroker memory   `--journal none`: attached RUN -> RESULT, closed loop
    reasonbroker full     the SQLite journal, `sync = full`: the same jobs, each
                          accepted, dispatched and ended in the journal; a RESULT
                          leaves only once its job's end is committed
    reasonbroker normal   the same with `sync = normal`
    gearmand sqlite       `gearmand -q libsqlite3`: background jobs (SUBMIT_JOB_BG,
                          the only kind gearmand persists), K awaiting JOB_CREATED,
                          each one replaced as it comes; the echo workers drain
                          the queue meanwhile

jobs/s is the lower of the jobs acknowledged and the jobs the workers answered in
the window (so a queue that only grows is not counted as throughput); p50/p99 are
from a job's send to its RESULT (reasonbroker) or its JOB_CREATED (gearmand: its
durable acknowledgement, which is less work than a RESULT). Ratios printed:
full / memory, normal / memory, full / gearmand sqlite.

Then the phases (reasonbroker, `sync = full`): `--durable-jobs` (100,000) detached
RUNs sent while no worker is connected, each ACCEPTED (after its commit); the
broker SIGKILLed and restarted on the journal; W workers connected until every
job has been answered. The time of each phase and the journal's size (with its
WAL) after each are printed, and what was lost (0).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from reasonbroker.core import protocol as p

from ..adapters.base import Client
from ..adapters.gearman import G_JOB_CREATED, GEAR_REQ, GearmanClient, split_gearman
from ..common import GEARMAND, HOST, PIPELINE, RB_NATIVE, log, make_payload, perf, run_async
from ..loadgen import Gen, Run, close_clients, measure, open_clients
from ..processes import (
    Broker,
    WorkerPool,
    ensure_peers,
    start_broker,
    start_workers,
    stop_process,
)
from ..report import meta

G_SUBMIT_JOB_BG = 18
ROWS = ("memory", "full", "normal", "gearmand-sqlite")


class GearmanBackgroundClient(GearmanClient):
    """SUBMIT_JOB_BG; a job counts as done at its JOB_CREATED (gearmand has stored it)."""

    def send(self, stamps: list[float]) -> None:
        out: list[bytes] = []
        head = GEAR_REQ + G_SUBMIT_JOB_BG.to_bytes(4, "big")
        fn = PIPELINE.encode() + b"\0"
        for s in stamps:
            self.seq += 1
            uniq = b"%b%d" % (self.prefix, self.seq)
            out += (head, (self.fixed + len(uniq)).to_bytes(4, "big"), fn, uniq, b"\0")
            out.append(self.payload)
            self.created.append(s)
        self.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        stamps = [
            self.created.popleft()
            for ptype, _ in split_gearman(self.buf, data)
            if ptype == G_JOB_CREATED
        ]
        if stamps:
            self.gen.completed(self, stamps, 0)


async def _closed(
    row: str, broker: Broker, pool: WorkerPool, k: int, args: argparse.Namespace
) -> Run:
    loop = asyncio.get_running_loop()
    gen = Gen(loop)
    payload = make_payload(100)
    system = GEARMAND if row == "gearmand-sqlite" else RB_NATIVE
    if system == GEARMAND:
        conns: list[Client] = []
        for _ in range(min(k, args.clients)):
            proto = GearmanBackgroundClient(gen, payload)
            await loop.create_connection(lambda c=proto: c, HOST, broker.client_port)
            conns.append(proto)
    else:
        conns = await open_clients(system, broker, min(k, args.clients), gen, payload)
    try:
        per, extra = divmod(k, len(conns))
        now = perf()
        for i, c in enumerate(conns):
            n = per + (1 if i < extra else 0)
            c.send([now] * n)
            gen.outstanding += n
        before = await pool.count()
        t0 = perf()
        run = await measure(gen, broker, pool, args.warmup, args.duration)
        answered = await pool.count() - before
        # The workers' count spans warm-up and window: scale to the window's share.
        worked = answered * run.seconds / max(perf() - t0, 1e-9)
        run.extra["acknowledged_per_s"] = run.jobs_per_s
        run.extra["worked_per_s"] = worked / run.seconds if run.seconds else 0.0
        run.jobs_per_s = min(run.jobs_per_s, run.extra["worked_per_s"])
        run.unanswered = await gen.drain(10.0)
    finally:
        close_clients(conns)
    return run


async def _rows(args: argparse.Namespace, tmp: Path, rows: list[str]) -> dict[str, Any]:
    results: dict[str, dict[str, list[Run]]] = {}
    for w in args.workers_list:
        for row in rows:
            journal = None if row == "memory" else tmp / f"{row}-w{w}.sqlite3"
            sync = "normal" if row == "normal" else "full"
            system = GEARMAND if row == "gearmand-sqlite" else RB_NATIVE
            broker = await start_broker(system, args, tmp, journal=journal, sync=sync)
            try:
                pool = await start_workers(system, broker, w, max(args.inflight_list), args)
                if system == GEARMAND:
                    await pool.set_depth(max(args.inflight_list))
                try:
                    for k in args.inflight_list:
                        for rep in range(args.repeats):
                            run = await _closed(row, broker, pool, k, args)
                            results.setdefault(f"K={k} W={w}", {}).setdefault(row, []).append(run)
                            log(
                                f"durable K={k} W={w} {row} rep {rep + 1}: "
                                f"{run.error or f'{run.jobs_per_s:,.0f} jobs/s'}"
                            )
                finally:
                    await pool.stop()
            finally:
                await stop_process(broker.proc)
    table: dict[str, Any] = {}
    for cell, by_row in results.items():
        table[cell] = {}
        for row, runs in by_row.items():
            good = sorted((r for r in runs if r.error is None), key=lambda r: r.jobs_per_s)
            if not good:
                table[cell][row] = {"error": runs[-1].error}
                continue
            table[cell][row] = good[(len(good) - 1) // 2].as_dict()
    return table


def _journal_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


async def _detached_phase(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """N detached RUNs with no worker, SIGKILL, restart, W workers drain them."""
    n = args.durable_jobs
    journal = tmp / "phases.sqlite3"
    broker = await start_broker(RB_NATIVE, args, tmp, journal=journal, sync="full")
    out: dict[str, Any] = {"jobs": n, "sync": "full"}
    try:
        reader, writer = await asyncio.open_connection(HOST, broker.client_port)
        hello = p.Hello(role=p.Role.CLIENT, name="bench-durable", features=("accepted",))
        writer.write(p.encode(hello))
        decoder = p.PacketDecoder(1 << 26)
        payload = make_payload(100)
        window = 4096
        sent = accepted = refused = 0
        t0 = perf()
        while accepted + refused < n:
            if sent < n and sent - accepted - refused < window:
                batch = min(n - sent, window - (sent - accepted - refused))
                writer.write(
                    b"".join(
                        p.encode(p.Run(p.new_cookie(), PIPELINE, payload, True))
                        for _ in range(batch)
                    )
                )
                sent += batch
            data = await reader.read(1 << 16)
            if not data:
                raise RuntimeError(f"the broker closed the connection: {broker.log_tail(5)}")
            for packet in decoder.feed(data):
                if isinstance(packet, p.Accepted):
                    accepted += 1
                elif isinstance(packet, p.Result):
                    refused += 1
        out["accept_s"] = perf() - t0
        out["accepted"] = accepted
        out["refused"] = refused
        out["journal_bytes_accepted"] = _journal_bytes(journal)
        writer.close()
        broker.proc.send_signal(signal.SIGKILL)
        await broker.proc.wait()
        t1 = perf()
        broker = await start_broker(RB_NATIVE, args, tmp, journal=journal, sync="full")
        out["restart_s"] = perf() - t1
        t2 = perf()
        w = max(args.workers_list)
        pool = await start_workers(RB_NATIVE, broker, w, 128, args)
        try:
            deadline = time.monotonic() + 600
            done = 0
            while done < accepted and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                done = await pool.count()
            out["drain_s"] = perf() - t2
            out["drained"] = done
            out["lost"] = accepted - done if done <= accepted else 0
            out["reruns"] = max(done - accepted, 0)
            out["drain_workers"] = w
        finally:
            await pool.stop()
        out["journal_bytes_drained"] = _journal_bytes(journal)
    finally:
        await stop_process(broker.proc)
    out["journal_bytes_stopped"] = _journal_bytes(journal)
    return out


def _print(report: dict[str, Any]) -> None:
    print("durable jobs: jobs/s (min of acknowledged and worked), p50/p99 us, broker CPU us/job")
    for cell, rows in report["rows"].items():
        print(f"  {cell}, 100 B")
        for row in ROWS:
            r = rows.get(row)
            if r is None:
                continue
            if "error" in r and r.get("jobs_per_s") is None:
                print(f"    {row:18} ERROR {r['error']}")
                continue
            print(
                f"    {row:18} {r['jobs_per_s']:>10,.0f}  p50 {r['p50_us']:>8,.0f}  "
                f"p99 {r['p99_us']:>8,.0f}  cpu {r['broker_cpu_us_per_job']:>6.1f}"
            )
        for name, (a, b) in {
            "full / memory": ("full", "memory"),
            "normal / memory": ("normal", "memory"),
            "full / gearmand sqlite": ("full", "gearmand-sqlite"),
        }.items():
            ra, rb = rows.get(a, {}).get("jobs_per_s"), rows.get(b, {}).get("jobs_per_s")
            if ra and rb:
                print(f"    {name:24} {ra / rb:.2f}x")
    ph = report.get("phases")
    if ph:
        mib = 1 / (1 << 20)
        print(
            f"  {ph['jobs']:,} detached jobs, sync full: accepted in {ph['accept_s']:.2f} s "
            f"({ph['accepted'] / ph['accept_s']:,.0f}/s, journal "
            f"{ph['journal_bytes_accepted'] * mib:.1f} MiB); SIGKILL, restart "
            f"{ph['restart_s']:.2f} s; drained by {ph['drain_workers']} workers in "
            f"{ph['drain_s']:.2f} s (journal {ph['journal_bytes_drained'] * mib:.1f} MiB, "
            f"{ph['journal_bytes_stopped'] * mib:.1f} MiB after the stop); "
            f"lost {ph['lost']}, re-runs {ph['reruns']}"
        )


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    rows = list(ROWS)
    if "gearmand" not in args.system_list:
        rows.remove("gearmand-sqlite")
    else:
        skipped = ensure_peers([GEARMAND], install=not args.no_install)
        if skipped:
            log(f"SKIP gearmand sqlite: {skipped[GEARMAND]}")
            rows.remove("gearmand-sqlite")
    tmp = Path(tempfile.mkdtemp(prefix="rb-bench-durable-"))
    try:
        report: dict[str, Any] = {"meta": meta(args, rows, {})}
        report["rows"] = run_async(lambda: _rows(args, tmp, rows))
        if args.durable_jobs > 0:
            report["phases"] = run_async(lambda: _detached_phase(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(report)
    return report
