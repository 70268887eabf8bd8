"""The daemon as users start it: `python -m reasonbroker serve`, a real job, then SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import reasonbroker
from reasonbroker.core.protocol import Result, ResultCode, Run, new_cookie
from tests.rawpeer import WAIT_S, RawPeer, hello_worker


async def _start() -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reasonbroker", "serve",
        "--client", "tcp://127.0.0.1:0", "--worker", "tcp://127.0.0.1:0",
        "--log-format", "json",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    urls: dict[str, str] = {}
    async with asyncio.timeout(WAIT_S):
        while len(urls) < 2:
            line = await proc.stderr.readline()
            assert line, "the daemon exited before listening"
            event = json.loads(line)
            if event["event"] == "starting":
                # The same environment picks the same build as this test's.
                assert event["compiled"] is reasonbroker.COMPILED
            if event["event"] == "listening":
                urls[event["role"]] = event["url"]
    return proc, urls


async def _events_until_exit(proc: asyncio.subprocess.Process) -> list[str]:
    assert proc.stderr is not None
    events = []
    async with asyncio.timeout(WAIT_S):
        async for line in proc.stderr:
            events.append(json.loads(line)["event"])
        await proc.wait()
    return events


async def test_daemon_serves_a_job_then_exits_0_on_sigterm() -> None:
    proc, urls = await _start()
    try:
        worker = await hello_worker(urls["workers"])
        client = await RawPeer.connect(urls["clients"])
        cookie = new_cookie()
        client.send(Run(cookie, "echo", {"x": 1}))
        run = await worker.recv_type(Run)
        worker.send(Result(run.cookie, ResultCode.OK, result=run.variables))
        res = await client.recv_type(Result)
        assert (res.cookie, res.rc, res.result) == (cookie, ResultCode.OK, {"x": 1})
        proc.send_signal(signal.SIGTERM)
        events = await _events_until_exit(proc)
        assert proc.returncode == 0
        assert "shutdown_complete" in events
        assert await client.closed_by_peer()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_second_signal_forces_exit_during_drain() -> None:
    proc, urls = await _start()
    try:
        worker = await hello_worker(urls["workers"])
        client = await RawPeer.connect(urls["clients"])
        cookie = new_cookie()
        client.send(Run(cookie, "echo", "never answered"))
        await worker.recv_type(Run)
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        async with asyncio.timeout(WAIT_S):
            while json.loads(await proc.stderr.readline())["event"] != "shutdown_draining":
                pass
        proc.send_signal(signal.SIGINT)
        await _events_until_exit(proc)
        assert proc.returncode == 0
        res = await client.recv_type(Result)
        assert (res.cookie, res.rc) == (cookie, ResultCode.BROKER_WENT_AWAY)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
