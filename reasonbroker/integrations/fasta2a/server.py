"""The A2A server's side: a fasta2a `Broker` that hands tasks to reasonbroker.

One `Client` connection carries every task: `run_task` submits a RUN of
`pipeline` (the agent's name) whose variables are the task's params and whose
cookie is `task_cookie(task id)`; `cancel_task` sends its CANCEL. Each live
task has a feed: the PROGRESS packets its workers send (fasta2a event bus
calls, see `_common`) are queued in arrival order and replayed onto this
process's `event_bus` by one task per feed, so a slow stream subscriber holds
up only its own task. When the job ends, the feed ends the task's stream; a
job that ended without its worker finishing the task also has its task
marked in `storage`, when one is given: `canceled` when cancelled (while
queued, or its worker did not record it) or past its deadline, `failed` when
its worker was lost on its last attempt, or it was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from fasta2a.broker import Broker, TaskOperation
from fasta2a.event_bus import EventBus, InMemoryEventBus
from fasta2a.schema import (
    Message,
    Part,
    StreamResponse,
    TaskIdParams,
    TaskSendParams,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from fasta2a.storage import Storage

from ...sdk import (
    BrokerWentAway,
    Cancelled,
    Client,
    CookieCollision,
    CookieNotFound,
    JobError,
    JobHandle,
    JobTimeout,
)
from ...sdk.client import DEFAULT_RESUME_TIMEOUT_S
from ...sdk.errors import BrokerConnectionError
from ...sdk.peer import library_logger
from ._common import CLOSE, EVENT, KIND, task_cookie

__all__ = ["ReasonbrokerBroker"]

log = library_logger("reasonbroker.integrations.fasta2a")

# A task still in one of these states when its job ended without the worker
# taking it further was left behind: the feed marks it canceled or failed.
_UNFINISHED: Final = frozenset({"submitted", "working"})
# How long cancel_task waits for the job's end, so that tasks/cancel answers
# with the task as it ended rather than as it was (the broker's own
# cancel_grace_ms answers a silent worker's job CANCELLED in 5 s by default).
DEFAULT_CANCEL_WAIT_S: Final = 10.0

_END: Final = object()


@dataclass(eq=False)
class _Feed:
    """One task's job: its handle, and the events to replay in order."""

    task_id: str
    context_id: str
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    handle: JobHandle | None = None
    failure: JobError | None = None
    pump: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    # Set once the task's stream is ended (and its storage state settled).
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ReasonbrokerBroker(Broker):
    """A fasta2a Broker whose tasks run on reasonbroker workers.

    ``FastA2A(storage=storage, broker=ReasonbrokerBroker(url, pipeline="my-agent",
    storage=storage))``: `url` (or a list of URLs) is the reasonbroker client
    listener; `pipeline` names the agent, and its workers serve it
    (`ReasonbrokerWorkerBroker` with the same `pipeline`). `timeout` (seconds,
    queue time included), `max_attempts` (retries on worker loss) and
    `priority` go on every RUN. `storage`, the one the A2A server uses, lets
    the broker settle tasks whose job ended without their worker finishing
    them; without it such a task keeps the state it had. The task manager
    enters the broker (`async with`), which connects.

    `resume` (the default): a lost broker connection is resumed, across
    `url`'s list, for up to `resume_timeout` seconds, and every live task's
    job is ATTACHed again; a broker with a journal has kept them, so their
    streams go on (Client(resume=True)). Without it, or past that time, the
    live tasks fail.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        pipeline: str,
        storage: Storage[Any] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        priority: int = 0,
        name: str | None = None,
        token: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        resume: bool = True,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT_S,
        cancel_wait: float = DEFAULT_CANCEL_WAIT_S,
        event_bus: EventBus | None = None,
    ) -> None:
        if not pipeline:
            raise ValueError("pipeline must be a non-empty string")
        self.event_bus = event_bus if event_bus is not None else InMemoryEventBus()
        self.pipeline = pipeline
        self.storage = storage
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.priority = priority
        self.cancel_wait = cancel_wait
        self._client = Client(
            url,
            name=name or f"fasta2a {pipeline}",
            token=token,
            ssl=ssl,
            resume=resume,
            resume_timeout=resume_timeout,
        )
        self._feeds: dict[str, _Feed] = {}
        self._entered = False

    @property
    def client(self) -> Client:
        """The reasonbroker connection (for `job(task_cookie(task_id))`, say)."""
        return self._client

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a ReasonbrokerBroker is entered once")
        self._entered = True
        await self._client.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Closing the connection makes the broker cancel the jobs not yet ended
        # (PROTOCOL.md section 5); their feeds end their streams.
        await self._client.close()
        pumps = [feed.pump for feed in self._feeds.values() if feed.pump is not None]
        if pumps:
            await asyncio.wait(pumps, timeout=self.cancel_wait)
        for pump in pumps:
            pump.cancel()

    def receive_task_operations(self) -> AsyncIterator[TaskOperation]:
        raise RuntimeError(
            "a ReasonbrokerBroker sends tasks to reasonbroker; a fasta2a Worker "
            "receives them through a ReasonbrokerWorkerBroker"
        )

    async def run_task(self, params: TaskSendParams) -> None:
        """Submit the task's RUN; returns once the broker accepted (or refused) it."""
        task_id = params["id"]
        if task_id in self._feeds:
            # Its job is live: that job speaks for the task (fasta2a makes a
            # new task per message, so this is a caller's second call).
            log.warning("fasta2a_task_already_running", task_id=task_id)
            return
        feed = _Feed(task_id, params["context_id"])
        self._feeds[task_id] = feed
        feed.pump = asyncio.create_task(self._pump(feed), name=f"fasta2a feed {task_id}")
        try:
            feed.handle = await self._client.submit(
                self.pipeline,
                dict(params),
                timeout=self.timeout,
                priority=self.priority,
                max_attempts=self.max_attempts,
                on_progress=feed.queue.put_nowait,
                cookie=task_cookie(task_id),
            )
        except (JobError, BrokerConnectionError) as exc:
            # The connection is gone: the task cannot run; say so on it.
            feed.failure = exc if isinstance(exc, JobError) else BrokerWentAway(str(exc))
            feed.queue.put_nowait(_END)
            return
        feed.watch = asyncio.create_task(
            self._watch(feed, feed.handle), name=f"fasta2a job {task_id}"
        )

    async def cancel_task(self, params: TaskIdParams) -> None:
        """CANCEL the task's job, then wait (up to `cancel_wait` seconds) for its end.

        A task submitted by another connection (another server process, or this
        one before a restart, with the journal) is ATTACHed to and cancelled.
        A task whose job has ended is left as it is.
        """
        task_id = params["id"]
        feed = self._feeds.get(task_id)
        if feed is not None and feed.handle is not None:
            await feed.handle.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cancel_wait):
                    await feed.done.wait()
            return
        try:
            handle = await self._client.attach(task_cookie(task_id))
        except (CookieNotFound, JobError, BrokerConnectionError):
            return  # not live (or not reachable): nothing to cancel
        await handle.cancel()
        with contextlib.suppress(TimeoutError, JobError):
            async with asyncio.timeout(self.cancel_wait):
                await handle

    # -- a task's feed ------------------------------------------------------------

    async def _watch(self, feed: _Feed, handle: JobHandle) -> None:
        try:
            await handle
        except JobError as exc:
            feed.failure = exc
        # After every PROGRESS: the RESULT came after them on the same connection.
        feed.queue.put_nowait(_END)

    async def _pump(self, feed: _Feed) -> None:
        closed = False
        try:
            while True:
                item = await feed.queue.get()
                if item is _END:
                    break
                if not isinstance(item, dict) or KIND not in item:
                    log.warning(
                        "fasta2a_progress_ignored", task_id=feed.task_id, progress=repr(item)
                    )
                    continue
                if item[KIND] == EVENT:
                    event: StreamResponse = item[EVENT]
                    await self.event_bus.emit(feed.task_id, event)
                elif item[KIND] == CLOSE:
                    await self.event_bus.close(feed.task_id)
                    closed = True
            await self._conclude(feed, closed)
        finally:
            if self._feeds.get(feed.task_id) is feed:
                del self._feeds[feed.task_id]
            feed.done.set()

    async def _conclude(self, feed: _Feed, closed: bool) -> None:
        """The job has ended: settle a task its worker left behind, end its stream."""
        exc = feed.failure
        if isinstance(exc, CookieCollision):
            # Another connection's live job has this task (a second server
            # submitted it): that job's feed speaks for the task.
            log.warning("fasta2a_task_already_running", task_id=feed.task_id)
            return
        if exc is not None:
            log.info("fasta2a_task_job_ended", task_id=feed.task_id, error=str(exc))
            # A deadline cancels the task on its worker too, whose cancel_task may
            # record `canceled` at the same moment: one word for both, whoever
            # writes first, so that the stream and the storage agree.
            cancelled = isinstance(exc, (Cancelled, JobTimeout))
            state: TaskState = "canceled" if cancelled else "failed"
            await self._settle(feed, state, exc)
        elif closed:
            return
        await self.event_bus.close(feed.task_id)

    async def _settle(self, feed: _Feed, state: TaskState, exc: JobError) -> None:
        if self.storage is None:
            return
        task = await self.storage.load_task(feed.task_id)
        if task is None or task["status"]["state"] not in _UNFINISHED:
            return  # the worker finished it (or it waits on the client): keep its word
        messages: list[Message] = []
        if not isinstance(exc, Cancelled):  # why it ended, for the A2A client
            text = f"reasonbroker: {exc}"
            messages.append(
                Message(role="agent", parts=[Part(text=text)], message_id=str(uuid.uuid4()))
            )
        await self.storage.update_task(feed.task_id, state=state, new_messages=messages or None)
        update = TaskStatusUpdateEvent(
            task_id=feed.task_id, context_id=feed.context_id, status=TaskStatus(state=state)
        )
        await self.event_bus.emit(feed.task_id, StreamResponse(status_update=update))
