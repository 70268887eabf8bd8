"""The workers' side: a fasta2a `Broker` fed by a reasonbroker worker connection.

A `reasonbroker.sdk.Worker` serves `pipeline` with `capacity` slots. Each RUN
it receives becomes a `run` operation on a local queue, which
`receive_task_operations` yields to the fasta2a `Worker`; the RUN is answered
once that operation ends (the fasta2a worker's loop comes back for the next
one: its `run_task` returned or raised, and it published the final state),
which frees the slot on the broker.

fasta2a's `Worker` handles one operation at a time per `run()`. `serve(worker)`
runs `capacity + 1` of those loops ("lanes") over this broker, so `capacity`
tasks run at once and a CANCEL always finds a free lane. It also makes cancel
real: when the broker cancels a running job (tasks/cancel, or its deadline)
the lane running it is torn down (its `run_task` is cancelled) and started
again, then a `cancel` operation goes to the fasta2a worker's `cancel_task`;
the RUN is answered CANCELLED. A job dropped because the connection is lost
is torn down the same way, without the `cancel` operation, since the broker
gives it to another worker (`max_attempts`).

What the fasta2a worker publishes (`publish_status`, `publish_artifact`, and
the stream's end) goes back as PROGRESS packets of the task's RUN, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio.abc
from fasta2a.broker import Broker, TaskOperation, _CancelTask, _RunTask
from fasta2a.event_bus import EventBus
from fasta2a.schema import StreamResponse, TaskIdParams, TaskSendParams
from fasta2a.worker import Worker as Fasta2aWorker
from opentelemetry.trace import get_current_span

from ...sdk import JobContext, Worker, current_job
from ...sdk.peer import library_logger, reconnect_delay
from ._common import close_packet, event_packet

__all__ = ["ReasonbrokerWorkerBroker"]

log = library_logger("reasonbroker.integrations.fasta2a")

# How long leaving `serve()` (or the broker) lets running tasks finish before
# dropping the connection, which hands them to other workers.
DEFAULT_DRAIN_TIMEOUT_S: Final = 30.0


@dataclass(eq=False)
class _Lane:
    """One fasta2a `Worker.run()` loop, started by `serve()`."""

    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    current: _Op | None = None

    def interrupt(self, op: _Op) -> bool:
        """Tear the lane down if it is running `op`; whether it was."""
        if self.current is not op:
            return False
        self.interrupted.set()
        return True


# The lane whose loop is iterating receive_task_operations (the fasta2a
# worker's loop task copies the lane task's context when it is started).
_LANE: ContextVar[_Lane | None] = ContextVar("reasonbroker_fasta2a_lane", default=None)


@dataclass(eq=False)
class _Op:
    kind: Literal["run", "cancel"]
    task_id: str
    params: Mapping[str, Any]
    started: bool = False
    lane: _Lane | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def operation(self) -> TaskOperation:
        span = get_current_span()
        if self.kind == "run":
            send: TaskSendParams = dict(self.params)  # type: ignore[assignment]
            return _RunTask(operation="run", params=send, _current_span=span)
        ids: TaskIdParams = dict(self.params)  # type: ignore[assignment]
        return _CancelTask(operation="cancel", params=ids, _current_span=span)


class _ProgressBus(EventBus):
    """The worker's event bus: each call becomes a PROGRESS of the task's RUN."""

    def __init__(self, jobs: Mapping[str, JobContext]) -> None:
        self._jobs = jobs

    @contextlib.asynccontextmanager
    async def subscribe(
        self, task_id: str
    ) -> AsyncIterator[anyio.abc.ObjectReceiveStream[StreamResponse]]:
        raise RuntimeError("streams are subscribed to on the A2A server's ReasonbrokerBroker")
        yield  # pragma: no cover - a generator, for asynccontextmanager

    async def emit(self, task_id: str, event: StreamResponse) -> None:
        job = self._jobs.get(task_id)
        if job is None:
            log.debug("fasta2a_event_without_job", task_id=task_id)
            return
        await job.progress(event_packet(event))

    async def close(self, task_id: str) -> None:
        job = self._jobs.get(task_id)
        if job is not None:
            await job.progress(close_packet())


class ReasonbrokerWorkerBroker(Broker):
    """The broker of a fasta2a Worker whose tasks come from reasonbroker.

    ``broker = ReasonbrokerWorkerBroker(url, pipeline="my-agent", capacity=4)``,
    ``worker = MyWorker(broker=broker, storage=shared_storage)``, then
    ``async with broker.serve(worker): ...`` runs up to `capacity` tasks at
    once until the block ends. `url` is the reasonbroker worker listener;
    `pipeline` is the agent's name, as given to the server's
    `ReasonbrokerBroker`. `storage` must be the one the A2A server uses (a
    database): reasonbroker carries operations and events, not tasks.

    Used without `serve()` (``async with broker, worker.run():``), the fasta2a
    worker has one lane: give `capacity=1`; a CANCEL of its running task then
    waits for that task's end, and cannot interrupt it.
    """

    def __init__(
        self,
        url: str,
        *,
        pipeline: str,
        capacity: int = 1,
        name: str | None = None,
        token: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        self._jobs: dict[str, JobContext] = {}
        self.event_bus = _ProgressBus(self._jobs)
        self.pipeline = pipeline
        self.capacity = capacity
        self.drain_timeout = drain_timeout
        self.worker = Worker(
            url,
            handlers={pipeline: self._handle},
            capacity=capacity,
            name=name,
            token=token,
            ssl=ssl,
        )
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._serving: asyncio.Task[None] | None = None

    async def wait_registered(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until registered with the broker (`Worker.wait_registered`)."""
        await self.worker.wait_registered(timeout)

    async def __aenter__(self) -> Self:
        if self._serving is not None:
            raise RuntimeError("a ReasonbrokerWorkerBroker is entered once")
        self._serving = asyncio.create_task(self.worker.run(), name=f"fasta2a {self.pipeline}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        serving = self._serving
        if serving is None:
            return
        # Graceful: DRAIN (no more RUNs), let running tasks finish, close. Past
        # the drain time the connection is dropped: the broker re-queues them.
        self.worker.stop()
        try:
            done, _ = await asyncio.wait([serving], timeout=self.drain_timeout)
        except asyncio.CancelledError:
            serving.cancel()  # a hard stop: drop the connection now
            raise
        if not done:
            serving.cancel()
            await asyncio.wait([serving])
        failure = None if serving.cancelled() else serving.exception()
        if failure is not None:
            raise failure  # Unauthorized, say

    @contextlib.asynccontextmanager
    async def serve(self, worker: Fasta2aWorker[Any]) -> AsyncIterator[Self]:
        """Run `worker` over this broker with `capacity` tasks at once, and connect."""
        if worker.broker is not self:
            raise ValueError("the fasta2a worker's broker is not this ReasonbrokerWorkerBroker")
        lanes = [
            asyncio.create_task(self._lane(worker), name=f"fasta2a lane {i}")
            for i in range(self.capacity + 1)  # + 1: a CANCEL never waits for a slot
        ]
        try:
            async with self:
                yield self
        finally:
            for lane in lanes:
                lane.cancel()
            await asyncio.wait(lanes)

    async def _lane(self, worker: Fasta2aWorker[Any]) -> None:
        failures = 0
        while True:
            lane = _Lane()
            _LANE.set(lane)
            try:
                async with worker.run():
                    await lane.interrupted.wait()
                failures = 0
            except Exception:
                # The fasta2a worker's loop broke (its storage is down, say): the
                # operation it ran has ended; start it again, with a growing pause
                # while it keeps breaking.
                log.exception("fasta2a_lane_failed", failures=failures + 1)
                failures += 1
            finally:
                # Its loop is down: an operation it was running has ended.
                current, lane.current = lane.current, None
                if current is not None:
                    current.finished.set()
            if failures:
                await asyncio.sleep(reconnect_delay(failures - 1))

    def receive_task_operations(self) -> AsyncIterator[TaskOperation]:
        return self._operations()

    async def _operations(self) -> AsyncIterator[TaskOperation]:
        lane = _LANE.get()
        while True:
            op = await self._queue.get()
            if op.finished.is_set():
                continue  # a run cancelled before it started
            op.started = True
            op.lane = lane
            if lane is not None:
                lane.current = op
            try:
                yield op.operation()
            finally:
                # The fasta2a worker is back for the next one: this one has ended.
                if lane is not None and lane.current is op:
                    lane.current = None
                op.finished.set()

    async def run_task(self, params: TaskSendParams) -> None:
        raise RuntimeError("tasks are sent through the A2A server's ReasonbrokerBroker")

    async def cancel_task(self, params: TaskIdParams) -> None:
        raise RuntimeError("tasks are cancelled through the A2A server's ReasonbrokerBroker")

    # -- one RUN ------------------------------------------------------------------

    async def _handle(self, variables: Any) -> Any:
        if not isinstance(variables, dict) or not isinstance(variables.get("id"), str):
            raise ValueError("a fasta2a RUN's variables are the task's params (with its id)")
        job = current_job()
        task_id: str = variables["id"]
        run = _Op("run", task_id, variables)
        self._jobs[task_id] = job
        self._queue.put_nowait(run)
        try:
            try:
                await run.finished.wait()
            except asyncio.CancelledError:
                await self._cancelled(run, job)
                raise
        finally:
            if self._jobs.get(task_id) is job:
                del self._jobs[task_id]
        return None

    async def _cancelled(self, run: _Op, job: JobContext) -> None:
        """The RUN's handler is being cancelled: stop the task, then (for a CANCEL
        from the broker) hand the fasta2a worker its `cancel` operation."""
        if not run.started:
            run.finished.set()  # never started: the lanes skip it
        elif run.lane is not None and run.lane.interrupt(run):
            await run.finished.wait()  # its lane is torn down
        elif run.finished.is_set() or not job.cancel_requested:
            return  # ended already, or the connection is lost: nothing to stop
        else:
            # A loop of the user's own (not serve()): it cannot be torn down, so
            # the task runs to its end, and then there is nothing to cancel.
            await run.finished.wait()
            return
        if job.cancel_requested:
            cancel = _Op("cancel", run.task_id, {"id": run.task_id})
            self._queue.put_nowait(cancel)
            await cancel.finished.wait()
