"""The comparison report: `meta` (the run's settings and machine, which every mode's
JSON carries), each cell's median repeat and the reasonbroker / peer ratios (`assemble`,
the JSON document), and the table printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, Final

from .common import GEARMAND, NATS, RB_NATIVE, REASONBROKERS, uvloop
from .loadgen import Cell, Run
from .processes import version_of
from .procfs import CLK_TCK


def median_run(runs: list[Run]) -> Run:
    ok = [r for r in runs if r.error is None] or runs
    ordered = sorted(ok, key=lambda r: r.jobs_per_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.extra["repeats_jobs_per_s"] = [round(r.jobs_per_s, 1) for r in runs]
    return chosen


RATIO_KEYS: Final = (
    "jobs_per_s",
    "p50_us",
    "p99_us",
    "broker_cpu_us_per_job",
    "broker_peak_rss_kib",
)


def assemble(
    args: argparse.Namespace,
    systems: list[str],
    skipped: dict[str, str],
    cells: list[Cell],
    runs: dict[tuple[str, str], list[Run]],
    rates: dict[str, float],
) -> dict[str, Any]:
    out_cells: list[dict[str, Any]] = []
    for cell in cells:
        results: dict[str, Any] = {}
        for system in systems:
            reps = runs.get((cell.id, system))
            if reps:
                results[system] = median_run(reps).as_dict()
        ratios: dict[str, dict[str, float | None]] = {}
        for rb in REASONBROKERS:
            for peer in (GEARMAND, NATS):
                a, b = results.get(rb), results.get(peer)
                if a is None or b is None or a.get("error") or b.get("error"):
                    continue
                ratios[f"{rb}/{peer}"] = {
                    k: (round(a[k] / b[k], 3) if b[k] else None) for k in RATIO_KEYS
                }
        out_cells.append(
            {
                "id": cell.id,
                "label": cell.label(rates.get(cell.id)),
                "mode": cell.mode,
                "inflight": cell.inflight or None,
                "workers": cell.workers,
                "payload_bytes": cell.payload,
                "rate_per_s": rates.get(cell.id),
                "results": results,
                "ratios": ratios,
            }
        )
    return {
        "meta": meta(args, systems, skipped),
        "systems": {
            s: {"available": s not in skipped, "skipped": skipped.get(s), "version": version_of(s)}
            for s in systems
        },
        "cells": out_cells,
    }


def mode_name(args: argparse.Namespace) -> str:
    """scale, cluster-baseline, durable; smoke, quick or full (the grid); sdk-smoke, sdk-quick
    or sdk-full (--sdk)."""
    if args.scale:
        return "scale"
    if getattr(args, "cluster_baseline", False):
        return "cluster-baseline"
    if getattr(args, "durable", False):
        return "durable"
    if getattr(args, "cluster", False):
        return "cluster"
    size = "smoke" if args.smoke else ("quick" if args.quick else "full")
    return f"sdk-{size}" if args.sdk else size


def meta(args: argparse.Namespace, systems: list[str], skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode_name(args),
        "python": platform.python_version(),
        "event_loop": "uvloop " + uvloop.__version__ if uvloop is not None else "asyncio",
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "clients": args.clients,
        "gearmand_threads": args.gearmand_threads,
        "gearmand_worker_wakeup": args.gearmand_wakeup,
        "gearman_grab_depth": args.gearman_depth,
        "systems": systems,
        "skipped": skipped,
        "notes": [
            "closed loop: K jobs in flight over min(K, clients) connections; p50/p99 per job "
            "at the client",
            "open loop: one fixed rate for every system (half the slowest closed-loop peak at "
            "that W); latency from the scheduled send time; ~1 ms send-timer ticks included",
            "broker_cpu_us_per_job: utime+stime delta of the broker process over the "
            f"measured window / jobs (clock tick {1000 // CLK_TCK} ms)",
            "broker_peak_rss_kib: VmHWM, reset per run via /proc/PID/clear_refs when allowed",
            "ratios: reasonbroker value / peer value (jobs/s > 1 and cpu, p99 < 1 favour "
            "reasonbroker)",
            "each cell: median repeat by jobs/s",
        ],
    }


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'cell':<26} {'system':<18} {'jobs/s':>9} {'p50 us':>8} {'p99 us':>8} "
        f"{'cpu us/job':>10} {'RSS MiB':>8}   {'rb/peer: jobs/s':>15} {'p99':>6} {'cpu':>6}"
    )
    print(head)
    print("-" * len(head))
    for cell in report["cells"]:
        first = True
        for system, res in cell["results"].items():
            name = cell["label"] if first else ""
            first = False
            if res.get("error") and not res.get("jobs"):
                print(f"{name:<26} {system:<18} ERROR: {res['error'][:70]}")
                continue
            ratio = cell["ratios"].get(f"{RB_NATIVE}/{system}")
            rtext = ""
            if ratio:
                rtext = (
                    f"{fmt_ratio(ratio['jobs_per_s']):>15} {fmt_ratio(ratio['p99_us']):>6} "
                    f"{fmt_ratio(ratio['broker_cpu_us_per_job']):>6}"
                )
            flag = " !" if res.get("errors") or res.get("unanswered") or res.get("overflow") else ""
            print(
                f"{name:<26} {system:<18} {res['jobs_per_s']:>9,.0f} {res['p50_us']:>8,.0f} "
                f"{res['p99_us']:>8,.0f} {res['broker_cpu_us_per_job']:>10.1f} "
                f"{res['broker_peak_rss_kib'] / 1024:>8.1f}   {rtext}{flag}"
            )
    for system, info in report["systems"].items():
        if info["skipped"]:
            print(f"skipped {system}: {info['skipped']}")
    print(
        "rb/peer = reasonbroker / that peer (jobs/s > 1x, p99 and cpu < 1x favour reasonbroker);"
        " ! = errors, unanswered or overflow (see JSON)"
    )
