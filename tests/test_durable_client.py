"""The SDK's side of durable jobs (PROTOCOL.md section 7) through a real broker on loopback.

submit waits for ACCEPTED, attach and job look a job up by its cookie, and a
client with `resume=True` survives its broker going away. The re-sent RUN
(lost before ACCEPTED) is driven against the fake broker of
test_client_worker, which lets the test choose each answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Accepted,
    Attach,
    Cancel,
    Hello,
    Job,
    JobState,
    Ping,
    Pong,
    Result,
    ResultCode,
    Run,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client, JobInfo, cookie_bytes
from reasonbroker.sdk.errors import (
    BrokerConnectionError,
    BrokerWentAway,
    Cancelled,
    CookieNotFound,
    NoCapacity,
    ResumeTimeout,
)
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S
from tests.test_client_worker import FakeBroker

pytestmark = pytest.mark.timeout(30)


def config(
    client_url: str = "tcp://127.0.0.1:0",
    worker_url: str = "tcp://127.0.0.1:0",
    journal: Path | None = None,
    **limits: Any,
) -> Config:
    """A loopback broker's config; `journal` turns on the journal (when the broker has one)."""
    cfg = Config(
        listeners=(
            ListenerConfig(client_url, ListenerRole.CLIENTS),
            ListenerConfig(worker_url, ListenerRole.WORKERS),
        ),
        limits=Limits(cancel_grace_ms=1000, **limits),
    )
    if journal is not None:
        cfg = dataclasses.replace(cfg, journal_path=str(journal))
    return cfg


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(config()) as b:
        yield b


