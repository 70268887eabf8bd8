"""The asyncio worker library: serve pipelines for the broker.

A `Worker` registers its handlers' pipeline names and capacity, runs each RUN
(at most `capacity` at once) and answers exactly one RESULT per RUN, echoing
the RUN's cookie untouched (the broker assigns one per attempt). A coroutine
handler (`async def`) runs in its own asyncio task; a plain function runs
inline, where its RUN was read, with no task made. It reconnects with capped
exponential backoff when the broker goes away. Connection plumbing lives in
`peer.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl as _ssl
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar, copy_context
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, cast

from ..core import protocol as p
from ..core.errors import EncodeError
from .errors import BrokerConnectionError, ConnectTimeout
from .peer import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_FRAME_BYTES,
    Peer,
    library_logger,
    reconnect_delay,
)

__all__ = [
    "Handler",
    "JobContext",
    "Worker",
    "current_cookie",
    "current_job",
    "progress",
    "reconnect_delay",
]

log = library_logger("reasonbroker.worker")

# async def handler(variables: Any) -> Any: runs in a task of its own.
# def handler(variables: Any) -> Any: runs inline (quick, non-blocking work).
Handler = Callable[[Any], Awaitable[Any]] | Callable[[Any], Any]

_STOPPED: Final = "worker stopped"
# How long a stopping worker waits for the broker to echo its DRAIN.
_DRAIN_ECHO_S: Final = 5.0


def _worth_repeating(failures: int) -> bool:
    """Whether the `failures`-th consecutive failure of the same kind is logged again."""
    return failures & (failures - 1) == 0 or failures % 64 == 0


@dataclass(eq=False, slots=True)
class _Job:
    cookie: bytes
    pipeline: str
    peer: Peer
    worker: Worker
    task: asyncio.Task[None] | None = None
    # The broker sent CANCEL: answer CANCELLED if the handler does not finish.
    cancel_requested: bool = False
    # The connection is gone (or the worker is being torn down): answer nothing.
    abandoned: bool = False
    answered: bool = False
    # What a plain-function handler returned that is awaitable, for its task.
    returned: Awaitable[Any] | None = None

    def __call__(self, task: asyncio.Task[None]) -> None:
        """The task's done callback (the job itself: no closure made per job)."""
        self.worker._job_done(self, task)


_current_job: ContextVar[_Job | None] = ContextVar("reasonbroker_current_job", default=None)


class JobContext:
    """The job a handler runs, usable from any task: `current_job()` in the handler.

    For handlers that hand their work to other tasks (a framework's own worker
    loop, say): the context keeps naming its job after the handler's task
    context is left behind, so `progress()` from there still reaches the job's
    client, in the order sent.
    """

    __slots__ = ("_job",)

    def __init__(self, job: _Job) -> None:
        self._job = job

    @property
    def cookie(self) -> uuid.UUID:
        """The broker's cookie for this attempt (not the client's)."""
        return uuid.UUID(bytes=self._job.cookie)

    @property
    def pipeline(self) -> str:
        return self._job.pipeline

    @property
    def cancel_requested(self) -> bool:
        """The broker sent CANCEL for this job (its client cancelled, or its deadline
        passed), as opposed to the handler being cancelled because the connection
        is gone or the worker is stopping hard (then the broker re-queues the job)."""
        return self._job.cancel_requested

    @property
    def ended(self) -> bool:
        """The job has been answered, or abandoned with its connection: progress is dropped."""
        return self._job.answered or self._job.abandoned

    async def progress(self, result: Any) -> None:
        """Send PROGRESS for this job (see the module function `progress`); a no-op once ended."""
        job = self._job
        if job.answered or job.abandoned:
            return
        with contextlib.suppress(BrokerConnectionError):  # the handler is about to be cancelled
            await job.peer.send(p.Progress(job.cookie, result))


def current_job() -> JobContext:
    """The job whose handler calls this, as a `JobContext`; RuntimeError outside a handler."""
    job = _current_job.get()
    if job is None:
        raise RuntimeError("current_job() must be called from inside a worker handler")
    return JobContext(job)


def current_cookie() -> uuid.UUID | None:
    """The cookie of the job whose handler calls this (the broker's cookie for
    this attempt, not the client's), or None outside a handler."""
    job = _current_job.get()
    return None if job is None else uuid.UUID(bytes=job.cookie)


