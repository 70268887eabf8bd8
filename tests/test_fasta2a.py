"""reasonbroker.integrations.fasta2a with the real fasta2a, end to end on loopback.

A reasonbroker Broker (in-process), the example's A2A app
(examples/fasta2a_workers/server.py) under uvicorn in this process, and the
example's fasta2a worker (agent.py) in subprocesses, all sharing one SQLite
storage file; requests go over HTTP as an A2A client sends them. Each wait is
for an event (an SSE event, a registration, a task state), polled where no
event announces it, and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fasta2a", reason="fasta2a is not installed: pip install -e '.[fasta2a]'")
pytest.importorskip("httpx", reason="httpx is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="uvicorn is not installed: pip install -e '.[test]'")

import httpx
import uvicorn

from examples.fasta2a_workers.agent import PIPELINE, ShoutWorker
from examples.fasta2a_workers.server import make_app
from examples.fasta2a_workers.storage import SQLiteStorage
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.integrations.fasta2a import ReasonbrokerWorkerBroker, task_cookie
from reasonbroker.sdk import Client
from tests import fasta2a_worker_proc
from tests.worker_proc import kill_all

pytestmark = pytest.mark.timeout(90)

# Worker processes start a Python interpreter and import pydantic: slow on a loaded machine.
PROC_WAIT_S = 45.0
WAIT_S = 30.0
# A worker this slow is still on its first word when the test acts on it.
STUCK_S = 600.0


async def until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.01)


@dataclass
class Stack:
    broker: Broker
    http: httpx.AsyncClient
    storage: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, delay: float = 0.01) -> subprocess.Popen[bytes]:
        proc = fasta2a_worker_proc.spawn(
            self.broker.address("worker"), self.storage, name, delay=delay
        )
        self.procs.append(proc)
        return proc

    async def registered(self, count: int) -> None:
        await until(lambda: len(self.broker.board.workers()) == count, PROC_WAIT_S)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        response = await self.http.post("/", json=_request(method, params))
        response.raise_for_status()
        body = response.json()
        assert "error" not in body, body
        return body["result"]

    async def task(self, task_id: str) -> Any:
        return await self.call("tasks/get", {"id": task_id})

    async def task_state(self, task_id: str, state: str) -> Any:
        """Poll tasks/get until the task is in `state` (message/send has no event to wait on)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                task = await self.task(task_id)
                if task["status"]["state"] == state:
                    return task
                await asyncio.sleep(0.02)


