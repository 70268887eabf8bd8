"""`scripts/chaos --cluster`: SIGKILL a cluster node and a nats-server under load, lose nothing.

    scripts/chaos --cluster [--jobs N] [--clients C] [--workers W] [--capacity S]
                            [--node-kills K] [--nats-kills K] [--ack-wait S]
                            [--seconds S] [--seed X]

Run from the repository root (it imports tests/natscluster.py), on loopback only.
It starts a 3-server NATS cluster with JetStream (tests/natscluster.py, the
cluster extra's nats-server) and 3 reasonbroker node PROCESSES
(`reasonbroker serve --client tcp://.. --worker tcp://.. --cluster URLS --node
nK`, with REASONBROKER_CLUSTER_REPLICAS=3 and a short ack_wait, and no other
REASONBROKER_ variable). C SDK clients (`Client([every node's client URL],
resume=True)`, the list rotated so each starts on another node; asyncio tasks
here) submit N jobs (1..3 attempts, planned failures, short and slow handlers,
about a tenth detached) to W SDK worker PROCESSES spread over the nodes, each
serving one node's worker URL and reconnecting to it (the SDK Worker takes one
URL). While the jobs flow:

- a reasonbroker node is SIGKILLed (K times, spread over the submissions, each
  while its workers run jobs) and restarted on the same addresses and name: its
  clients resume on another node and re-ATTACH, its workers reconnect, the jobs
  it was running are given to another node by JetStream after ack_wait;
- a nats-server is SIGKILLed (the job stream's leader when the monitoring port
  names it) and restarted on its ports and store (NatsCluster.kill/restart).

Each worker process appends the number of every job it starts to its own file,
so re-runs (a job run again after its node died) are counted. At the end every
job a client saw ACCEPTED is checked, the figures printed, and the exit status
is 0 iff every check passes:

- lost: 0. Every accepted attached job got a terminal RESULT at its client;
  every accepted detached job's RESULT is collected by ATTACH (the i-th on node
  i mod 3, so mostly not the node that accepted it) and, for a sample, by
  `reasonbroker job COOKIE` asked of yet another node (the real CLI);
- no RESULT delivered twice on any connection, nor to a client across its
  connections;
- every result is the job's own (OK with its value, or the planned
  PROCESSOR_EXCEPTION; BROKER_WENT_AWAY counted);
- the job stream drains (no job left un-acked) while the nodes run, each node
  stops cleanly on SIGTERM (exit 0), and no node logged an error other than
  those a lost nats-server causes (publishes retried: counted and printed).

The shared parts (plans, clients counting RESULTs per connection, worker
processes, the detached collection, the outcome checks, the report) are
scripts/chaoskit/crash.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import structlog

from chaoskit import crash
from chaoskit.crash import ROOT, BrokerProcess, Plan, Tally, WorkerPool

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Error lines a node logs, as it should, while a nats-server is down (publishes
# retried under the same ids; a result it could not write is left un-acked, so the
# job runs again after ack_wait): counted, not failures.
NATS_LOSS_ERRORS = frozenset(
    {"cluster_publish_failing", "journal_failing", "cluster_result_unwritten"}
)


@dataclasses.dataclass
class ClusterSettings:
    jobs: int = 3000
    clients: int = 4
    workers: int = 3  # worker processes, spread over the nodes
    capacity: int = 16  # slots per worker process
    nodes: int = 3
    node_kills: int = 1  # reasonbroker node SIGKILLs (then restarted)
    nats_kills: int = 1  # nats-server SIGKILLs (then restarted)
    nats_down_s: float = 2.0  # how long a killed nats-server stays down
    ack_wait_s: float = 3.0
    window: int = 48  # attached jobs in flight per client
    seconds: float = 300.0  # bound on the whole run
    seed: int = 1
    cli_sample: int = 8  # detached jobs also read back through `reasonbroker job`
    collect_s: float = 60.0  # bound on collecting the detached jobs' results
    drain_s: float = 60.0  # bound on the stream draining after the last result
    keep: Path | None = None  # keep the nodes' and workers' logs here (else a temp dir)


class NodeProcess(BrokerProcess):
    """`reasonbroker serve --cluster` (one node), started, SIGKILLed and restarted on the
    same addresses under the same name; its JSON log lines are read."""

    def __init__(self, name: str, nats_urls: list[str], settings: ClusterSettings) -> None:
        super().__init__(None)
        self.name = name
        self.nats_urls = nats_urls
        self.settings = settings

    def arguments(self) -> list[str]:
        return ["--cluster", ",".join(self.nats_urls), "--node", self.name]

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "REASONBROKER_CLUSTER_REPLICAS": "3",
            "REASONBROKER_CLUSTER_ACK_WAIT_S": f"{self.settings.ack_wait_s:g}",
        }

    def ready(self, event: dict[str, Any], listening: int) -> bool:
        if event.get("event") == "cluster_joined":
            self.starts.append(event)
            return True
        return False

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if e.split(":", 1)[0] not in NATS_LOSS_ERRORS]


@dataclasses.dataclass
class ClusterReport(crash.CrashReport):
    MODE: ClassVar[str] = "chaos --cluster"
    FIGURES: ClassVar[tuple[str, ...]] = (
        "submitted",
        "accepted",
        "accepted_detached",
        "refused",
        "node_kills",
        "node_restart_s",
        "nats_kills",
        "nats_restart_s",
        "executions",
        "reruns",
        "broker_went_away",
        "cli_checked",
        "nats_loss_errors",
        "stream_left",
        "stop_status",
        "lost_in_bucket",
        "clients_on",
        "lost",
    )

    def header(self) -> str:
        s, f = self.settings, self.figures
        return (
            f"{self.MODE}: seed={s.seed} jobs={s.jobs} clients={s.clients} "
            f"workers={s.workers}x{s.capacity} slots on {s.nodes} nodes, 3 nats-servers "
            f"(replicas 3), ack_wait {s.ack_wait_s:g} s, {f.get('node_kills', 0)} node and "
            f"{f.get('nats_kills', 0)} nats-server SIGKILLs, {f.get('elapsed_s', 0):.1f} s"
        )


# --------------------------------------------------------------------------- NATS


def _stream_leader(nats: Any, stream: str) -> int | None:
    """The index of the server leading `stream`, as the monitoring port says (or None)."""
    from tests.natscluster import http_json

    names = {node.name: i for i, node in enumerate(nats.nodes)}
    for node in nats.nodes:
        if not node.running:
            continue
        jsz = http_json(node.http_port, "/jsz?accounts=true&streams=true") or {}
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if leader in names:
                        return names[leader]
    return None


async def _stream_left(nats_urls: list[str]) -> tuple[int, int, int]:
    """(messages in the job stream, their consumers' pending + un-acked) right now."""
    import nats

    from reasonbroker.cluster.wire import Names

    names = Names("rb")
    nc = await nats.connect(servers=nats_urls, connect_timeout=5, max_reconnect_attempts=2)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(names.stream)
        pending = unacked = 0
        for consumer in await js.consumers_info(names.stream):
            pending += consumer.num_pending or 0
            unacked += consumer.num_ack_pending or 0
        return int(info.state.messages), pending, unacked
    finally:
        await nc.close()


async def _bucket_says(nats_urls: list[str], cookies: list[bytes]) -> list[str]:
    """What the results bucket holds for each of these jobs (to tell, of a lost job,
    whether it ended in the cluster and its RESULT did not reach the client)."""
    import nats
    import nats.js.errors

    from reasonbroker.cluster.wire import Names, Outcome, key

    nc = await nats.connect(servers=nats_urls, connect_timeout=5, max_reconnect_attempts=2)
    said = []
    try:
        kv = await nc.jetstream(timeout=5).key_value(Names("rb").results)
        for cookie in cookies:
            try:
                entry = await kv.get(key(cookie), validate_keys=False)
            except nats.js.errors.KeyNotFoundError:
                said.append(f"{key(cookie)}: not in the bucket")
                continue
            o = Outcome.decode(entry.value)
            said.append(f"{key(cookie)}: {o.rc} written by {o.node} at {o.ended_at:.3f}")
    finally:
        await nc.close()
    return said


# --------------------------------------------------------------------------- the run


async def run_cluster(settings: ClusterSettings) -> ClusterReport:
    from tests.natscluster import NatsCluster

    report = ClusterReport(settings)
    rng = random.Random(settings.seed)
    plans = crash.make_plans(settings, rng)  # type: ignore[arg-type]  # it reads .jobs
    with (
        tempfile.TemporaryDirectory(prefix="reasonbroker-cluster-chaos-") as tmp,
        NatsCluster(size=3) as nats,
    ):
        base = Path(tmp) if settings.keep is None else settings.keep
        (base / "workers").mkdir(parents=True)
        urls = list(nats.urls)
        nodes = [NodeProcess(f"n{k + 1}", urls, settings) for k in range(settings.nodes)]
        for node in nodes:
            node.log = base / f"{node.name}.log"
        pool = WorkerPool(
            [n.worker_url for n in nodes], settings.capacity, base / "workers", "--cluster"
        )
        try:
            for node in nodes:
                await node.start()
            pool.spawn(settings.workers)
            await _run(settings, plans, rng, nats, nodes, pool, report)
        finally:
            pool.close()
            for node in nodes:
                if node.proc is not None and node.proc.returncode is None:
                    node.proc.kill()
                    await node.proc.wait()
    return report


async def _run(
    settings: ClusterSettings,
    plans: list[Plan],
    rng: random.Random,
    nats: Any,
    nodes: list[NodeProcess],
    pool: WorkerPool,
    report: ClusterReport,
) -> None:
    from reasonbroker.cluster.wire import Names

    tally = Tally()
    began = time.monotonic()
    node_restarts: list[str] = []
    nats_restarts: list[str] = []
    # The kills, alternating (a node first), spread over the submissions.
    order = _alternate(settings.node_kills, settings.nats_kills)

    async def chaos() -> None:
        for k, kind in enumerate(order):
            target = (k + 1) * settings.jobs / (len(order) + 1)
            if kind == "node":
                node = nodes[k % len(nodes)]
                started = pool.started(node.worker_url)
                # Past its share of the submissions, with jobs started on this node's
                # workers since: a kill that catches some running. Polled: the workers'
                # files are written by other processes.
                while (  # noqa: ASYNC110
                    tally.submitted < target or pool.started(node.worker_url) == started
                ):
                    await asyncio.sleep(0.005)
                await node.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.5))  # down a moment: clients move on
                node_restarts.append(f"{node.name} {await node.start():.2f}")
            else:
                while tally.submitted < target:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                leader = _stream_leader(nats, Names("rb").stream)
                index = rng.randrange(len(nats.nodes)) if leader is None else leader
                await asyncio.to_thread(nats.kill, index)
                await asyncio.sleep(settings.nats_down_s)
                t0 = time.monotonic()
                await asyncio.to_thread(nats.restart, index)
                what = "stream leader " if leader is not None else ""
                nats_restarts.append(f"{what}{nats.nodes[index].name} {time.monotonic() - t0:.2f}")

    client_urls = [n.client_url for n in nodes]
    shares = [plans[i :: settings.clients] for i in range(settings.clients)]
    clients = [
        asyncio.create_task(
            crash.client_task(i, _rotated(client_urls, i), share, settings.window, tally)
        )
        for i, share in enumerate(shares)
    ]
    killing = asyncio.create_task(chaos())
    try:
        async with asyncio.timeout(settings.seconds):
            await asyncio.gather(*clients)
            await killing
    except TimeoutError:
        report.check("finished within --seconds", False, f"{settings.seconds} s passed")
    finally:
        for task in [*clients, killing]:
            task.cancel()
        await asyncio.gather(*clients, killing, return_exceptions=True)
    elapsed = time.monotonic() - began
    detached: list[crash.Outcome] = []
    try:
        async with asyncio.timeout(settings.collect_s):
            detached = await crash.collect_detached(client_urls, tally)
    except TimeoutError:
        report.check(
            "detached jobs collected within collect_s", False, f"{settings.collect_s} s passed"
        )
    cli_checked = await crash.check_with_cli(client_urls, detached, settings.cli_sample, report)
    for client in tally.clients:
        await client.close()
    lost = [o for o in tally.outcomes if o.rc is None]
    if lost:
        try:
            said = await _bucket_says(list(nats.urls), [o.cookie for o in lost[:5]])
        except Exception as exc:
            said = [f"the bucket could not be read: {exc}"]
        report.figures["lost_in_bucket"] = said
        report.figures["clients_on"] = [c.url for c in tally.clients]
    left = await _drained(nats, settings.drain_s)
    statuses = [await node.stop() for node in nodes]
    crash.check_outcomes(report, tally, pool)
    f = report.figures
    f["elapsed_s"] = elapsed
    f["node_kills"] = len(node_restarts)
    f["node_restart_s"] = ", ".join(node_restarts)
    f["nats_kills"] = len(nats_restarts)
    f["nats_restart_s"] = ", ".join(nats_restarts)
    f["cli_checked"] = cli_checked
    f["stream_left"] = "messages {}, pending {}, un-acked {}".format(*left)
    f["stop_status"] = statuses
    loss_errors: Counter[str] = Counter()
    unexpected: list[str] = []
    for node in nodes:
        for line in node.errors:
            event = line.split(":", 1)[0]
            if event in NATS_LOSS_ERRORS:
                loss_errors[event] += 1
        unexpected += [f"{node.name}: {e}" for e in node.unexpected_errors()]
    f["nats_loss_errors"] = dict(loss_errors)
    report.check(
        "the job stream drained",
        left == (0, 0, 0),
        f"{left[0]} jobs left in the stream, {left[1]} pending, {left[2]} un-acked",
    )
    report.check(
        "clean stops, no unexpected error",
        all(s == 0 for s in statuses) and not unexpected,
        f"exit {statuses}, {len(unexpected)} error log lines"
        + (f": {unexpected[:3]}" if unexpected else ""),
    )


