"""--sdk: what a Python user gets, not what the bench's hand-written adapters get.

reasonbroker's own SDK (`Client.run` / `Worker` handlers) against reasonbroker, and
nats-py (`request` / a queue-group subscriber) against nats-server, same shapes: closed
loop, K jobs in flight per run, W workers, 100 B payloads (and the big payload at W=max).

Processes, as a user would run them, all apart from the broker and from each other:

    client   one process, one connection (one `Client`, one nats-py connection), K
             coroutines each awaiting one job after another: `await client.run(...)` or
             `await nc.request(...)`. Started per run (`--role sdk-client`); it times
             every job, and reads its own, the broker's and the workers' CPU from /proc
             over the measured window, then prints one `RESULT {json}` line and exits.
    workers  W processes (`--role sdk-worker`), one `Worker` (capacity = the largest K)
             or one nats-py queue subscriber each: one Python process per core is how a
             Python worker scales. Started per W, steered like the adapter workers (EOF
             on stdin ends them).

Both sides run under uvloop (common.run_async), as the adapters do; the SDK's logging
is set to warnings, to stderr, in both roles. nats-py is the `bench` extra of
pyproject.toml: missing, it is pip-installed into the project venv unless --no-install.

Per cell and side: jobs/s, p50/p99 per job at the client, and CPU per job of the
client process, the worker processes (summed) and the broker, then SDK / nats-py ratios.
--sdk-profile DIR runs both roles under cProfile (the client for its measured window,
each worker from registered to stop) and writes DIR/<role>-<side>-<cell>-<pid>.pstats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from ..common import (
    HOST,
    NATS,
    PIPELINE,
    RB_NATIVE,
    ROOT,
    SCRIPT,
    SMALL_PAYLOAD,
    log,
    make_payload,
    perf,
    run_async,
)
from ..loadgen import Cell, Run, percentile
from ..processes import (
    Broker,
    WorkerPool,
    child_setup,
    ensure_peers,
    start_broker,
    stop_process,
    version_of,
)
from ..procfs import cpu_times, reset_peak_rss, status_kib
from ..report import fmt_ratio, median_run, meta

ROLES: Final = ("sdk-client", "sdk-worker")
# Broker system -> the name of its Python side in the report.
SIDES: Final = {RB_NATIVE: "reasonbroker-sdk", NATS: "nats-py"}
RATIO: Final = "reasonbroker-sdk/nats-py"
RATIO_KEYS: Final = (
    "jobs_per_s",
    "p50_us",
    "p99_us",
    "client_cpu_us_per_job",
    "worker_cpu_us_per_job",
    "broker_cpu_us_per_job",
    "total_cpu_us_per_job",
)
NATS_QUEUE: Final = "bench-workers"
JOB_TIMEOUT_S: Final = 30.0  # nats-py request timeout; the SDK leaves deadlines to the broker
MAX_JOBS_PER_TASK: Final = 5_000_000  # a bound on every client loop besides its time
ERRORS_BEFORE_GIVING_UP: Final = 1000


def _sdk() -> tuple[Any, Any]:
    """The SDK under test: the one place it is imported (its package layout is moving)."""
    from reasonbroker.sdk.client import Client
    from reasonbroker.sdk.worker import Worker

    return Client, Worker


def _quiet_sdk_logs() -> None:
    """Warnings and worse, to stderr: what a user running the SDK in production sets up
    (structlog's default prints every event to stdout, which the roles' protocol uses)."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


# -- nats-py: the bench extra ---------------------------------------------------------


def bench_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as fp:
        extras = tomllib.load(fp)["project"].get("optional-dependencies", {})
    return list(extras.get("bench", []))