async def registered(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await worker.wait_registered(timeout=WAIT_S)
    return task


async def stop(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    async with asyncio.timeout(WAIT_S):
        await task


# -- submit waits for ACCEPTED ----------------------------------------------------


async def test_submit_returns_once_accepted_before_any_result(broker: Broker) -> None:
    gate = Gate()
    w = Worker(broker.address("worker"), handlers={"hold": gate})
    serving = await registered(w)
    async with Client(broker.address("client")) as client:
        assert "accepted" in client.broker_hello.features
        handle = await client.submit("hold", {"n": 1})
        # The worker still holds the job: no RESULT can have come, yet the
        # broker has said ACCEPTED.
        assert handle.accepted
        assert not handle.done()
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
        assert not handle.done()
        gate.release.set()
        async with asyncio.timeout(WAIT_S):
            assert await handle == {"n": 1}
    await stop(w, serving)


async def test_refused_submit_resolves_with_no_capacity_not_accepted() -> None:
    async with Broker(config(queue_limit=0)) as b, Client(b.address("client")) as client:
        handle = await client.submit("nobody", 1)  # no worker, no queue
        assert not handle.accepted
        assert handle.done()  # already resolved when submit returned
        with pytest.raises(NoCapacity):
            await handle
        detached = await client.submit("nobody", 2, detach=True)
        assert not detached.accepted
        with pytest.raises(NoCapacity):
            await detached
        assert client.in_flight == 0


async def test_detached_submit_resolves_to_none_once_accepted(broker: Broker) -> None:
    gate = Gate()
    w = Worker(broker.address("worker"), handlers={"hold": gate})
    serving = await registered(w)
    async with Client(broker.address("client")) as client:
        handle = await client.submit("hold", 3, detach=True)
        assert handle.accepted
        assert await handle is None
        assert client.in_flight == 0
    gate.release.set()
    await stop(w, serving)


# -- attach and job -----------------------------------------------------------------


async def test_attach_to_a_live_job_both_clients_get_the_result(broker: Broker) -> None:
    gate = Gate()
    w = Worker(broker.address("worker"), handlers={"hold": gate})
    serving = await registered(w)
    async with (
        Client(broker.address("client")) as first,
        Client(broker.address("client")) as second,
    ):
        handle = await first.submit("hold", "both")
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
        attached = await second.attach(str(handle.cookie))
        assert attached.cookie == handle.cookie
        assert attached.pipeline == "hold"
        assert attached.accepted
        assert await second.attach(handle.cookie) is attached  # one handle per job
        gate.release.set()
        async with asyncio.timeout(WAIT_S):
            assert await handle == "both"
            assert await attached == "both"
        assert first.in_flight == second.in_flight == 0
    await stop(w, serving)


async def test_attach_to_an_ended_detached_job_gets_the_retained_result(broker: Broker) -> None:
    w = Worker(broker.address("worker"), handlers={"echo": echo})
    serving = await registered(w)
    async with Client(broker.address("client")) as client:
        handle = await client.submit("echo", {"kept": True}, detach=True)
        assert handle.accepted
        async with Client(broker.address("client")) as watcher, asyncio.timeout(WAIT_S):
            # The RESULT reaches only an attached client: this one says when it ended.
            assert await (await watcher.attach(handle.cookie)) == {"kept": True}
        assert (await client.job(handle.cookie)).state is JobState.ENDED
    async with Client(broker.address("client")) as later:
        attached = await later.attach(handle.cookie.bytes)
        async with asyncio.timeout(WAIT_S):
            assert await attached == {"kept": True}
    await stop(w, serving)


async def test_attach_from_the_connection_that_submitted_a_live_detached_job(
    broker: Broker,
) -> None:
    gate = Gate()
    w = Worker(broker.address("worker"), handlers={"hold": gate})
    serving = await registered(w)
    try:
        async with (
            Client(broker.address("client")) as client,
            Client(broker.address("client")) as witness,
        ):
            handle = await client.submit("hold", "mine", detach=True)
            async with asyncio.timeout(WAIT_S):
                await gate.entered.wait()
            attached = await client.attach(handle.cookie)
            watched = await witness.attach(handle.cookie)
            gate.release.set()
            async with asyncio.timeout(WAIT_S):
                assert await watched == "mine"
                # The broker answers every client of the job in one turn, and
                # this JOB comes after any RESULT on the same connection.
                assert (await client.job(handle.cookie)).state is JobState.ENDED
            assert attached.done()
            assert await attached == "mine"
    finally:
        gate.release.set()
        await stop(w, serving)


async def test_attach_and_job_to_an_unknown_cookie_raise(broker: Broker) -> None:
    cookie = uuid.uuid4()
    async with Client(broker.address("client")) as client:
        with pytest.raises(CookieNotFound) as info:
            await client.attach(cookie)
        assert info.value.cookie == cookie
        with pytest.raises(CookieNotFound):
            await client.job(str(cookie))
        assert client.in_flight == 0
        with pytest.raises(ValueError, match="not a UUID"):
            await client.job("not-a-cookie")


async def test_job_says_queued_running_and_ended(broker: Broker) -> None:
    gate = Gate()
    async with Client(broker.address("client")) as client:
        # One slot: the first job runs, the second queues behind it.
        w = Worker(broker.address("worker"), handlers={"hold": gate}, capacity=1)
        serving = await registered(w)
        running = await client.submit("hold", "a")
        queued = await client.submit("hold", "b")
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
        info = await client.job(running.cookie)
        assert info == JobInfo(running.cookie, JobState.RUNNING, "hold", 1)
        assert (await client.job(queued.cookie)).state is JobState.QUEUED
        detached = await client.submit("hold", "c", detach=True)
        gate.release.set()
        async with asyncio.timeout(WAIT_S):
            assert [await running, await queued] == ["a", "b"]
            async with Client(broker.address("client")) as watcher:
                assert await (await watcher.attach(detached.cookie)) == "c"
        ended = await client.job(detached.cookie)
        assert ended.state is JobState.ENDED
        assert ended.rc is ResultCode.OK
        assert ended.as_dict() == {
            "cookie": str(detached.cookie),
            "state": "ended",
            "pipeline": "hold",
            "attempts": 1,
            "rc": "OK",
            "error": None,
        }
        await stop(w, serving)


def test_cookie_bytes_takes_uuid_str_and_bytes() -> None:
    u = uuid.uuid4()
    assert cookie_bytes(u) == cookie_bytes(str(u)) == cookie_bytes(u.bytes) == u.bytes
    with pytest.raises(ValueError, match="16 bytes"):
        cookie_bytes(b"short")


# -- resume -----------------------------------------------------------------------


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
async def test_resume_after_the_broker_restarts_on_the_same_port(
    journal: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker dies with a job a worker holds; a new one starts on the same ports.

    Without a journal the new broker never heard of the job: the re-ATTACH is
    answered COOKIE_NOT_FOUND, which the handle raises. With one (flip the
    parameter's config) it runs again and the handle resolves with its result.
    Either way: exactly once, and the client goes on working.
    """
    caplog.set_level(logging.INFO, logger="reasonbroker.client")
    path = tmp_path / "journal.sqlite" if journal else None
    gate = Gate()
    first = Broker(config(journal=path))
    await first.__aenter__()
    try:
        client_url, worker_url = first.address("client"), first.address("worker")
        w1 = Worker(worker_url, handlers={"job": gate})
        serving1 = await registered(w1)
        client = Client([client_url], resume=True, resume_timeout=WAIT_S)
        await client.connect()
        handle = await client.submit("job", "survives?")
        assert handle.accepted
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
    finally:
        await first.__aexit__(None, None, None)  # abrupt: every stream aborted, no drain
    await stop(w1, serving1)
    assert not handle.done()  # still waiting: the client is resuming

    async with Broker(config(client_url, worker_url, journal=path)) as second:
        w2 = Worker(worker_url, handlers={"job": echo})
        serving2 = await registered(w2)
        async with asyncio.timeout(WAIT_S):
            if journal:
                assert await handle == "survives?"
            else:
                with pytest.raises(CookieNotFound) as info:
                    await handle
                assert info.value.cookie == handle.cookie
        assert client.url == client_url
        assert client.in_flight == 0
        assert second.board.stats.attached + second.board.stats.collected <= 1
        # The same client, on the new broker, still works.
        async with asyncio.timeout(WAIT_S):
            assert await client.run("job", "after") == "after"
        await client.close()
        await stop(w2, serving2)
    # One line per state change of the connection, none per job.
    # (The library's records carry the structlog event dict as `msg`.)
    logged: list[dict[str, Any]] = [
        r.msg for r in caplog.records if r.name == "reasonbroker.client" and isinstance(r.msg, dict)
    ]
    assert [e["event"] for e in logged] == ["client_connected", "client_resuming", "client_resumed"]
    assert (logged[2]["reattached"], logged[2]["resent"]) == (1, 0)


async def test_a_run_client_is_sent_no_accepted_and_submit_still_waits_for_it(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feature `ack` (docs/protocol.md): run() asks for no ACCEPTED, so the broker
    sends none (a decode and a wake-up per job saved); submit() still gets its own."""
    seen: list[type] = []
    dispatch = Client._dispatch

    def recording(self: Client, packet: Any) -> None:
        seen.append(type(packet))
        dispatch(self, packet)

    monkeypatch.setattr(Client, "_dispatch", recording)
    w = Worker(broker.address("worker"), handlers={"job": echo}, capacity=4)
    serving = await registered(w)
    try:
        async with Client(broker.address("client")) as client:
            assert "ack" in client.broker_hello.features
            async with asyncio.timeout(WAIT_S):
                assert await asyncio.gather(*(client.run("job", i) for i in range(20))) == list(
                    range(20)
                )
                assert seen == [Result] * 20
                handle = await client.submit("job", "s")
                assert handle.accepted
                assert await handle == "s"
            assert seen[20:] == [Accepted, Result]
    finally:
        await stop(w, serving)


async def test_a_resuming_clients_run_asks_for_accepted_and_is_reattached() -> None:
    """A run() on a resuming client still asks for ACCEPTED (RUN `ack`): once it
    came, a lost connection re-ATTACHes the job instead of re-sending it, as
    before feature `ack`. A run() on a client that does not resume asks for none."""
    fake = FakeBroker(
        route=False,
        hello_answer=Hello(version="fake-2", features=("accepted", "ack", "attach")),
    )
    await fake.start()
    client = Client(fake.url, resume=True, resume_timeout=WAIT_S)
    plain = Client(fake.url)
    try:
        await client.connect()
        await plain.connect()
        running = asyncio.create_task(client.run("job", "r"))
        plain_running = asyncio.create_task(plain.run("job", "p"))
        async with asyncio.timeout(WAIT_S):
            await fake.wait_for(lambda: len(fake.seen(Run)) == 2)
            runs = fake.seen(Run)
            by_value = {run.variables: run for run in runs}
            run, plain_run = by_value["r"], by_value["p"]
            assert run.ack and not plain_run.ack
            first = next(c for c in fake.conns if fake.seen_on(Run, c) == [run])
            first.send(Accepted(run.cookie))
            first.send(Ping())  # its PONG says the ACCEPTED before it was read
            await fake.wait_for(lambda: fake.seen_on(Pong, first))
            assert client._jobs[run.cookie].accepted
            first.drop()  # lost after ACCEPTED
            await fake.wait_for(lambda: len(fake.conns) == 3)
            now = fake.conns[-1]
            [attach] = await fake.wait_for(lambda: fake.seen_on(Attach, now))
            assert attach == Attach(run.cookie, True)
            assert fake.seen_on(Run, now) == []  # never re-sent
            now.send(Result(run.cookie, ResultCode.OK, result="r"))
            assert await running == "r"
            other = next(c for c in fake.conns if fake.seen_on(Run, c) == [plain_run])
            other.send(Result(plain_run.cookie, ResultCode.OK, result="p"))
            assert await plain_running == "p"
    finally:
        await client.close()
        await plain.close()
        await fake.close()


async def test_resume_gives_up_after_resume_timeout_with_resume_timeout() -> None:
    gate = Gate()
    b = Broker(config())
    await b.__aenter__()
    try:
        w = Worker(b.address("worker"), handlers={"job": gate})
        serving = await registered(w)
        client = Client(b.address("client"), resume=True, resume_timeout=0.3)
        await client.connect()
        handle = await client.submit("job", 1)
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
    finally:
        await b.__aexit__(None, None, None)
    await stop(w, serving)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ResumeTimeout) as info:
            await handle
    assert isinstance(info.value, BrokerConnectionError)
    await client.close()


async def test_without_resume_pending_jobs_fail_on_loss() -> None:
    gate = Gate()
    b = Broker(config())
    await b.__aenter__()
    try:
        w = Worker(b.address("worker"), handlers={"job": gate})
        serving = await registered(w)
        client = Client(b.address("client"))
        await client.connect()
        handle = await client.submit("job", 1)
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
    finally:
        await b.__aexit__(None, None, None)
    await stop(w, serving)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerWentAway) as info:
            await handle
    assert not isinstance(info.value, ResumeTimeout)
    await client.close()


async def test_a_run_lost_before_accepted_is_resent_and_collision_means_attach() -> None:
    """PROTOCOL.md section 7: until ACCEPTED, resend the same RUN; COOKIE_COLLISION
    says the first one made it, so the client ATTACHes instead."""
    fake = FakeBroker(
        route=False,
        hello_answer=Hello(version="fake-1", features=("accepted", "attach"), heartbeat_ms=None),
    )
    await fake.start()
    client = Client(fake.url, resume=True, resume_timeout=WAIT_S)
    try:
        await client.connect()
        submitting = asyncio.create_task(client.submit("job", {"x": 1}))
        async with asyncio.timeout(WAIT_S):
            [run] = await fake.wait_for(lambda: fake.seen(Run))
            fake.conns[0].drop()  # the connection is lost before ACCEPTED
            await fake.wait_for(lambda: len(fake.seen(Run)) == 2)
            runs = fake.seen(Run)
            assert runs[1] == run  # the same RUN, same cookie
            assert not submitting.done()
            now = fake.conns[-1]
            now.send(Result(run.cookie, ResultCode.COOKIE_COLLISION, "cookie is already in use"))
            [attach] = await fake.wait_for(lambda: fake.seen_on(Attach, now))
            assert attach == Attach(run.cookie, True)
            handle = await submitting
            assert handle.accepted
            assert not handle.done()
            now.send(Result(run.cookie, ResultCode.OK, result={"x": 1}))
            assert await handle == {"x": 1}
        assert client.in_flight == 0
    finally:
        await client.close()
        await fake.close()


# -- the README's durable-jobs example is real code -----------------------------------


def _readme_durable_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Durable jobs: accepted, attach, job, resume", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its durable-jobs example"
    return match.group(1)


async def test_readme_durable_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _readme_durable_example()

    async def shout(variables: Any) -> Any:
        return {"text": variables["text"].upper()}

    # The broker's log lines are captured, so stdout is the example's alone.
    with structlog.testing.capture_logs():
        async with Broker(config()) as b:
            w = Worker(b.address("worker"), handlers={"shout": shout})
            serving = await registered(w)
            code = code.replace("tcp://10.0.0.1:51500", b.address("client"))
            body = "".join(f"    {line}\n" for line in code.splitlines())
            namespace: dict[str, Any] = {}
            exec(f"async def main():\n{body}", namespace)
            async with asyncio.timeout(WAIT_S):
                await namespace["main"]()
            await stop(w, serving)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].split()[0] in ("queued", "running", "ended")
    assert out[1] == "{'text': 'LATER'}"


async def test_a_resuming_client_asks_again_and_cancels_after_reconnecting() -> None:
    """A job() question and a cancel() made while the connection is down are
    sent once the client is back, after the job's ATTACH."""
    fake = FakeBroker(
        route=False,
        hello_answer=Hello(version="fake-1", features=("accepted", "attach"), heartbeat_ms=None),
    )
    await fake.start()
    client = Client(fake.url, resume=True, resume_timeout=WAIT_S)
    try:
        await client.connect()
        submitting = asyncio.create_task(client.submit("job", 1))
        async with asyncio.timeout(WAIT_S):
            [run] = await fake.wait_for(lambda: fake.seen(Run))
            first = fake.conns[0]
            first.send(Accepted(run.cookie))
            handle = await submitting
            assert handle.accepted
            asking = asyncio.create_task(client.job(run.cookie))
            await fake.wait_for(lambda: fake.seen_on(Attach, first))
            first.drop()
            await first.closed.wait()
            await handle.cancel()  # while down: sent after the reconnect
            await fake.wait_for(
                lambda: len(fake.conns) == 2 and fake.seen_on(Cancel, fake.conns[1])
            )
            now = fake.conns[1]
            sent = [pkt for c, pkt in fake.received if c is now and not isinstance(pkt, Hello)]
            assert sent == [Attach(run.cookie, True), Cancel(run.cookie), Attach(run.cookie, False)]
            now.send(Job(run.cookie, JobState.RUNNING, "job", 1))
            info = await asking
            assert info.state is JobState.RUNNING
            now.send(Result(run.cookie, ResultCode.CANCELLED, "cancelled by client"))
            with pytest.raises(Cancelled) as cancelled:
                await handle
            assert cancelled.value.by == "client"
        assert client.in_flight == 0
    finally:
        await client.close()
        await fake.close()
