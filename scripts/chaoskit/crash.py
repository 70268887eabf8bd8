"""`scripts/chaos --crash`: SIGKILL a journaled broker under load, restart it, lose nothing.

    scripts/chaos --crash [--jobs N] [--clients C] [--workers W] [--crashes K]
                          [--sync full|normal] [--seconds S] [--seed X]

A `reasonbroker serve` PROCESS with an SQLite journal (in a temp directory)
serves C SDK clients (`Client(url, resume=True)`, as asyncio tasks here) and W
worker PROCESSES (the SDK `Worker`, which reconnects). While N jobs flow
(priorities, 1..3 attempts, planned failures, short and slow handlers, about a
tenth detached), the broker is SIGKILLed K times, spread over the
submissions, and restarted on the same journal and addresses. The clients
resume (re-ATTACH what was accepted, re-send what was not); the workers
reconnect. Each worker process appends the number of every job it starts to
its own file, so re-runs (at-least-once execution after a crash) are counted.

At the end every job a client saw ACCEPTED is checked, and the figures
printed; the exit status is 0 iff every check passes:

- lost: 0. Every accepted attached job got a terminal RESULT at its client;
  every accepted detached job is ENDED in the journal, its RESULT collected
  by ATTACH (all of them) and by `reasonbroker job COOKIE` (a sample,
  through the real CLI);
- no RESULT delivered twice on any connection (counted below the SDK, per
  connection), nor twice to a client across its connections;
- every result is the job's own (OK with its value, or the planned
  PROCESSOR_EXCEPTION; BROKER_WENT_AWAY only for a job caught by more than
  `max_attempts_limit` crashes, counted);
- the broker stops cleanly at the end (SIGTERM, exit 0) and its journal holds
  no job that has not ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import structlog

from reasonbroker.core import protocol as p
from reasonbroker.sdk.client import Client, JobHandle
from reasonbroker.sdk.errors import BrokerConnectionError, JobError

RC = p.ResultCode
PIPELINE = "crash"
CHAOS = Path(__file__).resolve().parent.parent / "chaos"
ROOT = CHAOS.parent.parent
# What reasonbroker/_native.py prints when the compiled build is older than its source.
STALE_BUILD_NOTICE = "reasonbroker: the compiled modules are older than their source"


@dataclasses.dataclass
class CrashSettings:
    jobs: int = 3000
    clients: int = 4
    workers: int = 2
    capacity: int = 16  # slots per worker process
    crashes: int = 4  # broker SIGKILLs, spread over the submissions
    sync: str = "full"
    window: int = 64  # attached jobs in flight per client
    seconds: float = 180.0  # bound on the whole run
    seed: int = 1
    cli_sample: int = 8  # detached jobs also read back through `reasonbroker job`


@dataclasses.dataclass(slots=True)
class Plan:
    n: int
    ms: int
    fail: bool
    detach: bool
    max_attempts: int
    priority: int

    def variables(self) -> dict[str, Any]:
        return {"n": self.n, "ms": self.ms, "fail": self.fail}


def make_plans(settings: CrashSettings, rng: random.Random) -> list[Plan]:
    plans = []
    for n in range(settings.jobs):
        r = rng.random()
        # Mostly quick; some slow enough to be running when the broker dies.
        ms = 0 if r < 0.6 else rng.randint(1, 20) if r < 0.93 else rng.randint(100, 400)
        plans.append(
            Plan(
                n=n,
                ms=ms,
                fail=rng.random() < 0.03,
                detach=rng.random() < 0.1,
                max_attempts=rng.randint(1, 3),
                priority=rng.choice((0, 0, 0, 1, 2)),
            )
        )
    return plans


# --------------------------------------------------------------------------- the broker process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """`reasonbroker serve` with a journal, started, SIGKILLed and restarted on
    the same addresses; its JSON log lines are read (journal_opened's counts)."""

    def __init__(self, journal: Path | None, sync: str = "full") -> None:
        self.journal = journal  # None: a subclass's arguments() says what it runs on
        self.sync = sync
        self.client_url = f"tcp://127.0.0.1:{_free_port()}"
        self.worker_url = f"tcp://127.0.0.1:{_free_port()}"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts: list[dict[str, Any]] = []  # each start's journal_opened event
        self.events: Counter[str] = Counter()
        self.errors: list[str] = []
        self.log: Path | None = None  # where every line it logs is kept, if set
        self._reader: asyncio.Task[None] | None = None

    def arguments(self) -> list[str]:
        """What follows `reasonbroker serve --client URL --worker URL`."""
        assert self.journal is not None
        return ["--journal", str(self.journal), "--journal-sync", self.sync]

    def environment(self) -> dict[str, str]:
        """The broker's environment: ours without any REASONBROKER_ setting."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
        return {**env, "PYTHONUNBUFFERED": "1"}

    def ready(self, event: dict[str, Any], listening: int) -> bool:
        """Whether this log line (after `listening` "listening" lines) says it serves."""
        if event.get("event") == "journal_opened":
            self.starts.append(event)
        return listening >= 2

    async def start(self) -> float:
        """Start it; return the seconds until it listened (journal restored)."""
        began = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reasonbroker", "serve",
            "--client", self.client_url, "--worker", self.worker_url,
            *self.arguments(), "--log-format", "json",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=self.environment(), cwd=ROOT,
        )  # fmt: skip
        listening = 0
        async with asyncio.timeout(60):
            while True:
                event = await self._line()
                if event is None:
                    raise RuntimeError(f"the broker exited before listening: {self.errors}")
                listening += event.get("event") == "listening"
                if self.ready(event, listening):
                    break
        self._reader = asyncio.create_task(self._read_rest())
        return time.monotonic() - began

    async def _line(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stderr is not None
        line = await self.proc.stderr.readline()
        if not line:
            return None
        if self.log is not None:
            with self.log.open("ab") as log:
                log.write(line)
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            text = line.decode(errors="replace").rstrip()
            if not text.startswith(STALE_BUILD_NOTICE):  # benign: it runs the source
                self.errors.append(text)
            return {}
        self.events[str(event.get("event"))] += 1
        if event.get("level") in ("error", "critical"):
            self.errors.append(f"{event.get('event')}: {event}")
        return event

    async def _read_rest(self) -> None:
        while await self._line() is not None:
            pass

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    async def stop(self) -> int:
        """SIGTERM (a drain); its exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            status = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return status


# --------------------------------------------------------------------------- workers


def worker_main(url: str, capacity: int, name: str, log_path: str) -> None:
    """--role worker: the SDK Worker, reconnecting, until stdin closes."""
    from reasonbroker.sdk.worker import Worker

    def watch_stdin() -> None:  # the driver is done (or died): leave
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    # One write(2) per started job on an O_APPEND file: lines never interleave.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def crash(variables: Any) -> Any:
        os.write(fd, b"%d\n" % variables["n"])
        if variables["ms"]:
            await asyncio.sleep(variables["ms"] / 1000)
        if variables["fail"]:
            raise RuntimeError(f"planned failure of job {variables['n']}")
        return variables["n"]

    async def serve() -> None:
        worker = Worker(url, handlers={PIPELINE: crash}, capacity=capacity, name=name)
        with contextlib.suppress(BrokerConnectionError):
            await worker.run()

    asyncio.run(serve())
    os._exit(0)


class WorkerPool:
    """Worker processes (`scripts/chaos MODE --role worker`), spread over `urls` in turn
    (each serves one broker URL for its life, reconnecting to it)."""

    def __init__(
        self, urls: str | list[str], capacity: int, logs: Path, mode: str = "--crash"
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else urls
        self.capacity, self.logs, self.mode = capacity, logs, mode
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url_of: dict[str, str] = {}  # worker name -> the URL it serves

    def spawn(self, count: int) -> None:
        for i in range(count):
            name = f"{self.mode.strip('-')}-worker-{i + 1}"
            url = self.urls[i % len(self.urls)]
            cmd = [sys.executable, str(CHAOS), self.mode, "--role", "worker", "--url", url]
            cmd += ["--capacity", str(self.capacity), "--name", name]
            cmd += ["--log", str(self.logs / f"{name}.log")]
            self.url_of[name] = url
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT)
            )

    def started(self, url: str | None = None) -> int:
        """Bytes in the workers' files (of those serving `url`): grows with every job started."""
        return sum(
            log.stat().st_size
            for log in self.logs.glob("*.log")
            if url is None or self.url_of.get(log.stem) == url
        )

    def executions(self) -> Counter[int]:
        runs: Counter[int] = Counter()
        for log in self.logs.glob("*.log"):
            runs.update(int(line) for line in log.read_text().split())
        return runs

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --------------------------------------------------------------------------- clients


