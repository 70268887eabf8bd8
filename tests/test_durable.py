"""Durable jobs through a real broker and a real SQLite journal (docs/durability.md).

The crash test SIGKILLs a `reasonbroker serve` process, restarts it on the
same journal and counts what was lost (0). The others run the broker in
process on loopback with a journal file in a temp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.packets import (
    Accepted,
    Attach,
    Hello,
    Job,
    JobState,
    Packet,
    Ping,
    Pong,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.daemon.store.base import Accepted as StoreAccepted
from reasonbroker.daemon.store.base import OnCommit, OnTrouble, Recovered
from reasonbroker.daemon.store.memory import MemoryStore
from reasonbroker.daemon.store.sqlite import SqliteStore
from tests.rawpeer import WAIT_S, RawPeer

FEATURES = ("accepted", "attach")


def _config(tmp: Path, **limits: object) -> Config:
    return Config(
        listeners=(ListenerConfig(f"unix://{tmp / 'rb.sock'}", ListenerRole.BOTH),),
        limits=Limits(**limits),  # type: ignore[arg-type]
        journal_path=str(tmp / "journal.sqlite3"),
    )


@contextlib.asynccontextmanager
async def _broker(tmp: Path, **limits: object) -> AsyncIterator[Broker]:
    async with Broker(_config(tmp, **limits)) as broker:
        yield broker


async def _client(url: str) -> RawPeer:
    c = await RawPeer.connect(url)
    c.send(Hello(role=Role.CLIENT, features=FEATURES))
    assert isinstance(await c.recv(), Hello)
    return c


async def _worker(url: str, capacity: int) -> RawPeer:
    w = await RawPeer.connect(url)
    w.send(Hello(role=Role.WORKER))
    assert isinstance(await w.recv(), Hello)
    w.send(Register(capacity))
    return w


def _rows(path: Path) -> list[tuple[bytes, int]]:
    """(cookie, state) of every row, read by another connection, as a restarted broker would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(bytes(c), s) for c, s in db.execute("SELECT cookie, state FROM jobs")]


async def test_accepted_comes_only_after_the_job_is_committed(tmp_path: Path) -> None:
    async with _broker(tmp_path) as broker:
        c = await _client(broker.address("client"))
        cookie = new_cookie()
        c.send(Run(cookie, "nobody-serves-this-yet", {"n": 1}))
        assert await c.recv() == Accepted(cookie)  # waits for a worker, not NO_CAPACITY
        assert (cookie, 0) in _rows(tmp_path / "journal.sqlite3")
        await c.close()


class _GatedStore(MemoryStore):
    """A durable store whose commits happen only when the test says so (a slow disk,
    a JetStream stream electing its leader)."""

    durable = True

    def __init__(self) -> None:
        self.recorded = 0
        self.on_commit: OnCommit | None = None
        self.flushed = asyncio.Event()

    def open(self, now: float, on_commit: OnCommit, on_trouble: OnTrouble) -> Recovered:
        self.on_commit = on_commit
        return super().open(now, on_commit, on_trouble)

    def accept(self, job: StoreAccepted) -> None:
        self.recorded += 1

    def mark(self) -> int:
        return self.recorded

    def flush(self) -> None:
        if self.recorded:
            self.flushed.set()

    def commit(self) -> None:
        assert self.on_commit is not None
        self.on_commit(self.recorded)


async def test_pong_is_not_held_behind_a_commit_that_has_not_happened(tmp_path: Path) -> None:
    store = _GatedStore()
    config = _config(tmp_path)
    async with Broker(config, store=store) as broker:
        c = await _client(broker.address("client"))
        cookie = new_cookie()
        c.send(Run(cookie, "nobody-serves-this", None))
        async with asyncio.timeout(WAIT_S):
            await store.flushed.wait()
        # ACCEPTED is held for the commit, and so is every later job packet to this
        # client; a PING is still answered at once, so the client knows we live.
        c.send(Ping())
        assert await c.recv() == Pong()
        store.commit()
        assert await c.recv() == Accepted(cookie)
        await c.close()