def ensure_nats_py(install: bool) -> str | None:
    """None when nats-py imports (pip-installing the `bench` extra into the project venv
    if allowed), else why not."""
    if importlib.util.find_spec("nats") is not None:
        return None
    hint = f"install it with: {sys.executable} -m pip install -e '.[bench]'"
    venv = (ROOT / ".venv").resolve()
    if not install:
        return f"nats-py not installed (--no-install); {hint}"
    if Path(sys.prefix).resolve() != venv:
        return f"nats-py not installed and this is not the project venv; {hint}"
    reqs = bench_requirements()
    if not reqs:
        return f"nats-py not installed, and pyproject.toml has no `bench` extra; {hint}"
    log(f"installing the bench extra ({', '.join(reqs)}) into {venv} with pip ...")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", *reqs],
            check=True,
            timeout=600,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"pip install failed ({exc}); {hint}"
    importlib.invalidate_caches()
    if importlib.util.find_spec("nats") is None:
        return f"nats-py still not importable after pip install; {hint}"
    return None


def nats_py_version() -> str | None:
    try:
        from importlib.metadata import version

        return f"nats-py {version('nats-py')}"
    except Exception:
        return None


# -- the roles (separate processes) ------------------------------------------------------


def role_main(args: argparse.Namespace) -> int:
    _quiet_sdk_logs()
    fn = client_role if args.role == "sdk-client" else worker_role
    try:
        return int(run_async(lambda: fn(args)))
    except asyncio.CancelledError:  # SIGTERM
        return 0


def _profiler(args: argparse.Namespace) -> Any:
    if not args.sdk_profile:
        return None
    import cProfile

    return cProfile.Profile()


def _dump_profile(prof: Any, args: argparse.Namespace, tag: str) -> None:
    if prof is None:
        return
    out = Path(args.sdk_profile)
    out.mkdir(parents=True, exist_ok=True)
    side = SIDES[args.system]
    prof.dump_stats(out / f"{args.role}-{side}-{tag}-{os.getpid()}.pstats")


async def _open_client(system: str, port: int) -> tuple[Callable[[bytes], Awaitable[Any]], Any]:
    """(submit one job and await its answer, close) for this side."""
    if system == RB_NATIVE:
        client_cls, _ = _sdk()
        client = client_cls(f"tcp://{HOST}:{port}", name="bench-sdk-client")
        await client.connect()

        async def call_rb(payload: bytes) -> Any:
            return await client.run(PIPELINE, payload)

        return call_rb, client.close
    import nats

    nc = await nats.connect(f"nats://{HOST}:{port}", connect_timeout=10, allow_reconnect=False)

    async def call_nats(payload: bytes) -> Any:
        msg = await nc.request(PIPELINE, payload, timeout=JOB_TIMEOUT_S)
        return msg.data

    return call_nats, nc.close