async def progress(result: Any) -> None:
    """Send a partial result for the job whose handler calls this (PROGRESS).

    The broker forwards it to the job's client if that client asked for
    progress; `result` must be something msgpack can carry.
    """
    job = _current_job.get()
    if job is None:
        raise RuntimeError("progress() must be called from inside a worker handler")
    await JobContext(job).progress(result)


class Worker:
    """Serves `handlers` (pipeline name -> handler) for the broker at `url`.

    A handler is an `async def` (a task per job) or a plain function, called
    inline where its RUN was read (no task; for quick work that never blocks).

    ``await worker.run()`` serves until `stop()`; or ``async with Worker(...)``
    runs it in a background task and stops it on exit. A Worker runs once.
    `url` may be a list of broker URLs (a cluster's nodes, say): each connection
    attempt tries them in turn, starting with the one last connected to.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        handlers: Mapping[str, Handler],
        capacity: int = 1,
        name: str | None = None,
        token: str | None = None,
        reconnect: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ssl: _ssl.SSLContext | None = None,
        send_started: bool = False,
    ) -> None:
        if not handlers:
            # A REGISTER naming no pipelines means "serves all" to the broker.
            raise ValueError("a Worker needs at least one handler")
        if any(not isinstance(n, str) or not n for n in handlers):
            raise ValueError("pipeline names must be non-empty strings")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.urls: tuple[str, ...] = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("Worker needs at least one broker URL")
        self.url = self.urls[0]  # the one in use (the first until connected)
        self.name = name
        self.capacity = capacity
        self.reconnect = reconnect
        # STARTED is one more packet per job through the broker; only workers
        # whose clients watch for it should pay for it.
        self.send_started = send_started
        self._handlers = dict(handlers)
        # Each job's task is named for its pipeline (made once, not per job).
        self._task_names = {name: f"job {name}" for name in self._handlers}
        # The handlers that are plain functions, called inline (_run_inline).
        self._inline = {name for name, h in self._handlers.items() if not _is_async(h)}
        self._token = token
        self._connect_timeout = connect_timeout
        self._max_frame_bytes = max_frame_bytes
        self._ssl = ssl  # for TLS transports (tls:// URLs); plaintext schemes refuse one
        self._jobs: dict[bytes, _Job] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._drain_echo = asyncio.Event()
        self._started = False
        self._task: asyncio.Task[None] | None = None
        # Set while registered with a broker; cleared when the connection ends.
        # `wait_registered(timeout)` waits for it without hanging forever.
        self.registered = asyncio.Event()
        # Why the last connection attempt or session failed, None before any did.
        self.last_error: str | None = None
        self._finished = asyncio.Event()  # run() has returned or raised
        self._log = log.bind(url=self.url, worker=name)

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    def stop(self) -> None:
        """Graceful stop: take no new jobs, let running ones finish, close; run() returns.

        RUNs that arrive meanwhile are not started; closing hands them back to
        the broker, which treats them as on any worker loss.
        """
        self._stopping.set()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"worker {self.url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._task is not None:
            await self._task  # being cancelled here cancels run(): a hard stop

    async def run(self) -> None:
        """Connect, register and serve until `stop()`.

        Raises Unauthorized when the broker refuses our token, and
        BrokerConnectionError when the broker is unreachable or goes away
        and `reconnect` is False.
        """
        if self._started:
            raise RuntimeError("a Worker runs once")
        self._started = True
        try:
            await self._run()
        finally:
            self._finished.set()
        self._log.info("worker_stopped")

    async def _run(self) -> None:
        failures = 0  # consecutive failed sessions, for the backoff
        logged_error: str | None = None  # the connect error last logged
        while not self._stopping.is_set():
            if failures:
                delay = reconnect_delay(failures - 1)
                self._log.debug("worker_reconnecting", delay_s=delay, attempt=failures)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                if self._stopping.is_set():
                    break
            try:
                peer = await self._connect()
            except BrokerConnectionError as exc:
                if not self.reconnect:
                    raise
                failures += 1
                self.last_error = str(exc)
                # One line when the failure starts or changes, then fewer and
                # fewer while it lasts (the 1st, 2nd, 4th, 8th... attempt, then
                # every 64th), not a line per retry forever.
                if self.last_error != logged_error or _worth_repeating(failures):
                    self._log.warning(
                        "worker_connect_failed",
                        error=self.last_error,
                        attempts=failures,
                        retry_in_s=reconnect_delay(failures - 1),
                    )
                    logged_error = self.last_error
                continue
            if failures > 1:
                self._log.info("worker_connected", after_attempts=failures)
            logged_error = None
            reason = await self._serve(peer)
            if reason is None or self._stopping.is_set():
                break
            if not self.reconnect:
                raise BrokerConnectionError(f"broker at {self.url} went away: {reason}")
            self.last_error = reason
            failures = 1

    async def wait_registered(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the worker is registered with the broker (`registered` is set).

        Raises `ConnectTimeout` (a `TimeoutError`) when that takes longer than
        `timeout` seconds, naming the broker and the last connection error, and
        `BrokerConnectionError` when `run()` ends first. Use it instead of
        ``await worker.registered.wait()``, which waits forever while the
        broker is unreachable.
        """
        if self.registered.is_set():
            return
        waits = [
            asyncio.create_task(self.registered.wait()),
            asyncio.create_task(self._finished.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if self.registered.is_set():
            return
        last = f" (last error: {self.last_error})" if self.last_error else ""
        if self._finished.is_set():
            raise BrokerConnectionError(
                f"the worker has stopped: not registered with the broker at {self.url}{last}"
            )
        raise ConnectTimeout(
            f"not registered with the broker at {self.url} within {timeout} s{last}"
        )

    async def _connect(self) -> Peer:
        """Connect to the first of `urls` that answers, from the one last used."""
        hello = p.Hello(role=p.Role.WORKER, token=self._token, name=self.name)
        start = self.urls.index(self.url)
        failure: BrokerConnectionError | None = None
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            try:
                peer = await Peer.connect(
                    url,
                    hello,
                    log=self._log,
                    connect_timeout=self._connect_timeout,
                    max_frame_bytes=self._max_frame_bytes,
                    ssl=self._ssl,
                )
            except BrokerConnectionError as exc:
                failure = exc
                continue
            self.url = url
            return peer
        assert failure is not None
        raise failure

    async def _serve(self, peer: Peer) -> str | None:
        """One session. None after a graceful stop, else why the connection ended."""
        drainer = asyncio.create_task(self._drain_on_stop(peer), name=f"drain {self.url}")
        try:
            await peer.send(p.Register(self.capacity, tuple(self._handlers)))
            self.registered.set()
            self._log.info(
                "worker_registered",
                capacity=self.capacity,
                pipelines=list(self._handlers),
                broker_version=peer.broker_hello.version,
            )
            dispatch = self._dispatch

            def consume(batch: list[p.Packet]) -> None:
                # In the transport's read callback; the first step of the jobs
                # this read started runs before the write of their RESULTs.
                for packet in batch:
                    dispatch(peer, packet)

            await peer.serve(consume)
        except BrokerConnectionError:
            pass  # REGISTER failed: the connection is gone, close_reason says why
        finally:
            self.registered.clear()
            await self._abandon_jobs()  # none are left after a graceful drain
            drainer.cancel()
            await asyncio.wait([drainer])  # never raises the drainer's CancelledError
            if not peer.closed:
                await peer.aclose(_STOPPED)
        if peer.close_reason == _STOPPED:
            return None
        reason = peer.close_reason or "connection closed"
        self._log.warning("worker_disconnected", reason=reason)
        return reason

    async def _drain_on_stop(self, peer: Peer) -> None:
        await self._stopping.wait()
        self._log.info("worker_draining", running=len(self._jobs))
        if self._announce_drain(peer):
            # Wait for the broker's echo: any RUN that crossed our DRAIN
            # arrives before it, and is returned (_on_run), not lost at close.
            self._drain_echo.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DRAIN_ECHO_S):
                    await self._drain_echo.wait()
        await self._idle.wait()
        # aclose() flushes the last RESULTs before the connection ends.
        await peer.aclose(_STOPPED)

    @staticmethod
    def _can_drain(peer: Peer) -> bool:
        """Whether the broker takes DRAIN and RETURN (feature "drain")."""
        return "drain" in peer.broker_hello.features

    def _announce_drain(self, peer: Peer) -> bool:
        """Tell the broker we are stopping, so that it sends us no more RUNs;
        whether it was told (it has feature "drain", the connection is up)."""
        if not self._can_drain(peer):
            return False
        try:
            peer.send_nowait(p.Drain())
        except BrokerConnectionError:
            return False
        return True

    async def _abandon_jobs(self) -> None:
        # The connection is gone: nobody can receive our RESULTs, and the broker
        # re-queues or fails these jobs itself.
        jobs = list(self._jobs.values())
        for job in jobs:
            job.abandoned = True
            if job.task is not None:
                job.task.cancel()
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            self._log.warning("jobs_abandoned", count=len(tasks))
            # Wait, so the next session never runs more than `capacity` handlers.
            await asyncio.gather(*tasks, return_exceptions=True)
        self._jobs.clear()
        self._idle.set()

    def _dispatch(self, peer: Peer, packet: p.Packet) -> None:
        match packet:
            case p.Run():
                self._on_run(peer, packet)
            case p.Cancel(cookie=cookie):
                job = self._jobs.get(cookie)
                if job is None:
                    # Already answered; the broker drops the late CANCEL's effect.
                    self._log.debug("cancel_for_unknown_job", cookie=p.cookie_str(cookie))
                elif not job.cancel_requested and job.task is not None:
                    job.cancel_requested = True
                    job.task.cancel()
            case p.Drain():
                self._drain_echo.set()  # the broker's answer to our DRAIN
            case p.Result(rc=rc, error=error):
                # The broker rejecting something we sent (BAD_PACKET, ...).
                self._log.warning(
                    "broker_rejected_packet",
                    rc=rc.value,
                    error=error,
                    cookie=p.cookie_str(packet.cookie),
                )
            case _:
                self._log.debug("packet_ignored", packet_type=type(packet).__name__)

    def _on_run(self, peer: Peer, run: p.Run) -> None:
        cookie = run.cookie
        if self._stopping.is_set():
            # Draining, and this RUN crossed our DRAIN: hand it back unstarted,
            # and the broker gives it to another worker without counting an
            # attempt. A broker without "drain" handles it when we close, as
            # on any worker loss.
            self._log.info("run_refused_draining", cookie=p.cookie_str(cookie))
            if self._can_drain(peer):
                with contextlib.suppress(BrokerConnectionError):
                    peer.send_nowait(p.Return(cookie))
            return
        if cookie in self._jobs:
            # Per-attempt cookies come from the broker; a live duplicate is its
            # bug. The running job will answer for this cookie exactly once.
            self._log.error("duplicate_run_cookie", cookie=p.cookie_str(cookie))
            return
        if len(self._jobs) >= self.capacity:
            self._reply(
                peer,
                p.Result(
                    cookie,
                    p.ResultCode.NO_CAPACITY,
                    f"worker is at capacity ({self.capacity} jobs running)",
                ),
            )
            return
        handler = self._handlers.get(run.pipeline)
        if handler is None:
            served = ", ".join(repr(n) for n in self._handlers)
            self._reply(
                peer,
                p.Result(
                    cookie,
                    p.ResultCode.EXCEPTION,
                    f"no handler for pipeline {run.pipeline!r} on this worker (it serves {served})",
                ),
            )
            return
        job = _Job(cookie, run.pipeline, peer, self)
        # A context of the job's own, as a task would have: the handler's
        # context variables (ours names the job) stay with it.
        context = copy_context()
        if run.pipeline in self._inline:
            awaitable = context.run(self._run_inline, job, handler, run.variables)
            if awaitable is None:
                return  # answered
            job.returned = awaitable
            coro = self._run_job(job, handler, run.variables, awaitable)
        else:
            coro = self._run_job(job, handler, run.variables)
        # The loop's own create_task: asyncio.create_task adds a Python frame
        # and a set_name call per job. The task's context is its done
        # callback's too (each would copy its own).
        job.task = task = peer.loop.create_task(
            coro, name=self._task_names[run.pipeline], context=context
        )
        task.add_done_callback(job, context=context)
        if not self._jobs:
            self._idle.clear()
        self._jobs[cookie] = job

    def _run_inline(self, job: _Job, handler: Handler, variables: Any) -> Awaitable[Any] | None:
        """Call a plain-function handler where its RUN was read and answer it:
        no task, no loop turn between the RUN and its RESULT. None once
        answered; what the handler returned when that is awaitable (a lambda
        returning a coroutine, say), for a task to await."""
        _current_job.set(job)  # in the job's own context (the caller's context.run)
        if self.send_started:
            with contextlib.suppress(BrokerConnectionError):
                job.peer.send_nowait(p.Started(job.cookie))
        # CancelledError can only be the handler's own here. KeyboardInterrupt
        # and SystemExit are raised on: they end the session (out of a task they
        # end the loop), and the broker treats the job as lost.
        try:
            value = handler(variables)
        except (Exception, asyncio.CancelledError) as exc:
            answer = self._exception_result(job, exc)
        else:
            if inspect.isawaitable(value):
                return value
            answer = p.Result(job.cookie, p.ResultCode.OK, result=value)
        # Nothing waits for the drain: the broker sends a RUN only for a slot
        # its RESULT freed, so unread RESULTs cannot pile up past `capacity`.
        self._answer(job, answer)
        return None

    async def _run_job(
        self, job: _Job, handler: Handler, variables: Any, returned: Awaitable[Any] | None = None
    ) -> None:
        """The job's task: the handler awaited and answered. `returned`: what a
        plain-function handler returned (awaitable), awaited instead of a call."""
        _current_job.set(job)  # this task's own context: seen by progress()
        if self.send_started and returned is None:  # _run_inline sent it
            with contextlib.suppress(BrokerConnectionError):
                await job.peer.send(p.Started(job.cookie))
        try:
            value = await (
                cast(Awaitable[Any], handler(variables)) if returned is None else returned
            )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if job.cancel_requested or job.abandoned or (task is not None and task.cancelling()):
                raise  # our own cancellation: _job_done answers CANCELLED if due
            answer = self._exception_result(job, exc)  # the handler raised it itself
        except Exception as exc:
            answer = self._exception_result(job, exc)
        else:
            answer = p.Result(job.cookie, p.ResultCode.OK, result=value)
        if self._answer(job, answer):
            with contextlib.suppress(BrokerConnectionError):  # the broker handles the loss
                await job.peer.drain()

    def _exception_result(self, job: _Job, exc: BaseException) -> p.Result:
        self._log.info(
            "job_failed", pipeline=job.pipeline, cookie=p.cookie_str(job.cookie), error=repr(exc)
        )
        return p.Result(
            job.cookie,
            p.ResultCode.PROCESSOR_EXCEPTION,
            f"{type(exc).__name__}: {exc}",
            tuple(traceback.format_exception(exc)),
        )

    def _answer(self, job: _Job, result: p.Result) -> bool:
        """Write the job's one RESULT; whether the connection then wants draining
        (the caller awaits that, so the answer itself costs no coroutine)."""
        if job.abandoned:
            return False
        job.answered = True
        # The slot is free from here: the RESULT may reach the broker, and its
        # next RUN come back, before this task's done callback runs.
        self._release(job)
        peer = job.peer
        try:
            try:
                peer.send_nowait(result)
            except EncodeError as exc:
                # Nothing was written: answer in a form that can always be sent.
                self._log.warning(
                    "job_result_unencodable",
                    pipeline=job.pipeline,
                    cookie=p.cookie_str(job.cookie),
                )
                fallback = p.Result(
                    job.cookie,
                    p.ResultCode.PROCESSOR_EXCEPTION,
                    f"the result of pipeline {job.pipeline!r} cannot be sent: {exc}",
                )
                try:
                    peer.send_nowait(fallback)
                except EncodeError:
                    peer.send_nowait(
                        p.Result(job.cookie, p.ResultCode.PROCESSOR_EXCEPTION, "unencodable result")
                    )
        except BrokerConnectionError:
            return False  # the broker re-queues or fails the job itself
        return peer.must_drain

    def _release(self, job: _Job) -> None:
        if self._jobs.get(job.cookie) is job:
            del self._jobs[job.cookie]
            if not self._jobs:
                self._idle.set()

    def _job_done(self, job: _Job, task: asyncio.Task[None]) -> None:
        # The task's context names the job (progress()): a cycle the GC would
        # have to find, job by job.
        job.task = None
        self._release(job)
        if job.returned is not None and inspect.iscoroutine(job.returned):
            job.returned.close()  # never awaited if the task was cancelled before its first step
        if job.answered or job.abandoned:
            return
        # Every RUN gets exactly one RESULT: the task ended without answering,
        # because it was cancelled (possibly before it ever ran) or broke.
        if task.cancelled() and job.cancel_requested:
            # The broker sends CANCEL when the client cancels (a job it times
            # out or whose client left has no one left to read this).
            why = "cancelled by client (CANCEL from the broker)"
            result = p.Result(job.cookie, p.ResultCode.CANCELLED, why)
        else:
            exc = None if task.cancelled() else task.exception()
            self._log.error("job_task_failed", pipeline=job.pipeline, error=repr(exc), exc_info=exc)
            result = p.Result(job.cookie, p.ResultCode.EXCEPTION, f"worker failed: {exc!r}")
        job.answered = True
        self._reply(job.peer, result)

    def _reply(self, peer: Peer, result: p.Result) -> None:
        with contextlib.suppress(BrokerConnectionError):
            peer.send_nowait(result)


def _is_async(handler: Handler) -> bool:
    """Whether `handler` is a coroutine function (or an object whose `__call__` is one)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 (the method, not callable())
    )