class CountingClient(Client):
    """The SDK client, counting each terminal RESULT per connection as it
    arrives, below the handles (which resolve once whatever comes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = 0
        self.arrivals: Counter[tuple[int, bytes]] = Counter()

    def _use(self, peer: Any) -> None:
        self.connection += 1
        super()._use(peer)

    def _dispatch(self, packet: p.Packet) -> None:
        if (
            isinstance(packet, p.Result)
            and packet.cookie is not None
            and packet.rc not in (RC.COOKIE_NOT_FOUND, RC.COOKIE_COLLISION)
        ):
            self.arrivals[(self.connection, packet.cookie)] += 1
        super()._dispatch(packet)


@dataclasses.dataclass
class Outcome:
    plan: Plan
    cookie: bytes
    rc: p.ResultCode | None = None  # None: no terminal RESULT (lost)
    value: Any = None


@dataclasses.dataclass
class Tally:
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    refused: Counter[str] = dataclasses.field(default_factory=Counter)
    submitted: int = 0
    clients: list[CountingClient] = dataclasses.field(default_factory=list)


async def _settle(handle: JobHandle, outcome: Outcome) -> None:
    try:
        outcome.value = await handle
        outcome.rc = RC.OK
    except JobError as exc:
        outcome.rc = exc.rc
    except BrokerConnectionError:
        outcome.rc = None  # the client gave up resuming: lost to it


async def client_task(
    index: int, urls: str | list[str], plans: list[Plan], window_size: int, tally: Tally
) -> None:
    client = CountingClient(urls, name=f"chaos-client-{index}", resume=True, resume_timeout=90)
    tally.clients.append(client)
    await client.connect()
    window = asyncio.Semaphore(window_size)
    waits: set[asyncio.Task[None]] = set()
    try:
        for plan in plans:
            await window.acquire()
            handle = await client.submit(
                PIPELINE,
                plan.variables(),
                detach=plan.detach,
                priority=plan.priority,
                max_attempts=plan.max_attempts,
            )
            tally.submitted += 1
            if not handle.accepted:
                window.release()
                try:
                    await handle
                except JobError as exc:
                    tally.refused[exc.rc.value] += 1
                continue
            outcome = Outcome(plan, handle.cookie.bytes)
            tally.outcomes.append(outcome)
            if plan.detach:
                window.release()
                continue
            task = asyncio.create_task(_settle(handle, outcome))
            waits.add(task)
            task.add_done_callback(lambda t: (waits.discard(t), window.release()))
        if waits:
            await asyncio.gather(*waits)
    finally:
        for task in waits:
            task.cancel()


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class CrashReport:
    settings: Any  # CrashSettings here; another mode's settings in a subclass
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    codes: Counter[str] = dataclasses.field(default_factory=Counter)

    MODE: ClassVar[str] = "chaos --crash"
    FIGURES: ClassVar[tuple[str, ...]] = (
        "submitted",
        "accepted",
        "accepted_detached",
        "refused",
        "crashes",
        "restart_s",
        "recovered_per_restart",
        "reruns_per_restart",
        "executions",
        "reruns",
        "broker_went_away",
        "cli_checked",
        "journal_bytes",
        "stop_status",
        "lost",
    )

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def header(self) -> str:
        s, f = self.settings, self.figures
        return (
            f"{self.MODE}: seed={s.seed} jobs={s.jobs} clients={s.clients} "
            f"workers={s.workers}x{s.capacity} slots, sync={s.sync}, "
            f"{f.get('crashes', 0)} SIGKILLs, {f.get('elapsed_s', 0):.1f} s"
        )

    def render(self) -> str:
        f = self.figures
        lines = [self.header()]
        for key in self.FIGURES:
            if key in f:
                lines.append(f"  {key:24} {f[key]}")
        lines.append("  result codes (accepted jobs):")
        for code, count in sorted(self.codes.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {code:26} {count}")
        lines.append("checks:")
        for name, ok, detail in self.checks:
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        lines.append(f"{self.MODE}: lost {f.get('lost', '?')}; {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


async def run_crash(settings: CrashSettings) -> CrashReport:
    report = CrashReport(settings)
    rng = random.Random(settings.seed)
    plans = make_plans(settings, rng)
    with tempfile.TemporaryDirectory(prefix="reasonbroker-crash-") as tmp:
        base = Path(tmp)
        (base / "workers").mkdir()
        broker = BrokerProcess(base / "journal.sqlite3", settings.sync)
        pool = WorkerPool(broker.worker_url, settings.capacity, base / "workers")
        try:
            await broker.start()
            pool.spawn(settings.workers)
            await _run(settings, plans, rng, broker, pool, report)
        finally:
            pool.close()
            if broker.proc is not None and broker.proc.returncode is None:
                broker.proc.kill()
                await broker.proc.wait()
    return report


async def _run(
    settings: CrashSettings,
    plans: list[Plan],
    rng: random.Random,
    broker: BrokerProcess,
    pool: WorkerPool,
    report: CrashReport,
) -> None:
    tally = Tally()
    began = time.monotonic()
    restarts: list[float] = []

    async def crasher() -> None:
        for k in range(settings.crashes):
            target = (k + 1) * settings.jobs / (settings.crashes + 1)
            started = pool.started()
            # Past its share of the submissions, and with jobs started since the
            # last restart: a crash that catches some running. Polled: the
            # workers' files are written by other processes.
            while tally.submitted < target or pool.started() == started:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await broker.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # down a moment: clients back off
            restarts.append(await broker.start())

    shares = [plans[i :: settings.clients] for i in range(settings.clients)]
    clients = [
        asyncio.create_task(client_task(i, broker.client_url, share, settings.window, tally))
        for i, share in enumerate(shares)
    ]
    crashes = asyncio.create_task(crasher())
    try:
        async with asyncio.timeout(settings.seconds):
            await asyncio.gather(*clients)
            await crashes
            detached = await collect_detached([broker.client_url], tally)
    except TimeoutError:
        report.check("finished within --seconds", False, f"{settings.seconds} s passed")
        detached = []
    finally:
        for task in [*clients, crashes]:
            task.cancel()
        await asyncio.gather(*clients, crashes, return_exceptions=True)
    elapsed = time.monotonic() - began
    cli_checked = await check_with_cli([broker.client_url], detached, settings.cli_sample, report)
    for client in tally.clients:
        await client.close()
    status = await broker.stop()
    _check(report, tally, pool, broker, status)
    f = report.figures
    f["elapsed_s"] = elapsed
    f["crashes"] = len(restarts)
    f["restart_s"] = ", ".join(f"{s:.2f}" for s in restarts)
    # The first start opened an empty journal; each later one recovered.
    f["recovered_per_restart"] = [s.get("recovered") for s in broker.starts[1:]]
    f["reruns_per_restart"] = [s.get("reruns") for s in broker.starts[1:]]
    f["cli_checked"] = cli_checked
    assert broker.journal is not None
    f["journal_bytes"] = sum(
        path.stat().st_size for path in broker.journal.parent.glob(broker.journal.name + "*")
    )


async def collect_detached(urls: list[str], tally: Tally) -> list[Outcome]:
    """ATTACH to every accepted detached job (its retained RESULT, or it when it ends),
    the i-th through the (i mod len(urls))-th broker URL."""
    detached = [o for o in tally.outcomes if o.plan.detach]
    async with contextlib.AsyncExitStack() as stack:
        collectors = [
            await stack.enter_async_context(Client(url, name=f"chaos-collector-{i}"))
            for i, url in enumerate(urls)
        ]
        handles = [
            await collectors[i % len(collectors)].attach(o.cookie) for i, o in enumerate(detached)
        ]
        for outcome, handle in zip(detached, handles, strict=True):
            await _settle(handle, outcome)
    return detached


async def check_with_cli(urls: list[str], detached: list[Outcome], sample: int, report: Any) -> int:
    """`reasonbroker job COOKIE` (its state as JSON) for a sample of the detached jobs,
    the i-th asked of the (i + 1 mod len(urls))-th broker URL (with several, another
    than the one the collector ATTACHed through)."""
    picked = detached[:sample]
    wrong = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    for i, outcome in enumerate(picked):
        cookie = str(p.cookie_str(outcome.cookie))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reasonbroker", "job", cookie,
            "--broker", urls[(i + 1) % len(urls)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        out, err = await proc.communicate()
        try:
            state = json.loads(out)
        except ValueError:
            state = {"unreadable": out.decode(errors="replace"), "stderr": err.decode()}
        want = "PROCESSOR_EXCEPTION" if outcome.plan.fail else "OK"
        if proc.returncode != 0 or state.get("state") != "ended" or state.get("rc") != want:
            wrong.append(f"{cookie}: exit {proc.returncode}, {state}")
    report.check(
        "detached jobs ENDED, read through `reasonbroker job`",
        not wrong,
        f"{len(picked) - len(wrong)} of {len(picked)} as planned"
        + (f"; e.g. {wrong[:2]}" if wrong else ""),
    )
    return len(picked)


def _check(
    report: CrashReport, tally: Tally, pool: WorkerPool, broker: BrokerProcess, status: int
) -> None:
    check_outcomes(report, tally, pool)
    report.figures["stop_status"] = status
    assert broker.journal is not None
    unended = _unended(broker.journal)
    report.check(
        "clean stop, journal holds no unended job",
        status == 0 and unended == 0 and not broker.errors,
        f"exit {status}, {unended} unended jobs in the journal, "
        f"{len(broker.errors)} error log lines"
        + (f": {broker.errors[:3]}" if broker.errors else ""),
    )


def check_outcomes(report: Any, tally: Tally, pool: WorkerPool) -> None:
    """The checks of every accepted job's end (lost, its own result, once, ran)."""
    f = report.figures
    lost = wrong = went_away = 0
    examples: list[str] = []
    runs = pool.executions()
    # The attached jobs first: a detached one is also "lost" when its collection never ran.
    for o in sorted(tally.outcomes, key=lambda o: o.plan.detach):
        if o.rc is None:
            lost += 1
            if len(examples) < 5:
                cookie = p.cookie_str(o.cookie)
                examples.append(f"job {o.plan.n} {cookie} lost, ran {runs[o.plan.n]}x ({o.plan})")
            continue
        report.codes[o.rc.value] += 1
        if o.rc is RC.BROKER_WENT_AWAY:
            went_away += 1
        elif o.rc is not (RC.PROCESSOR_EXCEPTION if o.plan.fail else RC.OK) or (
            o.rc is RC.OK and not o.plan.detach and o.value != o.plan.n
        ):
            wrong += 1
            if len(examples) < 5:
                examples.append(f"job {o.plan.n} ended {o.rc.value} value {o.value!r}")
    f["submitted"] = tally.submitted
    f["accepted"] = len(tally.outcomes)
    f["accepted_detached"] = sum(o.plan.detach for o in tally.outcomes)
    f["refused"] = dict(tally.refused)
    f["lost"] = lost
    f["broker_went_away"] = went_away
    report.check(
        "every accepted job ended (lost 0)",
        lost == 0,
        f"{len(tally.outcomes)} accepted, {lost} without a terminal RESULT"
        + (f"; e.g. {examples}" if examples else ""),
    )
    report.check(
        "each result its own job's, as planned",
        wrong == 0,
        f"{wrong} wrong codes or values; {went_away} BROKER_WENT_AWAY (caught by too many crashes)",
    )
    per_connection = sum(
        1 for n in (c.arrivals for c in tally.clients) for v in n.values() if v > 1
    )
    across: Counter[bytes] = Counter()
    for c in tally.clients:
        for (_, cookie), count in c.arrivals.items():
            across[cookie] += count
    twice = sum(1 for v in across.values() if v > 1)
    report.check(
        "no RESULT delivered twice",
        per_connection == 0 and twice == 0,
        f"{per_connection} (connection, job) pairs and {twice} jobs across a client's "
        "connections got more than one terminal RESULT",
    )
    executed = set(runs)
    f["executions"] = sum(runs.values())
    f["reruns"] = sum(runs.values()) - len(executed)
    never_ran = [o.plan.n for o in tally.outcomes if o.rc is RC.OK and o.plan.n not in executed]
    report.check(
        "every OK job ran on a worker",
        not never_ran,
        f"{len(never_ran)} OK results for jobs no worker started",
    )