async def client_role(args: argparse.Namespace) -> int:
    """K coroutines, each one job after another; the measured window's figures on stdout."""
    inflight = args.inflight_list[0]
    payload = make_payload(args.payload)
    size = len(payload)
    call, close = await _open_client(args.system, args.port)
    state = {"measuring": False, "stop": False, "errors": 0, "window_errors": 0}
    lat: list[float] = []
    first_error: list[str] = []

    async def one_after_another() -> None:
        for _ in range(MAX_JOBS_PER_TASK):
            if state["stop"]:
                return
            t = perf()
            try:
                answer = await call(payload)
                if len(answer) != size:
                    raise ValueError(f"answer of {len(answer)} bytes, sent {size}")
            except Exception as exc:
                state["errors"] += 1
                if state["measuring"]:
                    state["window_errors"] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
                if state["errors"] >= ERRORS_BEFORE_GIVING_UP:
                    state["stop"] = True
                    return
                await asyncio.sleep(0.001)
                continue
            if state["measuring"]:
                lat.append(perf() - t)

    tasks = [asyncio.create_task(one_after_another()) for _ in range(inflight)]
    me = os.getpid()
    groups = {"client": [me], "broker": [args.broker_pid], "worker": args.worker_pids or []}
    prof = _profiler(args)

    def cpu() -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for name, pids in groups.items():
            u = s = 0.0
            for pid in pids:
                pu, ps = cpu_times(pid)
                u += pu
                s += ps
            out[name] = (u, s)
        return out

    unanswered = 0
    try:
        await asyncio.sleep(args.warmup)
        c0 = cpu()
        t0 = perf()
        state["measuring"] = True
        if prof is not None:
            prof.enable()
        await asyncio.sleep(args.duration)
        if prof is not None:
            prof.disable()
        state["measuring"] = False
        t1 = perf()
        c1 = cpu()
        state["stop"] = True
        _, pending = await asyncio.wait(tasks, timeout=10.0)
        unanswered = len(pending)
    finally:
        state["stop"] = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await close()
    _dump_profile(prof, args, f"k{inflight}-{args.payload}B")
    lat.sort()
    doc = {
        "jobs": len(lat),
        "seconds": t1 - t0,
        "p50_us": percentile(lat, 0.50) * 1e6,
        "p99_us": percentile(lat, 0.99) * 1e6,
        "errors": state["window_errors"],
        "unanswered": unanswered,
        "first_error": first_error[0] if first_error else None,
        "cpu_s": {k: [c1[k][0] - c0[k][0], c1[k][1] - c0[k][1]] for k in groups},
    }
    print("RESULT " + json.dumps(doc), flush=True)
    return 0


async def worker_role(args: argparse.Namespace) -> int:
    """One SDK Worker or one nats-py queue subscriber, echoing; `ready`, then EOF ends it."""
    loop = asyncio.get_running_loop()
    prof = _profiler(args)
    if args.system == RB_NATIVE:
        _, worker_cls = _sdk()

        async def echo(variables: Any) -> Any:
            return variables

        def echo_inline(variables: Any) -> Any:
            return variables

        worker = worker_cls(
            f"tcp://{HOST}:{args.port}",
            handlers={PIPELINE: echo_inline if args.sdk_handler == "function" else echo},
            capacity=args.capacity,
            name="bench-sdk-worker",
            reconnect=False,
        )
        serving = asyncio.create_task(worker.run())
        registered = asyncio.create_task(worker.registered.wait())
        await asyncio.wait([serving, registered], timeout=20, return_when="FIRST_COMPLETED")
        if not worker.registered.is_set():
            registered.cancel()
            log(f"sdk worker: did not register ({serving.exception() if serving.done() else ''})")
            return 1
        lost: asyncio.Future[Any] = serving  # type: ignore[assignment]

        async def stop() -> None:
            worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 5)
    else:
        import nats

        nc = await nats.connect(
            f"nats://{HOST}:{args.port}", connect_timeout=10, allow_reconnect=False
        )

        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(PIPELINE, queue=NATS_QUEUE, cb=respond)
        await nc.flush()
        lost = loop.create_future()

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)

    print("ready", flush=True)
    if prof is not None:
        prof.enable()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(1_000_000):  # lines on stdin: none are expected, EOF ends it
        line_task = asyncio.ensure_future(reader.readline())
        await asyncio.wait([line_task, lost], return_when=asyncio.FIRST_COMPLETED)
        if not line_task.done():
            line_task.cancel()
            break  # the broker went away
        if not line_task.result():
            break
    if prof is not None:
        prof.disable()
    await stop()
    _dump_profile(prof, args, f"cap{args.capacity}")
    return 0


# -- the orchestrator ----------------------------------------------------------------------


def cells_of(args: argparse.Namespace) -> list[Cell]:
    cells = [
        Cell("closed", k, w, SMALL_PAYLOAD) for w in args.workers_list for k in args.inflight_list
    ]
    if args.big_payload > 0:
        big_k = [k for k in args.inflight_list if k > 1] or [max(args.inflight_list)]
        cells += [Cell("closed", k, max(args.workers_list), args.big_payload) for k in big_k]
    return cells


