"""The default mode: every system over the grid of cells. One broker per system for the
whole run, fresh worker processes per W, and per cell and repeat each system in turn (so
background noise on a shared box hits every system alike). The open-loop rate is half the
slowest system's closed-loop peak at that W; Gearman workers keep a per-cell grab depth.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..common import GEARMAND, SMALL_PAYLOAD, log, run_async
from ..loadgen import Cell, Run, run_closed, run_open
from ..processes import Broker, WorkerPool, ensure_peers, start_broker, start_workers, stop_process
from ..report import assemble, print_table


def grid(args: argparse.Namespace) -> list[Cell]:
    cells = [
        Cell("closed", k, w, SMALL_PAYLOAD) for w in args.workers_list for k in args.inflight_list
    ]
    if getattr(args, "big_only", False):
        cells = []
    if args.big_payload > 0:
        cells.append(Cell("closed", 16, max(args.workers_list), args.big_payload))
    if not args.no_open_loop and not getattr(args, "big_only", False):
        cells += [Cell("open", 0, w, SMALL_PAYLOAD) for w in args.workers_list]
    return cells


async def bench_main(
    args: argparse.Namespace, systems: list[str], skipped: dict[str, str]
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rb-bench-"))
    brokers: dict[str, Broker] = {}
    pools: dict[str, WorkerPool] = {}
    cells = grid(args)
    runs: dict[tuple[str, str], list[Run]] = {}
    rates: dict[str, float] = {}
    depths: dict[str, int] = {}
    capacity = max([*args.inflight_list, 16])
    try:
        for system in systems:
            try:
                brokers[system] = await start_broker(system, args, tmp)
                log(f"started {system} (pid {brokers[system].pid})")
            except (RuntimeError, OSError) as exc:
                skipped[system] = f"broker did not start: {exc}"
                log(f"SKIP {system}: {skipped[system]}")
        live = [s for s in systems if s in brokers]
        total = len(cells) * args.repeats * len(live)
        step = 0
        for w in args.workers_list:
            wcells = [c for c in cells if c.workers == w]
            if not wcells:
                continue
            no_workers: dict[str, str] = {}
            for system in live:
                try:
                    pools[system] = await start_workers(system, brokers[system], w, capacity, args)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    no_workers[system] = f"workers did not start: {exc!r}"
                    log(f"{system}: {no_workers[system]}")
            for cell in wcells:
                rate = 0.0
                if GEARMAND in pools:
                    depths[cell.id] = gearman_depth(cell, args)
                    await pools[GEARMAND].set_depth(depths[cell.id])
                if cell.mode == "open":
                    rate = args.rate or open_rate(cells, runs, live, w)
                    rates[cell.id] = rate
                    if rate <= 0:
                        log(f"SKIP {cell.id}: no closed-loop figure to derive a rate from")
                        continue
                for rep in range(args.repeats):
                    # Systems interleaved per repeat: background noise on a shared box
                    # then hits every system alike instead of one of them.
                    for system in live:
                        step += 1
                        broker = brokers[system]
                        try:
                            if system in no_workers:
                                raise RuntimeError(no_workers[system])
                            if cell.mode == "open":
                                run = await run_open(
                                    system, broker, pools[system], cell, rate, args
                                )
                            else:
                                run = await run_closed(system, broker, pools[system], cell, args)
                        except (OSError, RuntimeError, TimeoutError, ConnectionError) as exc:
                            run = Run(error=f"{type(exc).__name__}: {exc}")
                        if broker.proc.returncode is not None:
                            run.error = (
                                f"broker exited ({broker.proc.returncode}): {broker.log_tail()}"
                            )
                        runs.setdefault((cell.id, system), []).append(run)
                        status = run.error or (
                            f"{run.jobs_per_s:,.0f} jobs/s  p50 {run.p50_us:,.0f} us  "
                            f"p99 {run.p99_us:,.0f} us  cpu {run.broker_cpu_us_per_job:.1f} us/job"
                        )
                        log(f"[{step}/{total}] {cell.label(rate)} rep {rep + 1} {system}: {status}")
            for pool in list(pools.values()):
                await pool.stop()
            pools.clear()
    finally:
        for pool in pools.values():
            await pool.stop()
        for broker in brokers.values():
            await stop_process(broker.proc)
        shutil.rmtree(tmp, ignore_errors=True)
    report = assemble(args, systems, skipped, cells, runs, rates)
    for cell_doc in report["cells"]:
        if cell_doc["id"] in depths:
            cell_doc["gearman_grab_depth"] = depths[cell_doc["id"]]
    return report


def gearman_depth(cell: Cell, args: argparse.Namespace) -> int:
    """Outstanding GRAB_JOBs per Gearman worker: its share of the jobs in flight. More only
    buys NO_JOB churn, fewer leaves jobs queued while a worker waits a round trip."""
    if args.gearman_depth > 0:
        return int(args.gearman_depth)
    inflight = cell.inflight or args.open_depth_basis
    return max(1, math.ceil(inflight / cell.workers))


def open_rate(
    cells: list[Cell], runs: dict[tuple[str, str], list[Run]], systems: list[str], w: int
) -> float:
    """Half the slowest system's closed-loop peak at this W: one offered load for all."""
    peaks: list[float] = []
    for system in systems:
        best = 0.0
        for cell in cells:
            if cell.mode == "closed" and cell.workers == w and cell.payload == SMALL_PAYLOAD:
                got = [r.jobs_per_s for r in runs.get((cell.id, system), []) if r.error is None]
                if got:
                    best = max(best, sorted(got)[(len(got) - 1) // 2])
        if best > 0:
            peaks.append(best)
    return 0.5 * min(peaks) if peaks else 0.0


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """The grid for --systems: the table on stdout, the report; None when no system can run."""
    systems = args.system_list
    skipped = ensure_peers(systems, install=not args.no_install)
    for system, why in skipped.items():
        log(f"SKIP {system}: {why}")
    runnable = [s for s in systems if s not in skipped]
    if not runnable:
        log("nothing to run")
        return None
    report: dict[str, Any] = run_async(lambda: bench_main(args, runnable, skipped))
    report["systems"].update(
        {s: {"available": False, "skipped": why, "version": None} for s, why in skipped.items()}
    )
    print_table(report)
    return report