def _request(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": method, "params": params}


def _message(text: str, **metadata: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "user",
        "parts": [{"text": text}],
        "messageId": str(uuid.uuid4()),
    }
    return {"message": message, **({"metadata": metadata} if metadata else {})}


def summary(event: dict[str, Any]) -> tuple[Any, ...]:
    """One SSE event's result, short: ("task", state), ("status", state) or
    ("artifact", text, append)."""
    result = event["result"]
    if "task" in result:
        return ("task", result["task"]["status"]["state"])
    if "statusUpdate" in result:
        return ("status", result["statusUpdate"]["status"]["state"])
    update = result["artifactUpdate"]
    return ("artifact", update["artifact"]["parts"][0]["text"], update.get("append", False))


class Stream:
    """A message/stream request's SSE events, read as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()
        self.events: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any] | None:
        """The next event, or None when the stream has ended."""
        async with asyncio.timeout(WAIT_S):
            async for line in self._lines:
                if line.startswith("data: "):
                    event: dict[str, Any] = json.loads(line[len("data: ") :])
                    self.events.append(event)
                    return event
        return None

    async def until(self, wanted: tuple[Any, ...]) -> None:
        while True:
            event = await self.next()
            assert event is not None, f"the stream ended before {wanted}: {self.summaries}"
            if summary(event) == wanted:
                return

    async def rest(self) -> list[tuple[Any, ...]]:
        while await self.next() is not None:
            pass
        return self.summaries

    @property
    def summaries(self) -> list[tuple[Any, ...]]:
        return [summary(event) for event in self.events]

    @property
    def task_id(self) -> str:
        task_id: str = self.events[0]["result"]["task"]["id"]
        return task_id


@contextlib.asynccontextmanager
async def stream(stack: Stack, text: str, **metadata: Any) -> AsyncIterator[Stream]:
    request = _request("message/stream", _message(text, **metadata))
    async with stack.http.stream("POST", "/", json=request) as response:
        response.raise_for_status()
        yield Stream(response)


def _config(
    client_url: str = "tcp://127.0.0.1:0",
    worker_url: str = "tcp://127.0.0.1:0",
    journal: Path | None = None,
) -> Config:
    config = Config(
        listeners=(
            ListenerConfig(client_url, ListenerRole.CLIENTS),
            ListenerConfig(worker_url, ListenerRole.WORKERS),
        ),
        limits=Limits(),
    )
    if journal is not None:
        config = dataclasses.replace(config, journal_path=str(journal))
    return config


@contextlib.asynccontextmanager
async def a2a_app(
    client_url: str, storage: Path, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The example's A2A app under uvicorn on a free port, and an HTTP client for it."""
    app = make_app(client_url, str(storage), **options)
    # Bound and listening before uvicorn starts: a request waits in the
    # backlog until the app (and its broker connection) is up.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http:
            yield http
    finally:
        server.should_exit = True
        await asyncio.wait([serving], timeout=WAIT_S)
        sock.close()


@contextlib.asynccontextmanager
async def a2a_stack(
    tmp_path: Path,
    *,
    max_attempts: int = 2,
    timeout: float | None = None,  # noqa: ASYNC109
) -> AsyncIterator[Stack]:
    storage = tmp_path / "a2a.sqlite3"
    async with Broker(_config()) as broker:
        options = {"max_attempts": max_attempts, "timeout": timeout}
        async with a2a_app(broker.address("client"), storage, **options) as http:
            stack = Stack(broker, http, storage)
            try:
                yield stack
            finally:
                kill_all(stack.procs)


async def test_message_send_completes_with_the_workers_artifact(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path) as stack:
        stack.spawn("w1")
        stack.spawn("w2")
        await stack.registered(2)
        submitted = await stack.call("message/send", _message("hello remote world"))
        task_id = submitted["task"]["id"]
        assert submitted["task"]["status"]["state"] == "submitted"
        task = await stack.task_state(task_id, "completed")
        [artifact] = task["artifacts"]
        assert artifact["parts"] == [{"text": "HELLO REMOTE WORLD"}]
        assert artifact["metadata"]["worker"] in ("w1", "w2")
        await until(lambda: stack.broker.board.live_jobs == 0)
        assert stack.broker.board.stats.completed["OK"] == 1


async def test_message_stream_relays_the_workers_events_in_order(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path) as stack:
        stack.spawn("w1")
        await stack.registered(1)
        async with stream(stack, "one two three four") as events:
            assert await events.rest() == [
                ("task", "submitted"),
                ("status", "working"),
                ("artifact", "ONE ", True),
                ("artifact", "TWO ", True),
                ("artifact", "THREE ", True),
                ("artifact", "FOUR", True),
                ("artifact", "ONE TWO THREE FOUR", False),
                ("status", "completed"),
            ]
            task = await stack.task(events.task_id)
        assert task["status"]["state"] == "completed"


async def test_tasks_cancel_stops_a_running_task(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path) as stack:
        stack.spawn("w1")
        await stack.registered(1)
        async with stream(stack, "never finished", delay=STUCK_S) as events:
            await events.until(("status", "working"))  # its run_task is running
            assert stack.broker.board.running == 1
            # The job is the task's: its cookie is made from the task id.
            async with Client(stack.broker.address("client")) as client:
                info = await client.job(task_cookie(events.task_id))
            assert (info.state.value, info.pipeline, info.attempts) == ("running", "shout", 1)
            cancelled = await stack.call("tasks/cancel", {"id": events.task_id})
            # cancel_task waited for the job's end: the answer is the ended task.
            assert cancelled["status"]["state"] == "canceled"
            assert await events.rest() == [
                ("task", "submitted"),
                ("status", "working"),
                ("status", "canceled"),
            ]
        task = await stack.task(events.task_id)
        assert task["status"]["state"] == "canceled"
        assert "artifacts" not in task
        stats = stack.broker.board.stats
        await until(lambda: stack.broker.board.live_jobs == 0)
        assert stats.completed["CANCELLED"] == 1
        # The worker's slot is free again: the next task runs there.
        submitted = await stack.call("message/send", _message("after the cancel"))
        done = await stack.task_state(submitted["task"]["id"], "completed")
        assert done["artifacts"][0]["parts"] == [{"text": "AFTER THE CANCEL"}]


async def test_a_killed_workers_task_is_finished_by_another(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path, max_attempts=2) as stack:
        doomed = stack.spawn("doomed", delay=STUCK_S)
        await stack.registered(1)
        async with stream(stack, "survive the kill") as events:
            await events.until(("status", "working"))  # running on the doomed worker
            stack.spawn("rescuer")
            await stack.registered(2)
            doomed.send_signal(signal.SIGKILL)
            rest = await events.rest()
        assert doomed.wait(timeout=WAIT_S) == -signal.SIGKILL
        # The second attempt, on the rescuer, streams on the same request.
        assert rest == [
            ("task", "submitted"),
            ("status", "working"),
            ("status", "working"),
            ("artifact", "SURVIVE ", True),
            ("artifact", "THE ", True),
            ("artifact", "KILL", True),
            ("artifact", "SURVIVE THE KILL", False),
            ("status", "completed"),
        ]
        task = await stack.task(events.task_id)
        assert task["status"]["state"] == "completed"
        [artifact] = task["artifacts"]
        assert artifact["metadata"]["worker"] == "rescuer"
        stats = stack.broker.board.stats
        assert stats.requeued == 1
        await until(lambda: stack.broker.board.live_jobs == 0)
        assert stats.completed["OK"] == 1


async def test_one_worker_process_runs_capacity_tasks_and_a_queued_task_cancels(
    tmp_path: Path,
) -> None:
    async with a2a_stack(tmp_path) as stack:
        stack.spawn("w1")  # capacity 2
        await stack.registered(1)
        [conn] = stack.broker.board.workers()
        async with (
            stream(stack, "first stuck", delay=STUCK_S) as first,
            stream(stack, "second stuck", delay=STUCK_S) as second,
        ):
            await first.until(("status", "working"))
            await second.until(("status", "working"))
            assert stack.broker.board.slots(conn) == (2, 2)  # both in the one process
            # A third waits in the broker's queue; cancelling it never reaches a worker.
            queued = await stack.call("message/send", _message("third waits"))
            await until(lambda: stack.broker.board.queue_depth == 1)
            third = await stack.call("tasks/cancel", {"id": queued["task"]["id"]})
            assert third["status"]["state"] == "canceled"
            for events in (first, second):
                cancelled = await stack.call("tasks/cancel", {"id": events.task_id})
                assert cancelled["status"]["state"] == "canceled"
                assert (await events.rest())[-1] == ("status", "canceled")
        await until(lambda: stack.broker.board.live_jobs == 0)
        assert stack.broker.board.slots(conn) == (2, 0)
        assert stack.broker.board.stats.completed["CANCELLED"] == 3


async def test_a_task_past_its_deadline_ends_canceled(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path, timeout=1.0) as stack:
        stack.spawn("w1")
        await stack.registered(1)
        async with stream(stack, "too slow", delay=STUCK_S) as events:
            rest = await events.rest()
        # TIMEOUT: the server marks the task canceled, and the broker cancels it
        # on its worker, whose cancel_task records the same (whichever is first).
        assert rest == [("task", "submitted"), ("status", "working"), ("status", "canceled")]
        task = await stack.task(events.task_id)
        assert task["status"]["state"] == "canceled"
        said = [part["text"] for message in task["history"] for part in message["parts"]]
        # The server's word on why, if it wrote first.
        assert said[0] == "too slow" and len(said) <= 2
        assert all(text.startswith("reasonbroker: TIMEOUT") for text in said[1:]), said
        await until(lambda: stack.broker.board.live_jobs == 0)
        assert stack.broker.board.stats.completed["TIMEOUT"] == 1


async def test_a_task_no_worker_serves_ends_failed(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path) as stack:
        async with stream(stack, "nobody home") as events:
            assert await events.rest() == [("task", "submitted"), ("status", "failed")]
        task = await stack.task(events.task_id)
        assert task["status"]["state"] == "failed"
        said = task["history"][-1]["parts"][0]["text"]
        assert said.startswith("reasonbroker: NO_CAPACITY"), said


async def test_sigterm_lets_a_workers_running_task_finish(tmp_path: Path) -> None:
    async with a2a_stack(tmp_path) as stack:
        worker = stack.spawn("w1", delay=0.2)
        await stack.registered(1)
        async with stream(stack, "finish this first") as events:
            await events.until(("status", "working"))
            worker.send_signal(signal.SIGTERM)  # drain: no new tasks, this one finishes
            rest = await events.rest()
        assert rest[-2:] == [
            ("artifact", "FINISH THIS FIRST", False),
            ("status", "completed"),
        ]
        assert await asyncio.to_thread(worker.wait, WAIT_S) == 0
        await until(lambda: not stack.broker.board.workers())
        assert stack.broker.board.stats.completed["OK"] == 1


async def test_with_the_journal_a_task_outlives_a_broker_restart(tmp_path: Path) -> None:
    journal, storage = tmp_path / "journal.sqlite3", tmp_path / "a2a.sqlite3"
    first = Broker(_config(journal=journal))
    await first.__aenter__()
    first_up = True
    try:
        client_url, worker_url = first.address("client"), first.address("worker")
        async with a2a_app(client_url, storage) as http:
            stack = Stack(first, http, storage)
            try:
                doomed = stack.spawn("doomed", delay=STUCK_S)
                await stack.registered(1)
                async with stream(stack, "outlive the broker") as events:
                    await events.until(("status", "working"))
                    first_up = False
                    await first.__aexit__(None, None, None)  # abrupt: no drain
                    doomed.kill()  # and its worker with it (it would run the task again)
                    assert doomed.wait(timeout=WAIT_S) == -signal.SIGKILL
                    async with Broker(_config(client_url, worker_url, journal)) as second:
                        stack.broker = second
                        stack.spawn("rescuer")
                        # The server's connection resumes and re-ATTACHes; the
                        # journal gave the new broker the task, the rescuer runs it.
                        rest = await events.rest()
                        task = await stack.task(events.task_id)
            finally:
                kill_all(stack.procs)
    finally:
        if first_up:
            await first.__aexit__(None, None, None)
    assert rest == [
        ("task", "submitted"),
        ("status", "working"),
        ("status", "working"),
        ("artifact", "OUTLIVE ", True),
        ("artifact", "THE ", True),
        ("artifact", "BROKER", True),
        ("artifact", "OUTLIVE THE BROKER", False),
        ("status", "completed"),
    ]
    assert task["status"]["state"] == "completed"
    assert task["artifacts"][0]["metadata"]["worker"] == "rescuer"


async def test_a_plain_fasta2a_worker_run_loop_works_too(tmp_path: Path) -> None:
    # Without serve(): the fasta2a way, one loop (capacity 1), in this process.
    async with a2a_stack(tmp_path) as stack:
        broker = ReasonbrokerWorkerBroker(stack.broker.address("worker"), pipeline=PIPELINE)
        worker = ShoutWorker(broker=broker, storage=SQLiteStorage(stack.storage), name="plain")
        async with broker, worker.run():
            await broker.wait_registered(WAIT_S)
            async with stream(stack, "one loop") as events:
                rest = await events.rest()
        assert rest[-2:] == [("artifact", "ONE LOOP", False), ("status", "completed")]
        assert stack.broker.board.stats.completed["OK"] == 1


def test_task_ids_map_to_cookies() -> None:
    task_id = str(uuid.uuid4())
    assert task_cookie(task_id) == uuid.UUID(task_id)
    assert task_cookie("task-7") == task_cookie("task-7") != task_cookie("task-8")