async def start_sdk_workers(
    system: str, broker: Broker, count: int, capacity: int, args: argparse.Namespace
) -> WorkerPool:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--role",
        "sdk-worker",
        "--system",
        system,
        "--port",
        str(broker.worker_port),
        "--capacity",
        str(capacity),
        "--sdk-handler",
        args.sdk_handler,
    ]
    if args.sdk_profile:
        cmd += ["--sdk-profile", args.sdk_profile]
    pool = WorkerPool(SIDES[system], [])
    try:
        for _ in range(count):
            pool.procs.append(
                await asyncio.create_subprocess_exec(
                    *cmd,
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    preexec_fn=child_setup,
                )
            )
        for proc in pool.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise RuntimeError(f"{SIDES[system]} worker did not register ({line!r})")
    except BaseException:
        await pool.stop()
        raise
    return pool


async def run_client(
    system: str, broker: Broker, pool: WorkerPool, cell: Cell, args: argparse.Namespace
) -> Run:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--role",
        "sdk-client",
        "--system",
        system,
        "--port",
        str(broker.client_port),
        "--inflight",
        str(cell.inflight),
        "--payload",
        str(cell.payload),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
        "--broker-pid",
        str(broker.pid),
        "--worker-pids",
        ",".join(str(p) for p in pool.pids),
    ]
    if args.sdk_profile:
        cmd += ["--sdk-profile", args.sdk_profile]
    reset_peak_rss(broker.pid)
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=child_setup,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.warmup + args.duration + 60.0)
    except TimeoutError:
        await stop_process(proc)
        return Run(error="client process timed out")
    doc = None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            doc = json.loads(line[len("RESULT ") :])
    if doc is None:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return Run(error=f"client exited {proc.returncode} without a result: {' | '.join(tail)}")
    run = run_of(doc)
    run.broker_peak_rss_kib = status_kib(broker.pid, "VmHWM") or status_kib(broker.pid, "VmRSS")
    return run


def run_of(doc: dict[str, Any]) -> Run:
    jobs = int(doc["jobs"])
    run = Run(
        jobs=jobs,
        seconds=doc["seconds"],
        jobs_per_s=jobs / doc["seconds"] if doc["seconds"] > 0 else 0.0,
        p50_us=doc["p50_us"],
        p99_us=doc["p99_us"],
        errors=doc["errors"],
        unanswered=doc["unanswered"],
    )
    per_job: dict[str, float] = {}
    for name, (user, system) in doc["cpu_s"].items():
        per_job[name] = (user + system) / jobs * 1e6 if jobs else 0.0
        run.extra[f"{name}_user_us_per_job"] = round(user / jobs * 1e6, 2) if jobs else 0.0
        run.extra[f"{name}_sys_us_per_job"] = round(system / jobs * 1e6, 2) if jobs else 0.0
    run.broker_cpu_us_per_job = per_job["broker"]
    run.broker_user_us_per_job = run.extra.pop("broker_user_us_per_job")
    run.broker_sys_us_per_job = run.extra.pop("broker_sys_us_per_job")
    run.worker_cpu_us_per_job = per_job["worker"]
    run.gen_cpu_us_per_job = per_job["client"]
    run.extra["client_cpu_us_per_job"] = per_job["client"]
    run.extra["total_cpu_us_per_job"] = sum(per_job.values())
    if doc.get("first_error"):
        run.extra["first_error"] = doc["first_error"]
    if jobs == 0:
        run.error = doc.get("first_error") or "no job finished in the window"
    return run


