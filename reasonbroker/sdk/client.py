"""The asyncio client library: submit jobs to the broker, await their results.

Many jobs share one connection. Each RUN carries a fresh cookie; RESULT,
STARTED and PROGRESS packets are routed back to their `JobHandle` by it.
Deadlines are the broker's business (RUN `timeout_ms`, answered TIMEOUT): the
client runs no timer of its own. Connection plumbing lives in `peer.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl as _ssl
import uuid
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Final, Self

from ..core import protocol as p
from .errors import (
    BadPacket,
    BrokerConnectionError,
    BrokerWentAway,
    Cancelled,
    JobError,
    error_for,
)
from .peer import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_MAX_FRAME_BYTES, Peer, library_logger

__all__ = ["Client", "JobHandle", "ProgressCallback"]

log = library_logger("reasonbroker.client")

# Called with each PROGRESS packet's `result`, in arrival order, on the event loop.
ProgressCallback = Callable[[Any], None]

# Extensions the client asks the broker to forward (PROTOCOL.md section 6).
CLIENT_FEATURES: Final = ("started", "progress")


class JobHandle:
    """One submitted job: await it for the result (non-OK codes raise a `JobError`).

    Awaiting is shielded: cancelling one awaiting task does not cancel the job
    or disturb other tasks awaiting the same handle. `cancel()` asks the broker
    to cancel the job.
    """

    def __init__(
        self,
        client: Client,
        cookie: bytes,
        pipeline: str,
        detach: bool,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.cookie = uuid.UUID(bytes=cookie)
        self.pipeline = pipeline
        self.detach = detach
        # Set when the broker forwards the worker's STARTED.
        self.started = asyncio.Event()
        self._raw_cookie = cookie
        self._client = client
        self._on_progress = on_progress
        self._future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._cancel_sent = False
        # How this client cancelled the job, for the Cancelled it then raises.
        self._cancel_how: str | None = None
        self._abandoned = False

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<JobHandle {self.pipeline!r} {self.cookie} {state}>"

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.shield(self._future).__await__()

    def done(self) -> bool:
        return self._future.done()

    async def cancel(self) -> None:
        """Send CANCEL. Awaiting the handle then raises `Cancelled`, or gives the
        result if the worker finished first. A no-op once the job has ended."""
        if self._cancel_sent or (self._future.done() and not self.detach):
            return
        self._cancel_sent = True
        self._cancel_how = "JobHandle.cancel()"
        peer = self._client._peer
        if peer is None or peer.closed:
            return  # the job has failed (or is failing) with BrokerWentAway
        with contextlib.suppress(BrokerConnectionError):
            await peer.send(p.Cancel(self._raw_cookie))

    # -- called by Client ------------------------------------------------------

    def _resolve(self, result: p.Result) -> None:
        if result.rc is p.ResultCode.OK:
            self._settle(None, result.result)
            return
        exc = error_for(result)
        if isinstance(exc, Cancelled) and self._cancel_how is not None:
            # The broker's or worker's words ("cancelled by client", "CANCEL
            # from the broker") cannot say which client call it was; we can.
            exc = Cancelled(
                f"cancelled by this client ({self._cancel_how})",
                rc=result.rc,
                cookie=self.cookie,
            )
            exc.by = "client"
        self._settle(exc, None)

    def _settle(self, exc: JobError | None, value: Any) -> None:
        if self._future.done():
            return
        if exc is None:
            self._future.set_result(value)
        else:
            self._future.set_exception(exc)
            if self._abandoned or self._cancel_sent:
                # Nobody will await it, or its caller asked for this end: mark
                # it retrieved (awaiting it still raises).
                self._future.exception()

    def _mark_retrieved(self) -> None:
        if self._future.done() and not self._future.cancelled():
            self._future.exception()

    def _progress(self, value: Any) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(value)
        except Exception:
            log.exception("progress_callback_failed", cookie=str(self.cookie))

    def _abandon(self) -> None:
        """The caller stopped waiting (its task was cancelled): cancel the job, best effort."""
        self._abandoned = True
        if self._future.done():
            if not self._future.cancelled():
                self._future.exception()
            return
        peer = self._client._peer
        if self._cancel_sent or peer is None:
            return
        self._cancel_sent = True
        self._cancel_how = "the task awaiting the job was cancelled"
        with contextlib.suppress(BrokerConnectionError):
            peer.send_nowait(p.Cancel(self._raw_cookie))


class Client:
    """A connection to the broker for submitting jobs.

    ``async with Client(url) as c: result = await c.run("pipeline", variables)``

    The client does not reconnect: when the connection drops, every pending
    job fails with `BrokerWentAway`, and so does every later submit.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        token: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self._token = token
        self._connect_timeout = connect_timeout
        self._max_frame_bytes = max_frame_bytes
        self._ssl = ssl  # for TLS transports (tls:// URLs); plaintext schemes refuse one
        self._peer: Peer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._jobs: dict[bytes, JobHandle] = {}
        self._closed = False

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def broker_hello(self) -> p.Hello:
        """The broker's HELLO answer (version, features, heartbeat_ms)."""
        return self._require_peer().broker_hello

    @property
    def in_flight(self) -> int:
        """Jobs submitted and awaiting their RESULT."""
        return len(self._jobs)

    async def connect(self) -> None:
        """Connect and exchange HELLO. Raises ConnectTimeout, BrokerConnectionError
        (both ConnectionErrors) or Unauthorized."""
        if self._peer is not None or self._closed:
            raise RuntimeError("a Client connects once")
        hello = p.Hello(
            role=p.Role.CLIENT, token=self._token, features=CLIENT_FEATURES, name=self.name
        )
        bound = log.bind(url=self.url)
        peer = await Peer.connect(
            self.url,
            hello,
            log=bound,
            connect_timeout=self._connect_timeout,
            max_frame_bytes=self._max_frame_bytes,
            ssl=self._ssl,
        )
        self._peer = peer
        self._reader = asyncio.create_task(self._read_loop(peer), name=f"client {self.url}")
        bound.info(
            "client_connected",
            broker_version=peer.broker_hello.version,
            broker_features=list(peer.broker_hello.features),
            heartbeat_ms=peer.broker_hello.heartbeat_ms,
        )

    async def close(self) -> None:
        """Close the connection; jobs still pending fail with BrokerWentAway.

        The broker cancels this client's running jobs that are not detached.
        """
        if self._closed:
            return
        self._closed = True
        peer, reader = self._peer, self._reader
        if peer is None or reader is None:
            return
        await peer.aclose("closed by the client")
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # close() itself was cancelled: never swallow that

    async def run(
        self,
        pipeline: str,
        variables: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the broker's deadline, not a local timer)
        priority: int = 0,
        max_attempts: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Any:
        """Submit a job and wait for its result; a non-OK RESULT raises its `JobError`.

        If the awaiting task is cancelled, a CANCEL is sent for the job (best
        effort) and the CancelledError propagates.
        """
        handle = await self.submit(
            pipeline,
            variables,
            timeout=timeout,
            priority=priority,
            max_attempts=max_attempts,
            on_progress=on_progress,
        )
        try:
            return await handle
        except asyncio.CancelledError:
            handle._abandon()
            raise

    async def submit(
        self,
        pipeline: str,
        variables: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the broker's deadline, not a local timer)
        priority: int = 0,
        max_attempts: int | None = None,
        detach: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> JobHandle:
        """Send a RUN and return its handle at once.

        `timeout` (seconds) becomes RUN `timeout_ms`; the broker enforces it.
        `detach=True`: no RESULT will come; the handle resolves to None as soon
        as the RUN is written. Raises EncodeError when msgpack cannot carry
        `variables`, BrokerWentAway when the connection is gone.
        """
        peer = self._require_peer()
        if not pipeline:
            raise ValueError("pipeline must be a non-empty string")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        cookie = p.new_cookie()
        run = p.Run(
            cookie, pipeline, variables, detach, priority, _timeout_ms(timeout), max_attempts
        )
        handle = JobHandle(self, cookie, pipeline, detach, on_progress)
        if peer.closed:
            raise BrokerWentAway(f"connection lost: {peer.close_reason}", cookie=handle.cookie)
        if not detach:
            # Registered before the write, so no RESULT can arrive unclaimed.
            self._jobs[cookie] = handle
        try:
            await peer.send(run)
        except BrokerConnectionError as exc:
            self._jobs.pop(cookie, None)
            handle._abandon()
            raise BrokerWentAway(
                f"connection lost: {peer.close_reason or exc}", cookie=handle.cookie
            ) from exc
        except asyncio.CancelledError:
            # The RUN is written (only drain was waiting): the job exists on the
            # broker, so cancel it rather than leave it running unobserved.
            handle._abandon()
            raise
        except BaseException:
            self._jobs.pop(cookie, None)  # EncodeError: nothing was written
            raise
        if detach:
            handle._settle(None, None)
        return handle

    def _require_peer(self) -> Peer:
        if self._closed:
            raise RuntimeError("this Client is closed")
        if self._peer is None:
            raise RuntimeError("this Client is not connected: use `async with` or `connect()`")
        return self._peer

    async def _read_loop(self, peer: Peer) -> None:
        try:
            async for packet in peer.packets():
                self._dispatch(packet)
        except Exception:
            peer.log.exception("client_reader_failed")
            peer.abort("client reader failed")
        finally:
            self._fail_all(peer.close_reason or "connection closed")

    def _dispatch(self, packet: p.Packet) -> None:
        match packet:
            case p.Result(cookie=cookie):
                job = self._jobs.pop(cookie, None) if cookie is not None else None
                if job is not None:
                    job._resolve(packet)
                elif cookie is None:
                    log.warning("broker_error", rc=packet.rc.value, error=packet.error)
                else:
                    # E.g. CANCELLED for a job whose run() was cancelled, or a
                    # detached job's answer to a CANCEL.
                    log.debug("result_for_unknown_job", cookie=p.cookie_str(cookie))
            case p.Started(cookie=cookie):
                job = self._jobs.get(cookie)
                if job is not None:
                    job.started.set()
            case p.Progress(cookie=cookie, result=result):
                job = self._jobs.get(cookie)
                if job is not None:
                    job._progress(result)
            case p.BadPacket(packet_type="RESULT", cookie=cookie) if cookie in self._jobs:
                # A RESULT we cannot read (say, a result code newer than this
                # library) still ends its job, rather than leaving it pending.
                job = self._jobs.pop(cookie)
                why = f"unreadable RESULT from the broker: {packet.why}"
                job._settle(BadPacket(why, cookie=job.cookie), None)
            case _:
                log.debug("packet_ignored", packet_type=type(packet).__name__)

    def _fail_all(self, reason: str) -> None:
        jobs, self._jobs = self._jobs, {}
        if jobs and self._closed:
            log.info("client_closed_with_pending_jobs", url=self.url, pending=len(jobs))
        elif jobs:
            log.warning("broker_went_away", url=self.url, reason=reason, pending=len(jobs))
        for job in jobs.values():
            job._settle(BrokerWentAway(f"connection lost: {reason}", cookie=job.cookie), None)
            if self._closed:
                # close() with jobs pending was the application's choice: whoever
                # awaits them still gets BrokerWentAway, but asyncio must not
                # print "Future exception was never retrieved" for the others.
                job._mark_retrieved()


def _timeout_ms(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if not 0 < timeout < math.inf:  # also rejects NaN
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return math.ceil(timeout * 1000)