async def _drained(nats: Any, bound_s: float) -> tuple[int, int, int]:
    """Poll (the stream's acks are applied through its log: no event) until no job is
    left in the stream, or bound_s passed; what was left last."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            left = await _stream_left(list(nats.urls))
        except Exception:  # an election in progress: ask again
            left = (-1, -1, -1)
        if left == (0, 0, 0) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)


def _alternate(node_kills: int, nats_kills: int) -> list[str]:
    """node, nats, node, nats, ... then the rest of whichever has more."""
    order: list[str] = []
    for k in range(max(node_kills, nats_kills)):
        if k < node_kills:
            order.append("node")
        if k < nats_kills:
            order.append("nats")
    return order


def _rotated(urls: list[str], i: int) -> list[str]:
    k = i % len(urls)
    return urls[k:] + urls[:k]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    d = ClusterSettings()
    parser = argparse.ArgumentParser(
        prog="scripts/chaos --cluster", description=(__doc__ or "").split("\n")[0]
    )
    add = parser.add_argument
    add("--cluster", action="store_true", help="this mode")
    add("--jobs", type=int, default=d.jobs, help=f"jobs to run (default {d.jobs})")
    add("--clients", type=int, default=d.clients, help=f"SDK clients (default {d.clients})")
    add("--workers", type=int, default=d.workers, help=f"worker processes ({d.workers})")
    add("--capacity", type=int, default=d.capacity, help=f"slots per worker ({d.capacity})")
    add("--node-kills", type=int, default=d.node_kills, help=f"node SIGKILLs ({d.node_kills})")
    add("--nats-kills", type=int, default=d.nats_kills, help=f"nats SIGKILLs ({d.nats_kills})")
    add("--ack-wait", type=float, default=d.ack_wait_s, help=f"ack_wait_s ({d.ack_wait_s:g})")
    add("--window", type=int, default=d.window, help=f"jobs in flight per client ({d.window})")
    add("--seconds", type=float, default=d.seconds, help=f"bound on the run ({d.seconds})")
    add("--seed", type=int, default=d.seed)
    add("--keep", type=Path, help="keep the nodes' logs and the workers' files in this new dir")
    add("--role", choices=("driver", "worker"), default="driver", help=argparse.SUPPRESS)
    add("--url", help=argparse.SUPPRESS)
    add("--name", default="cluster-worker", help=argparse.SUPPRESS)
    add("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        crash.worker_main(args.url, args.capacity, args.name, args.log)
        return 0
    try:
        import nats  # noqa: F401

        from tests.natscluster import find_server

        find_server()
    except Exception as exc:  # ImportError, ServerNotFound
        print(f"scripts/chaos --cluster: cannot run: {exc}", file=sys.stderr)
        return 2
    settings = ClusterSettings(
        jobs=args.jobs,
        clients=args.clients,
        workers=args.workers,
        capacity=args.capacity,
        node_kills=args.node_kills,
        nats_kills=args.nats_kills,
        ack_wait_s=args.ack_wait,
        window=args.window,
        seconds=args.seconds,
        seed=args.seed,
        keep=args.keep,
    )
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the finally blocks clean up
    report = asyncio.run(run_cluster(settings))
    print(report.render())
    return 0 if report.ok else 1