async def sdk_main(
    args: argparse.Namespace, systems: list[str], skipped: dict[str, str]
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rb-bench-sdk-"))
    brokers: dict[str, Broker] = {}
    pools: dict[str, WorkerPool] = {}
    cells = cells_of(args)
    runs: dict[tuple[str, str], list[Run]] = {}
    capacity = max([*args.inflight_list, 16])
    try:
        for system in systems:
            try:
                brokers[system] = await start_broker(system, args, tmp)
                log(f"started {system} (pid {brokers[system].pid})")
            except (RuntimeError, OSError) as exc:
                skipped[system] = f"broker did not start: {exc}"
                log(f"SKIP {SIDES[system]}: {skipped[system]}")
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
                    pools[system] = await start_sdk_workers(
                        system, brokers[system], w, capacity, args
                    )
                except (RuntimeError, TimeoutError, OSError) as exc:
                    no_workers[system] = f"workers did not start: {exc!r}"
                    log(f"{SIDES[system]}: {no_workers[system]}")
            for cell in wcells:
                for rep in range(args.repeats):
                    for system in live:  # interleaved per repeat, as in the grid
                        step += 1
                        if system in no_workers:
                            run = Run(error=no_workers[system])
                        else:
                            run = await run_client(
                                system, brokers[system], pools[system], cell, args
                            )
                        if brokers[system].proc.returncode is not None:
                            run.error = f"broker exited: {brokers[system].log_tail(3)}"
                        runs.setdefault((cell.id, system), []).append(run)
                        status = run.error or (
                            f"{run.jobs_per_s:,.0f} jobs/s  p50 {run.p50_us:,.0f} us  "
                            f"p99 {run.p99_us:,.0f} us  cpu us/job client "
                            f"{run.gen_cpu_us_per_job:.1f} worker {run.worker_cpu_us_per_job:.1f}"
                            f" broker {run.broker_cpu_us_per_job:.1f}"
                        )
                        where = f"{cell.label()} rep {rep + 1} {SIDES[system]}"
                        log(f"[{step}/{total}] {where}: {status}")
            for pool in list(pools.values()):
                await pool.stop()
            pools.clear()
    finally:
        for pool in pools.values():
            await pool.stop()
        for broker in brokers.values():
            await stop_process(broker.proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return assemble(args, systems, skipped, cells, runs)


def assemble(
    args: argparse.Namespace,
    systems: list[str],
    skipped: dict[str, str],
    cells: list[Cell],
    runs: dict[tuple[str, str], list[Run]],
) -> dict[str, Any]:
    out_cells: list[dict[str, Any]] = []
    for cell in cells:
        results: dict[str, Any] = {}
        for system in systems:
            reps = runs.get((cell.id, system))
            if reps:
                results[SIDES[system]] = median_run(reps).as_dict()
        ratios: dict[str, dict[str, float | None]] = {}
        a, b = results.get(SIDES[RB_NATIVE]), results.get(SIDES[NATS])
        if a and b and not a.get("error") and not b.get("error"):
            ratios[RATIO] = {k: (round(a[k] / b[k], 3) if b[k] else None) for k in RATIO_KEYS}
        out_cells.append(
            {
                "id": cell.id,
                "label": cell.label(),
                "mode": cell.mode,
                "inflight": cell.inflight,
                "workers": cell.workers,
                "payload_bytes": cell.payload,
                "results": results,
                "ratios": ratios,
            }
        )
    doc_meta = meta(args, [SIDES[s] for s in systems], {SIDES[s]: w for s, w in skipped.items()})
    doc_meta["notes"] = [
        "closed loop: one client process, one connection, K coroutines each awaiting one "
        "job after another (Client.run / nc.request); p50/p99 per job in that process",
        "workers: W processes, one SDK Worker (capacity = largest K) or one nats-py "
        f"queue-group subscriber ({NATS_QUEUE!r}) each; echo handlers (the SDK's: "
        f"{'a plain def, run inline' if args.sdk_handler == 'function' else 'an async def'})",
        "cpu us/job: utime+stime deltas from /proc over the measured window / jobs, for "
        "the client process, the worker processes (summed) and the broker; total = all three",
        "broker_peak_rss_kib: VmHWM over the run (warm-up included), reset per run",
        f"ratios: {RATIO} (jobs/s > 1 and p99, cpu < 1 favour the SDK)",
        "each cell: median repeat by jobs/s; uvloop on both sides",
    ]
    versions = {RB_NATIVE: version_of(RB_NATIVE), NATS: None}
    if NATS in systems:
        versions[NATS] = f"{nats_py_version()} / {version_of(NATS)}"
    return {
        "meta": doc_meta,
        "systems": {
            SIDES[s]: {
                "available": s not in skipped,
                "skipped": skipped.get(s),
                "version": versions.get(s),
            }
            for s in systems
        },
        "cells": out_cells,
    }


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'cell':<24} {'side':<17} {'jobs/s':>8} {'p50 us':>8} {'p99 us':>8} "
        f"{'client':>7} {'worker':>7} {'broker':>7} {'total':>7}   "
        f"{'sdk/nats: jobs/s':>16} {'p99':>6} {'cpu':>6}"
    )
    print(" " * 58 + "cpu us per job (client / workers / broker / sum)")
    print(head)
    print("-" * len(head))
    for cell in report["cells"]:
        first = True
        for side, res in cell["results"].items():
            name = cell["label"] if first else ""
            first = False
            if res.get("error") and not res.get("jobs"):
                print(f"{name:<24} {side:<17} ERROR: {str(res['error'])[:80]}")
                continue
            rtext = ""
            ratio = cell["ratios"].get(RATIO)
            if ratio and side == SIDES[RB_NATIVE]:
                rtext = (
                    f"{fmt_ratio(ratio['jobs_per_s']):>16} {fmt_ratio(ratio['p99_us']):>6} "
                    f"{fmt_ratio(ratio['total_cpu_us_per_job']):>6}"
                )
            flag = " !" if res.get("errors") or res.get("unanswered") else ""
            print(
                f"{name:<24} {side:<17} {res['jobs_per_s']:>8,.0f} {res['p50_us']:>8,.0f} "
                f"{res['p99_us']:>8,.0f} {res['client_cpu_us_per_job']:>7.1f} "
                f"{res['worker_cpu_us_per_job']:>7.1f} {res['broker_cpu_us_per_job']:>7.1f} "
                f"{res['total_cpu_us_per_job']:>7.1f}   {rtext}{flag}"
            )
    for side, info in report["systems"].items():
        if info["skipped"]:
            print(f"skipped {side}: {info['skipped']}")
    print(
        "sdk/nats = reasonbroker SDK / nats-py (jobs/s > 1x, p99 and cpu < 1x favour the SDK;"
        " cpu = total); ! = errors or unanswered (see JSON)"
    )


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """--sdk for the --systems that have a Python side here (reasonbroker, nats)."""
    systems = [s for s in args.system_list if s in SIDES]
    if not systems:
        log(f"--sdk: --systems names none of {', '.join(SIDES)}")
        return None
    skipped = ensure_peers(systems, install=not args.no_install)
    if NATS in systems and NATS not in skipped:
        why = ensure_nats_py(install=not args.no_install)
        if why:
            skipped[NATS] = why
    for system, why in skipped.items():
        log(f"SKIP {SIDES[system]}: {why}")
    runnable = [s for s in systems if s not in skipped]
    if not runnable:
        log("nothing to run")
        return None
    started = time.monotonic()
    at_start = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": list(os.getloadavg())}
    report: dict[str, Any] = run_async(lambda: sdk_main(args, runnable, skipped))
    report["meta"]["started"] = at_start["started"]
    report["meta"]["loadavg_at_start"] = at_start["loadavg"]
    for s, why in skipped.items():
        report["systems"][SIDES[s]] = {"available": False, "skipped": why, "version": None}
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    report["meta"]["loadavg_at_end"] = list(os.getloadavg())
    print_table(report)
    return report