async def test_many_runs_in_one_read_are_one_transaction(tmp_path: Path) -> None:
    async with _broker(tmp_path) as broker:
        store = broker.store
        assert isinstance(store, SqliteStore)
        c = await _client(broker.address("client"))
        before = store.transactions
        cookies = [new_cookie() for _ in range(200)]
        c.send(*(Run(k, "p", i) for i, k in enumerate(cookies)))
        got = {(await c.recv_type(Accepted)).cookie for _ in cookies}
        assert got == set(cookies)
        # One read of the 200 frames is one turn, one batch, one transaction;
        # the socket may split the write, so allow a read or two more.
        assert store.transactions - before <= 3
        assert store.rows_committed >= 200
        await c.close()


async def test_a_polite_stop_keeps_queued_running_and_ended_jobs(tmp_path: Path) -> None:
    running, queued, ended = new_cookie(), new_cookie(), new_cookie()
    async with _broker(tmp_path, drain_timeout_s=0.05) as broker:
        serving = asyncio.ensure_future(broker.serve())
        url = broker.address("client")
        c = await _client(url)
        w = await _worker(url, 1)
        c.send(Run(ended, "p", "e", detach=True))
        assert await c.recv() == Accepted(ended)
        run = await w.recv_type(Run)
        w.send(Result(run.cookie, ResultCode.OK, result="done-before"))
        c.send(Run(running, "p", "r", max_attempts=1), Run(queued, "p", "q"))
        await c.recv_type(Accepted)
        await c.recv_type(Accepted)
        assert (await w.recv_type(Run)).variables == "r"  # held by the worker: running
        # SIGTERM with the job still running past drain_timeout_s, its client connected.
        broker.shutdown()
        await serving
        assert await c.closed_by_peer()  # closed without a RESULT: it resumes later
        await w.close()
    async with _broker(tmp_path) as broker:
        assert (broker.board.stats.recovered, broker.board.stats.reruns) == (2, 0)
        url = broker.address("client")
        c = await _client(url)
        c.send(Attach(ended))
        res = await c.recv_type(Result)
        assert (res.cookie, res.rc, res.result) == (ended, ResultCode.OK, "done-before")
        c.send(Attach(running), Attach(queued))
        w = await _worker(url, 2)
        runs = [await w.recv_type(Run), await w.recv_type(Run)]
        assert [r.variables for r in runs] == ["r", "q"]  # arrival order kept
        for r in runs:
            w.send(Result(r.cookie, ResultCode.OK, result=f"{r.variables}!"))
        got = {(x.cookie, x.result) for x in [await c.recv_type(Result) for _ in runs]}
        assert got == {(running, "r!"), (queued, "q!")}
        # The interrupted run did not spend the job's one attempt.
        c.send(Attach(running, wait=False))
        job = await c.recv_type(Job)
        assert (job.state, job.attempts, job.rc) == (JobState.ENDED, 1, ResultCode.OK)
        await w.close()
        await c.close()


async def test_a_deadline_that_passed_while_down_ends_timeout(tmp_path: Path) -> None:
    cookie = new_cookie()
    async with _broker(tmp_path) as broker:
        c = await _client(broker.address("client"))
        c.send(Run(cookie, "p", None, detach=True, timeout_ms=50))
        assert await c.recv() == Accepted(cookie)
        await c.close()
        broker.store.flush()
    # The broker was down longer than the deadline: wait on the wall clock.
    start = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - start < 0.1:  # noqa: ASYNC110 - the clock itself
        await asyncio.sleep(0.02)
    async with _broker(tmp_path) as broker:
        c = await _client(broker.address("client"))
        c.send(Attach(cookie))
        res = await c.recv_type(Result)
        assert res.rc is ResultCode.TIMEOUT
        await c.close()