def _unended(journal: Path) -> int:
    """Jobs in the journal that have not ended (read only, after the broker stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM jobs WHERE ended_at IS NULL").fetchone()
    return int(count)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    d = CrashSettings()
    parser = argparse.ArgumentParser(
        prog="scripts/chaos --crash", description=(__doc__ or "").split("\n")[0]
    )
    add = parser.add_argument
    add("--crash", action="store_true", help="this mode")
    add("--jobs", type=int, default=d.jobs, help=f"jobs to run (default {d.jobs})")
    add("--clients", type=int, default=d.clients, help=f"SDK clients (default {d.clients})")
    add("--workers", type=int, default=d.workers, help=f"worker processes ({d.workers})")
    add("--capacity", type=int, default=d.capacity, help=f"slots per worker ({d.capacity})")
    add("--crashes", type=int, default=d.crashes, help=f"broker SIGKILLs ({d.crashes})")
    add("--sync", choices=("full", "normal"), default=d.sync, help="[journal] sync (full)")
    add("--window", type=int, default=d.window, help=f"jobs in flight per client ({d.window})")
    add("--seconds", type=float, default=d.seconds, help=f"bound on the run ({d.seconds})")
    add("--seed", type=int, default=d.seed)
    add("--role", choices=("driver", "worker"), default="driver", help=argparse.SUPPRESS)
    add("--url", help=argparse.SUPPRESS)
    add("--name", default="crash-worker", help=argparse.SUPPRESS)
    add("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker_main(args.url, args.capacity, args.name, args.log)
        return 0
    settings = CrashSettings(
        jobs=args.jobs,
        clients=args.clients,
        workers=args.workers,
        capacity=args.capacity,
        crashes=args.crashes,
        sync=args.sync,
        window=args.window,
        seconds=args.seconds,
        seed=args.seed,
    )
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    report = asyncio.run(run_crash(settings))
    print(report.render())
    return 0 if report.ok else 1
