"""The load generator, one for every system: `Gen` counts and times every job over the
client connections (closed loop: each answer sends the next job); a `Cell` says what to
run, a `Run` holds what one measured window gave (jobs/s, p50/p99 at the client, CPU per
job of broker, workers and generator, broker peak RSS). `run_closed` keeps K jobs in
flight; `run_open` sends at a fixed rate and times each job from its scheduled send, so a
stalled broker cannot hide its stall (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .adapters import make_client
from .adapters.base import Client
from .common import HOST, make_payload, perf
from .processes import Broker, WorkerPool
from .procfs import cpu_seconds, cpu_times, reset_peak_rss, status_kib


class Gen:
    """Counts and times jobs for every client connection; refills in closed loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.refill = True  # closed loop: each answer sends the next job
        self.stopping = False
        self.measuring = False
        self.outstanding = 0
        self.done = 0
        self.errors = 0
        self.overflow = 0
        self.lat: list[float] = []
        # Open loop: every (scheduled time, latency), so the jobs *scheduled* in the window
        # are judged whenever they finish, the slow stragglers included.
        self.record_all = False
        self.samples: list[tuple[float, float]] = []
        self.window = (0.0, 0.0)
        self.failure: str | None = None
        self.drained: asyncio.Future[None] = loop.create_future()

    def completed(self, conn: Client, stamps: list[float], errors: int) -> None:
        now = perf()
        n = len(stamps)
        self.outstanding -= n
        if self.measuring:
            self.done += n
            self.errors += errors
            lat = self.lat
            for s in stamps:
                lat.append(now - s)
        elif errors:
            self.errors += errors
        if self.record_all:
            samples = self.samples
            for s in stamps:
                samples.append((s, now - s))
        if self.refill and not self.stopping:
            if n:
                conn.send([now] * n)
                self.outstanding += n
        elif self.stopping and self.outstanding <= 0 and not self.drained.done():
            self.drained.set_result(None)

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        if not self.drained.done():
            self.drained.set_result(None)

    def start_window(self) -> float:
        self.done = 0
        self.errors = 0
        self.lat = []
        self.measuring = True
        return perf()

    def end_window(self) -> float:
        self.measuring = False
        return perf()

    async def drain(self, wait_s: float) -> int:
        """Stop sending; wait for what is in flight. Returns how many never came back."""
        self.stopping = True
        if self.outstanding <= 0:
            return 0
        if not self.drained.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.drained), wait_s)
        return max(self.outstanding, 0)


@dataclass(frozen=True)
class Cell:
    mode: str  # "closed" or "open"
    inflight: int  # K, closed loop; 0 for open loop
    workers: int
    payload: int

    @property
    def id(self) -> str:
        size = f"{self.payload // 1024}KiB" if self.payload >= 1024 else f"{self.payload}B"
        if self.mode == "open":
            return f"open-w{self.workers}-{size}"
        return f"closed-k{self.inflight}-w{self.workers}-{size}"

    def label(self, rate: float | None = None) -> str:
        size = f"{self.payload // 1024}KiB" if self.payload >= 1024 else f"{self.payload}B"
        if self.mode == "open":
            r = f"{rate / 1000:.1f}k/s" if rate else "?"
            return f"open {r} W={self.workers} {size}"
        return f"closed K={self.inflight} W={self.workers} {size}"


@dataclass
class Run:
    jobs_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    broker_cpu_us_per_job: float = 0.0
    broker_user_us_per_job: float = 0.0
    broker_sys_us_per_job: float = 0.0
    broker_peak_rss_kib: int = 0
    worker_cpu_us_per_job: float = 0.0
    gen_cpu_us_per_job: float = 0.0
    jobs: int = 0
    errors: int = 0
    unanswered: int = 0
    overflow: int = 0
    seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


async def open_clients(
    system: str, broker: Broker, count: int, gen: Gen, payload: bytes, hello: bool = False
) -> list[Client]:
    loop = gen.loop
    conns: list[Client] = []
    try:
        for _ in range(count):
            proto = make_client(system, gen, payload, hello)
            await loop.create_connection(lambda p=proto: p, HOST, broker.client_port)
            conns.append(proto)
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in conns)), 20)
    except BaseException:
        close_clients(conns)
        raise
    return conns


def close_clients(conns: Sequence[Client]) -> None:
    for c in conns:
        c.close()