async def test_a_full_disk_refuses_new_runs_keeps_accepted_ones_and_recovers(
    tmp_path: Path,
) -> None:
    async with _broker(tmp_path) as broker:
        store = broker.store
        assert isinstance(store, SqliteStore)
        url = broker.address("client")
        first = await _client(url)
        second = await _client(url)
        await store.set_max_page_count(1)  # SQLITE_FULL from the next write on
        pending = new_cookie()
        first.send(Run(pending, "p", "x" * 10_000))
        async with asyncio.timeout(WAIT_S):
            while broker.board.journal_trouble is None:  # noqa: ASYNC110 - the writer thread's
                await asyncio.sleep(0.01)
        refused = new_cookie()
        second.send(Run(refused, "p", "y"))
        res = await second.recv_type(Result)
        assert (res.cookie, res.rc) == (refused, ResultCode.NO_CAPACITY)
        assert "journal" in (res.error or "")
        await store.set_max_page_count(None)
        assert await first.recv() == Accepted(pending)  # committed at last, never lost
        assert broker.board.journal_trouble is None
        again = new_cookie()
        second.send(Run(again, "p", "z"))
        assert await second.recv() == Accepted(again)
        await first.close()
        await second.close()


# --------------------------------------------------------------------------- crash


async def _serve(journal: Path, sock: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reasonbroker", "serve",
        "--both", f"unix://{sock}", "--journal", str(journal), "--log-format", "json",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(WAIT_S * 2):
        while True:
            line = await proc.stderr.readline()
            assert line, "the daemon exited before listening"
            if json.loads(line)["event"] == "listening":
                break
    return proc


async def _drain_stderr(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    while await proc.stderr.read(65536):
        pass


async def test_sigkill_loses_no_accepted_job(tmp_path: Path) -> None:
    journal, sock = tmp_path / "j.sqlite3", tmp_path / "rb.sock"
    proc = await _serve(journal, sock)
    drain = asyncio.ensure_future(_drain_stderr(proc))
    try:
        c = await _client(f"unix://{sock}")
        cookies = [new_cookie() for _ in range(300)]
        c.send(*(Run(k, "crash", i, detach=True) for i, k in enumerate(cookies)))
        accepted = {(await c.recv_type(Accepted)).cookie for _ in cookies}
        assert accepted == set(cookies)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        drain.cancel()
    assert proc.returncode == -signal.SIGKILL
    proc = await _serve(journal, sock)
    drain = asyncio.ensure_future(_drain_stderr(proc))
    try:
        url = f"unix://{sock}"
        w = await _worker(url, 64)
        for _ in cookies:
            run = await w.recv_type(Run)
            w.send(Result(run.cookie, ResultCode.OK, result=run.variables))
        c = await _client(url)
        ends: list[Packet] = []
        for k in cookies:
            c.send(Attach(k, wait=False))
            ends.append(await c.recv_type(Job))
        done = [j for j in ends if isinstance(j, Job) and j.state is JobState.ENDED]
        lost = len(cookies) - len(done)
        print(f"crash test: {len(cookies)} accepted, SIGKILL, restart: {lost} lost")
        assert lost == 0
        assert all(isinstance(j, Job) and j.rc is ResultCode.OK for j in done)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        drain.cancel()


async def test_a_journal_that_is_not_one_stops_serve_with_exit_2_naming_it(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "not-a-journal"
    bad.write_bytes(b"this is not SQLite" * 100)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reasonbroker", "serve",
        "--both", f"unix://{tmp_path / 's'}", "--journal", str(bad),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S * 2):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    lines = [x for x in err.decode().splitlines() if x.startswith("reasonbroker:")]
    assert len(lines) == 1 and str(bad) in lines[0], err
    assert bad.read_bytes() == b"this is not SQLite" * 100  # untouched


@pytest.mark.parametrize("var", ["XDG_STATE_HOME"])
async def test_serve_keeps_a_journal_at_the_default_path(tmp_path: Path, var: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REASONBROKER_JOURNAL_PATH"}
    env[var] = str(tmp_path / "state")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reasonbroker", "serve",
        "--both", f"unix://{tmp_path / 's'}", "--log-format", "json",
        stderr=asyncio.subprocess.PIPE, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    opened = None
    try:
        async with asyncio.timeout(WAIT_S * 2):
            while True:
                line = await proc.stderr.readline()
                assert line, "the daemon exited before listening"
                event = json.loads(line)
                if event["event"] == "journal_opened":
                    opened = event
                if event["event"] == "listening":
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    expected = tmp_path / "state" / "reasonbroker" / "journal.sqlite3"
    assert opened is not None and opened["path"] == str(expected)
    assert expected.exists()
