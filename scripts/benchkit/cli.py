"""The command line: flags and their per-mode defaults (--smoke, --quick, the full grid,
--scale, --sdk, --durable), then the run: the hidden `--role worker` process (or the --sdk mode's
`sdk-client` / `sdk-worker`), or the mode, whose report goes to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .common import SYSTEMS, log, run_async
from .modes import cluster, durable, grid, jetstream, scale, sdk
from .processes import raise_nofile
from .worker import worker_main


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1: {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="reasonbroker vs gearmand vs nats-server: echo jobs, side by side.",
    )
    p.add_argument("--quick", action="store_true", help="K in {16,128}, W=4, 1 s cells, 1 repeat")
    p.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    p.add_argument("--scale", action="store_true", help="scale figures for reasonbroker instead")
    p.add_argument(
        "--sdk",
        action="store_true",
        help="the Python SDK (Client/Worker) vs nats-py, instead of the adapters (2 s, 2 repeats)",
    )
    p.add_argument(
        "--durable",
        action="store_true",
        help="the SQLite journal (sync full, normal) vs in-memory vs gearmand -q libsqlite3, "
        "then 100k detached jobs accepted, SIGKILL, restart, drained (K=128 W=4)",
    )
    p.add_argument(
        "--durable-jobs",
        type=int,
        help="--durable: detached jobs of the phases (100000; smoke 2000; 0 = none)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="reasonbroker cluster nodes (1 and 2) vs the bare JetStream pattern, 1 and 3 servers",
    )
    p.add_argument(
        "--cluster-topologies",
        default="1,3",
        help="--cluster: nats-server counts to run, 1 (replicas 1) and/or 3 (replicas 3)",
    )
    p.add_argument(
        "--cluster-cells",
        default="pattern,1node,2nodes",
        help="--cluster: cells to run, of pattern,1node,2nodes",
    )
    p.add_argument(
        "--cluster-builds",
        default="",
        help="--cluster: other checkouts (comma-separated dirs, each with its .venv) whose "
        "nodes run beside this one's, interleaved in each round, labelled by dir name",
    )
    p.add_argument(
        "--cluster-baseline",
        action="store_true",
        help="the bare JetStream work-queue pattern (nats-py) on 1 and 3 servers (issue #14)",
    )
    p.add_argument(
        "--js-no-sync",
        action="store_true",
        help="cluster baseline: the server's default sync_interval instead of always",
    )
    p.add_argument(
        "--js-prefill", type=int, default=5000, help="cluster baseline: jobs for fetch+ack"
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    p.add_argument("--duration", type=float, help="measured seconds per run (3; quick 1)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each run")
    p.add_argument("--repeats", type=int, help="runs per cell, median kept (3; quick 1)")
    p.add_argument("--inflight", type=int_list, help="K values (1,16,128; quick 16,128)")
    p.add_argument("--workers", type=int_list, help="W values (1,4; quick 4)")
    p.add_argument("--clients", type=int, default=4, help="client connections (at most K)")
    p.add_argument(
        "--big-payload", type=int, help="bytes of the big-payload cell (65536; 0 = none)"
    )
    p.add_argument(
        "--big-only", action="store_true", help="only the big-payload cell (closed K=16, W=max)"
    )
    p.add_argument("--no-open-loop", action="store_true", help="skip the open-loop cells")
    p.add_argument("--rate", type=float, default=0.0, help="open-loop jobs/s (default: derived)")
    p.add_argument("--open-max-inflight", type=int, default=20000, help=argparse.SUPPRESS)
    p.add_argument("--open-depth-basis", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--rb-wrapper", help=argparse.SUPPRESS)
    p.add_argument(
        "--gearmand-threads",
        type=int,
        default=0,
        help="gearmand --threads (0: its own pick; best here)",
    )
    p.add_argument(
        "--gearman-depth",
        type=int,
        default=0,
        help="GRAB_JOBs each Gearman worker keeps outstanding (default 0: per cell, ceil(K/W))",
    )
    p.add_argument(
        "--gearmand-wakeup",
        type=int,
        default=1,
        help="gearmand --worker-wakeup: sleeping workers woken per job (1; 0 = all, its default)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get install a peer")
    p.add_argument("--json", default="bench-results.json", help="where to write the JSON")
    p.add_argument("--scale-conns", type=int, default=10_000, help="scale: connections held")
    p.add_argument("--scale-queued", type=int, default=100_000, help="scale: jobs queued")
    p.add_argument("--scale-hold-capacity", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument(
        "--scale-clients",
        dest="scale_client_counts",
        type=int_list,
        default=[1, 10, 100, 1000],
        help="scale: client counts for jobs/s (1,10,100,1000)",
    )
    p.add_argument(
        "--scale-workers",
        dest="scale_worker_counts",
        type=int_list,
        default=[4, 100, 1000, 10_000],
        help="scale: registered worker counts for broker CPU per job (4,100,1000,10000)",
    )
    p.add_argument(
        "--scale-workers-inflight",
        type=int,
        default=128,
        help="scale: jobs in flight (K) in the workers phase (128)",
    )
    p.add_argument(
        "--scale-phases",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help=(
            "scale: only these phases (connections,queued,clients,"
            "workers (both shapes),workers-idle; default all)"
        ),
    )
    # Hidden: the worker process.
    p.add_argument(
        "--role", choices=["bench", "worker", *sdk.ROLES], default="bench", help=argparse.SUPPRESS
    )
    p.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--capacity", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # a worker's one pipeline
    # Hidden: the --sdk roles (modes/sdk.py).
    p.add_argument("--payload", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-pids", type=int_list, help=argparse.SUPPRESS)
    p.add_argument(
        "--sdk-profile", metavar="DIR", help="--sdk: cProfile both roles, .pstats files in DIR"
    )
    p.add_argument(
        "--sdk-handler",
        choices=["coroutine", "function"],
        default="coroutine",
        help="--sdk: the SDK worker's echo handler: an async def (a task per job, the "
        "default) or a plain def (run inline, no task)",
    )
    args = p.parse_args(argv)

    if args.smoke:
        defaults: dict[str, Any] = dict(
            duration=0.3, repeats=1, inflight=[16], workers=[1], big_payload=0
        )
    elif args.quick:
        defaults = dict(duration=1.0, repeats=1, inflight=[16, 128], workers=[4], big_payload=65536)
    else:
        defaults = dict(
            duration=3.0, repeats=3, inflight=[1, 16, 128], workers=[1, 4], big_payload=65536
        )
    if args.cluster and not args.quick:
        defaults.update(inflight=[16] if args.smoke else [128], duration=0.5 if args.smoke else 3.0)
        defaults["repeats"] = 1
    if args.cluster_baseline and args.smoke:
        # A cell whose window sees no job fails the smoke test; 0.3 s did once, with an
        # fsync per write on a loaded machine.
        defaults["duration"] = 0.5
    if args.durable:
        defaults.update(inflight=[128], workers=[4])
        if not args.smoke:
            defaults.update(duration=2.0, repeats=1 if args.quick else 2)
        if args.durable_jobs is None:
            args.durable_jobs = 2000 if args.smoke else 100_000
    if args.scale:
        defaults["duration"] = 2.0
    elif args.sdk and not (args.smoke or args.quick):
        defaults.update(duration=2.0, repeats=2)
    args.duration = args.duration if args.duration is not None else defaults["duration"]
    args.repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    args.inflight_list = args.inflight or defaults["inflight"]
    args.workers_list = args.workers or defaults["workers"]
    args.big_payload = args.big_payload if args.big_payload is not None else defaults["big_payload"]
    if args.warmup is None:
        args.warmup = max(0.1, min(1.0, args.duration * 0.3))
    if args.duration <= 0 or args.repeats < 1 or args.clients < 1:
        p.error("--duration, --repeats and --clients must be positive")
    if args.role == "bench":
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        bad = [s for s in systems if s not in SYSTEMS]
        if bad or not systems:
            p.error(f"--systems: unknown {bad}; choose from {','.join(SYSTEMS)}")
        args.system_list = list(dict.fromkeys(systems))
    elif args.system is None or args.port is None:
        p.error("--role worker needs --system and --port")
    return args


def mode_of(args: argparse.Namespace) -> ModuleType:
    """The mode module this run is (see modes/__init__.py): --scale, --cluster-baseline, else
    the grid."""
    if args.scale:
        return scale
    if args.sdk:
        return sdk
    if args.durable:
        return durable
    if args.cluster_baseline:
        return jetstream
    if args.cluster:
        return cluster
    return grid


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.role == "worker":
        try:
            return int(run_async(lambda: worker_main(args)))
        except asyncio.CancelledError:  # SIGTERM
            return 0
    if args.role in sdk.ROLES:
        return sdk.role_main(args)
    raise_nofile()
    report = mode_of(args).main(args)
    if report is None:
        return 1
    path = Path(args.json)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {path}")
    return 0