async def measure(
    gen: Gen,
    broker: Broker,
    workers: WorkerPool | None,
    warmup: float,
    duration: float,
) -> Run:
    """Warm up, then one measured window: jobs, latencies, CPU of broker, workers, generator."""
    await asyncio.sleep(warmup)
    if gen.failure:
        return Run(error=gen.failure)
    reset_peak_rss(broker.pid)
    wpids = workers.pids if workers else []
    bu0, bs0 = cpu_times(broker.pid)
    w0 = sum(cpu_seconds(p) for p in wpids)
    g0 = time.process_time()
    t0 = gen.start_window()
    await asyncio.sleep(duration)
    t1 = gen.end_window()
    gen.window = (t0, t1)
    g1 = time.process_time()
    bu1, bs1 = cpu_times(broker.pid)
    w1 = sum(cpu_seconds(p) for p in wpids)
    run = Run(
        broker_peak_rss_kib=status_kib(broker.pid, "VmHWM") or status_kib(broker.pid, "VmRSS")
    )
    jobs = gen.done
    lat = sorted(gen.lat)
    run.seconds = t1 - t0
    run.jobs = jobs
    run.errors = gen.errors
    run.jobs_per_s = jobs / run.seconds if run.seconds > 0 else 0.0
    run.p50_us = percentile(lat, 0.50) * 1e6
    run.p99_us = percentile(lat, 0.99) * 1e6
    if jobs:
        run.broker_cpu_us_per_job = (bu1 - bu0 + bs1 - bs0) / jobs * 1e6
        run.broker_user_us_per_job = (bu1 - bu0) / jobs * 1e6
        run.broker_sys_us_per_job = (bs1 - bs0) / jobs * 1e6
        run.worker_cpu_us_per_job = (w1 - w0) / jobs * 1e6
        run.gen_cpu_us_per_job = (g1 - g0) / jobs * 1e6
    if gen.failure:
        run.error = gen.failure
    return run


async def run_closed(
    system: str, broker: Broker, workers: WorkerPool, cell: Cell, args: argparse.Namespace
) -> Run:
    loop = asyncio.get_running_loop()
    gen = Gen(loop)
    payload = make_payload(cell.payload)
    conns = await open_clients(system, broker, min(cell.inflight, args.clients), gen, payload)
    try:
        now = perf()
        per, extra = divmod(cell.inflight, len(conns))
        for i, c in enumerate(conns):
            k = per + (1 if i < extra else 0)
            if k:
                c.send([now] * k)
                gen.outstanding += k
        run = await measure(gen, broker, workers, args.warmup, args.duration)
        run.unanswered = await gen.drain(10.0)
        run.extra["clients"] = len(conns)
    finally:
        close_clients(conns)
    return run


async def run_open(
    system: str,
    broker: Broker,
    workers: WorkerPool,
    cell: Cell,
    rate: float,
    args: argparse.Namespace,
) -> Run:
    """Fixed-rate arrivals; each job is timed from its scheduled send time.

    The send timer ticks about once a millisecond; every job due by then goes out in that
    tick, still stamped with its own schedule (so timer lateness counts against latency,
    equally for every system). In-flight jobs are bounded by --open-max-inflight: beyond
    it arrivals are counted as overflow and not sent (the system is saturated).
    """
    loop = asyncio.get_running_loop()
    gen = Gen(loop)
    gen.refill = False
    gen.record_all = True
    payload = make_payload(cell.payload)
    conns = await open_clients(system, broker, args.clients, gen, payload)
    nconn = len(conns)
    total = int(rate * (args.warmup + args.duration + 0.05))
    start = perf() + 0.002
    state = {"next": 0}
    finished: asyncio.Future[None] = loop.create_future()
    limit = args.open_max_inflight

    def tick() -> None:
        if finished.done():
            return
        now = perf()
        i = state["next"]
        due = min(total, int((now - start) * rate) + 1)
        if due > i:
            if gen.outstanding + (due - i) > limit:
                gen.overflow += due - i
            else:
                batches: list[list[float]] = [[] for _ in range(nconn)]
                for j in range(i, due):
                    batches[j % nconn].append(start + j / rate)
                for c, b in zip(conns, batches, strict=True):
                    if b:
                        c.send(b)
                gen.outstanding += due - i
            state["next"] = i = due
        if i >= total or gen.failure:
            finished.set_result(None)
            return
        delay = start + i / rate - perf()
        loop.call_later(max(delay, 0.001), tick)

    try:
        loop.call_later(0.002, tick)
        run = await measure(gen, broker, workers, args.warmup, args.duration)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished, 5.0)
        if not finished.done():
            finished.set_result(None)
        run.unanswered = await gen.drain(10.0)
        t0, t1 = gen.window
        lat = sorted(latency for s, latency in gen.samples if t0 <= s < t1)
        run.p50_us = percentile(lat, 0.50) * 1e6
        run.p99_us = percentile(lat, 0.99) * 1e6
        run.overflow = gen.overflow
        run.extra["clients"] = nconn
        run.extra["rate"] = rate
    finally:
        close_clients(conns)
    return run
