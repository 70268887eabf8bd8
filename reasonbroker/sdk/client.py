"""The asyncio client library: submit jobs to the broker, await their results.

Many jobs share one connection. Each RUN carries a fresh cookie; ACCEPTED,
RESULT, STARTED and PROGRESS packets are routed back to their `JobHandle` by
it. Deadlines are the broker's business (RUN `timeout_ms`, answered TIMEOUT):
the client runs no timer of its own. Durable jobs (PROTOCOL.md section 7):
`submit` waits for ACCEPTED, `attach` and `job` look a job up by its cookie,
and a client made with `resume=True` reconnects after losing its broker and
re-ATTACHes (or re-sends) what it had in flight. Connection plumbing lives in
`peer.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import ssl as _ssl
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from ..core import protocol as p
from .errors import (
    BadPacket,
    BrokerConnectionError,
    BrokerWentAway,
    Cancelled,
    JobError,
    ResumeTimeout,
    Unauthorized,
    UnsupportedPacketType,
    error_for,
)
from .peer import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_FRAME_BYTES,
    Peer,
    library_logger,
    reconnect_delay,
)

__all__ = ["Client", "CookieLike", "JobHandle", "JobInfo", "ProgressCallback", "cookie_bytes"]

log = library_logger("reasonbroker.client")

# Called with each PROGRESS packet's `result`, in arrival order, on the event loop.
ProgressCallback = Callable[[Any], None]

# Extensions the client asks the broker for (PROTOCOL.md sections 6 and 7).
# `ack` (docs/protocol.md): ACCEPTED only for the RUNs that ask for it, which
# submit() does and run() does not (unless resuming): run()'s answer is the
# RESULT, and an ACCEPTED it never reads cost it a wake-up and the broker a
# write per job.
CLIENT_FEATURES: Final = ("started", "progress", "accepted", "ack", "attach")
# How long a resuming client keeps trying to reach a broker before its
# pending jobs fail: long enough for a broker restart with a journal replay.
DEFAULT_RESUME_TIMEOUT_S: Final = 60.0

# A job's cookie as a caller may give it: a UUID, its text, or its 16 bytes.
CookieLike = uuid.UUID | str | bytes

# Fresh cookies are cut from one os.urandom read of this many: as random as a
# uuid4 each (a cookie found by another connection lets it ATTACH, so they
# must not be guessable from one another), without a syscall and a UUID
# object per job.
_COOKIES_PER_READ: Final = 256
_cookie_pool = b""
_cookie_at = 0


def _new_cookie() -> bytes:
    """16 fresh random bytes (what `uuid.uuid4().bytes` gives, less the version bits)."""
    global _cookie_pool, _cookie_at
    at = _cookie_at
    if at >= len(_cookie_pool):
        _cookie_pool = os.urandom(16 * _COOKIES_PER_READ)
        at = 0
    _cookie_at = at + 16
    return _cookie_pool[at : at + 16]


def cookie_bytes(cookie: CookieLike) -> bytes:
    """The 16 wire bytes of a cookie given as a `uuid.UUID`, a UUID string or 16 bytes."""
    if isinstance(cookie, uuid.UUID):
        return cookie.bytes
    if isinstance(cookie, bytes):
        if len(cookie) != 16:
            raise ValueError(f"a cookie is 16 bytes, got {len(cookie)}")
        return cookie
    if isinstance(cookie, str):
        try:
            return uuid.UUID(cookie).bytes
        except ValueError:
            raise ValueError(f"not a UUID cookie: {cookie!r}") from None
    raise TypeError(f"a cookie is a uuid.UUID, str or bytes, not {type(cookie).__name__}")


@dataclass(frozen=True, slots=True)
class JobInfo:
    """Where a job is (the broker's JOB packet): `Client.job(cookie)`.

    `state` is "queued", "running" or "ended"; `rc` and `error` are set for an
    ended job (its RESULT's code and error text).
    """

    cookie: uuid.UUID
    state: p.JobState
    pipeline: str | None
    attempts: int
    rc: p.ResultCode | None = None
    error: str | None = None

    @classmethod
    def from_packet(cls, job: p.Job) -> JobInfo:
        return cls(
            uuid.UUID(bytes=job.cookie), job.state, job.pipeline, job.attempts, job.rc, job.error
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"cookie", "state", "pipeline", "attempts", "rc", "error"}."""
        return {
            "cookie": str(self.cookie),
            "state": self.state.value,
            "pipeline": self.pipeline,
            "attempts": self.attempts,
            "rc": None if self.rc is None else self.rc.value,
            "error": self.error,
        }


class JobHandle:
    """One submitted (or attached) job: await it for the result (non-OK codes raise a `JobError`).

    `accepted` is True once the broker said ACCEPTED (with a journal: the job
    is committed and survives a broker restart); a handle that `submit`
    returned with `accepted` False was refused or lost before acceptance and
    is already resolved with the error. Awaiting is shielded: cancelling one
    awaiting task does not cancel the job or disturb other tasks awaiting the
    same handle. `cancel()` asks the broker to cancel the job.
    """

    # Slotted: one is made per job, and Client.run makes them by the thousand.
    __slots__ = (
        "_abandoned",
        "_accept",
        "_cancel_how",
        "_cancel_sent",
        "_client",
        "_future",
        "_on_progress",
        "_raw_cookie",
        "_resent",
        "_run",
        "_started",
        "_uuid",
        "accepted",
        "detach",
        "pipeline",
    )

    def __init__(
        self,
        client: Client,
        cookie: bytes,
        pipeline: str,
        detach: bool,
        on_progress: ProgressCallback | None,
        run: p.Run | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.detach = detach
        self.accepted = False
        # The RUN, kept until ACCEPTED: a resuming client re-sends it (same
        # cookie) when the connection is lost before the broker's word.
        self._run = run
        self._resent = False
        # Set by submit() when the broker offers ACCEPTED: submit waits on it.
        self._accept: asyncio.Future[None] | None = None
        # `started` and `cookie` are made when first asked for (most jobs never are).
        self._started: asyncio.Event | None = None
        self._uuid: uuid.UUID | None = None
        self._raw_cookie = cookie
        self._client = client
        self._on_progress = on_progress
        self._future: asyncio.Future[Any] = client._loop.create_future()
        self._cancel_sent = False
        # How this client cancelled the job, for the Cancelled it then raises.
        self._cancel_how: str | None = None
        self._abandoned = False

    @property
    def cookie(self) -> uuid.UUID:
        """The job's cookie (the client's, the one ATTACH and `Client.job` take)."""
        cookie = self._uuid
        if cookie is None:
            cookie = self._uuid = uuid.UUID(bytes=self._raw_cookie)
        return cookie

    @property
    def started(self) -> asyncio.Event:
        """Set when the broker forwards the worker's STARTED."""
        started = self._started
        if started is None:
            started = self._started = asyncio.Event()
        return started

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
            # The job has failed (or is failing) with BrokerWentAway, or a
            # resuming client sends the CANCEL once it has reconnected.
            return
        with contextlib.suppress(BrokerConnectionError):
            await peer.send(p.Cancel(self._raw_cookie))

    # -- called by Client ------------------------------------------------------

    def _accepted(self) -> None:
        self.accepted = True
        self._run = None
        accept = self._accept
        if accept is not None and not accept.done():
            accept.set_result(None)

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
        accept = self._accept
        if accept is not None and not accept.done():
            accept.set_result(None)  # ended before ACCEPTED: a refusal, submit returns

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
        """The caller stopped waiting (its task was cancelled): cancel the job, best effort.

        A cancelled future is one `Client.run` awaited directly (unshielded, as
        the only awaiter): the job itself may still be running.
        """
        self._abandoned = True
        if self._future.done() and not self._future.cancelled():
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

    `urls` is one broker URL or a list of them: `connect()` tries them in
    order. Without `resume` the client does not reconnect: when the
    connection drops, every pending job fails with `BrokerWentAway`, and so
    does every later submit. With `resume=True` it reconnects with backoff,
    cycling through `urls`, for up to `resume_timeout` seconds (then pending
    jobs fail with `ResumeTimeout`, a `BrokerConnectionError`), re-ATTACHes
    every job the broker had ACCEPTED and re-sends the RUN of every job it
    had not, so an awaited handle still resolves, exactly once.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str | None = None,
        token: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        ssl: _ssl.SSLContext | None = None,
        resume: bool = False,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT_S,
    ) -> None:
        self.urls: tuple[str, ...] = (urls,) if isinstance(urls, str) else tuple(urls)
        if not self.urls:
            raise ValueError("Client needs at least one broker URL")
        if not 0 < resume_timeout < math.inf:
            raise ValueError(f"resume_timeout must be a finite number > 0, got {resume_timeout}")
        # The broker URL in use (the first of `urls` until connected).
        self.url = self.urls[0]
        self.name = name
        self.resume = resume
        self._resume_timeout = resume_timeout
        self._token = token
        self._connect_timeout = connect_timeout
        self._max_frame_bytes = max_frame_bytes
        self._ssl = ssl  # for TLS transports (tls:// URLs); plaintext schemes refuse one
        self._peer: Peer | None = None
        # The loop connect() ran on: handles make their futures on it.
        self._loop: asyncio.AbstractEventLoop
        self._reader: asyncio.Task[None] | None = None
        self._jobs: dict[bytes, JobHandle] = {}
        # Client.job() calls waiting for their JOB (or COOKIE_NOT_FOUND), per cookie, FIFO.
        self._queries: dict[bytes, list[asyncio.Future[JobInfo]]] = {}
        # Whether the connected broker sends ACCEPTED (it offered feature `accepted`).
        self._accepting = False
        self._resuming = False
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
        """Jobs submitted (or attached) and awaiting their ACCEPTED or RESULT."""
        return len(self._jobs)

    def _hello(self) -> p.Hello:
        return p.Hello(
            role=p.Role.CLIENT, token=self._token, features=CLIENT_FEATURES, name=self.name
        )

    async def _open(self, url: str, connect_timeout: float) -> Peer:
        return await Peer.connect(
            url,
            self._hello(),
            log=log.bind(url=url),
            connect_timeout=connect_timeout,
            max_frame_bytes=self._max_frame_bytes,
            ssl=self._ssl,
        )

    async def connect(self) -> None:
        """Connect (to the first of `urls` that answers) and exchange HELLO. Raises
        ConnectTimeout, BrokerConnectionError (both ConnectionErrors) or Unauthorized."""
        if self._peer is not None or self._closed:
            raise RuntimeError("a Client connects once")
        self._loop = asyncio.get_running_loop()
        failure: BrokerConnectionError | None = None
        for url in self.urls:
            try:
                peer = await self._open(url, self._connect_timeout)
            except BrokerConnectionError as exc:
                failure = exc
                continue
            break
        else:
            assert failure is not None
            raise failure
        self._use(peer)
        self._reader = asyncio.create_task(self._serve(peer), name=f"client {self.url}")
        peer.log.info(
            "client_connected",
            broker_version=peer.broker_hello.version,
            broker_features=list(peer.broker_hello.features),
            heartbeat_ms=peer.broker_hello.heartbeat_ms,
        )

    def _use(self, peer: Peer) -> None:
        self._peer = peer
        self.url = peer.url
        self._accepting = "accepted" in peer.broker_hello.features

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
        effort) and the CancelledError propagates. The RUN asks for no ACCEPTED
        (feature `ack`), unless this client resumes: then the job is
        re-ATTACHed after a loss once accepted, as a submitted one is.
        """
        # submit() without waiting for ACCEPTED: the RESULT comes after it, and
        # a refusal is the RESULT. The handle is this call's alone (nobody else
        # knows its cookie), so its future is awaited without a shield.
        handle, peer = self._start(
            pipeline, variables, timeout, priority, max_attempts, False, on_progress, False
        )
        try:
            if peer is not None and peer.must_drain:
                await self._drain(handle, peer)
            return await handle._future
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
        cookie: CookieLike | None = None,
    ) -> JobHandle:
        """Send a RUN and return its handle once the broker has accepted or refused it.

        When the broker offers ACCEPTED (PROTOCOL.md section 7), this returns
        once it came (`handle.accepted` is True), or once the job was refused
        or lost before it (`handle.accepted` is False and the handle is already
        resolved: awaiting it raises the refusal, NO_CAPACITY say). A broker
        without it: returns once the RUN is written. `timeout` (seconds)
        becomes RUN `timeout_ms`; the broker enforces it. `detach=True`: no
        RESULT will come; the handle resolves to None once the job is
        accepted (written, for a broker without ACCEPTED). Raises EncodeError
        when msgpack cannot carry `variables`, BrokerWentAway when the
        connection is gone (a resuming client instead sends the RUN once it
        has reconnected). `cookie` names the job instead of a fresh random one (a
        UUID, its string or its 16 bytes): for a caller whose own ids map to
        cookies, so that another connection can ATTACH or a re-sent RUN is
        known as the same job; a cookie live on the broker is answered
        COOKIE_COLLISION, and one this client already awaits raises ValueError.
        """
        handle, peer = self._start(
            pipeline, variables, timeout, priority, max_attempts, detach, on_progress, True, cookie
        )
        if peer is not None and peer.must_drain:
            try:
                await self._drain(handle, peer)
            except asyncio.CancelledError:
                handle._abandon()
                raise
        accept = handle._accept
        if accept is not None:
            try:
                await accept
            except asyncio.CancelledError:
                handle._abandon()
                raise
        elif detach:
            handle._settle(None, None)
        return handle

    def _start(
        self,
        pipeline: str,
        variables: Any,
        timeout: float | None,
        priority: int,
        max_attempts: int | None,
        detach: bool,
        on_progress: ProgressCallback | None,
        wait_accept: bool,
        cookie: CookieLike | None = None,
    ) -> tuple[JobHandle, Peer | None]:
        """The part of submit() that does not wait: the job registered and its RUN
        written (to the peer returned, which the caller drains) or, while resuming,
        left for the reconnect to send (no peer returned)."""
        peer = self._require_peer()
        if not pipeline:
            raise ValueError("pipeline must be a non-empty string")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if cookie is None:
            raw = _new_cookie()
        else:
            raw = cookie_bytes(cookie)
            if raw in self._jobs:
                raise ValueError(f"this client already awaits the job {uuid.UUID(bytes=raw)}")
        # ACCEPTED is asked for (RUN `ack`) by submit(), which waits for it, and
        # by a resuming client, which re-ATTACHes an accepted job after a loss
        # rather than re-sending it; a broker without feature `ack` sends it anyway.
        ack = wait_accept or self.resume
        run = p.Run(
            raw, pipeline, variables, detach, priority, _timeout_ms(timeout), max_attempts, ack
        )
        handle = JobHandle(self, raw, pipeline, detach, on_progress, run)
        down = peer.closed
        if down and not self._resuming:
            raise BrokerWentAway(f"connection lost: {peer.close_reason}", cookie=handle.cookie)
        if down:
            p.encode(run)  # EncodeError now, not when the RUN is re-sent
        waits = self._accepting or down
        if waits and wait_accept:
            handle._accept = self._loop.create_future()
        if waits or not detach:
            # Registered before the write, so no answer can arrive unclaimed.
            self._jobs[raw] = handle
        if down:
            return handle, None
        try:
            peer.send_nowait(run)
        except BrokerConnectionError as exc:
            self._lost_while_sending(handle, peer, exc)
            return handle, None  # resuming: the reader sees the loss and re-sends the RUN
        except BaseException:
            self._jobs.pop(raw, None)  # EncodeError: nothing was written
            raise
        return handle, peer

    async def _drain(self, handle: JobHandle, peer: Peer) -> None:
        """Wait while the broker reads slowly. The RUN is written: if the caller is
        cancelled here the job exists on the broker, and the caller cancels it
        rather than leave it running unobserved."""
        try:
            await peer.drain()
        except BrokerConnectionError as exc:
            self._lost_while_sending(handle, peer, exc)

    def _lost_while_sending(
        self, handle: JobHandle, peer: Peer, exc: BrokerConnectionError
    ) -> None:
        """The connection went while the RUN was being written: BrokerWentAway,
        unless resuming (then the reader sees the loss and re-sends the RUN)."""
        if not (self.resume and not self._closed):
            self._jobs.pop(handle._raw_cookie, None)
            handle._abandon()
            raise BrokerWentAway(
                f"connection lost: {peer.close_reason or exc}", cookie=handle.cookie
            ) from exc

    async def attach(
        self, cookie: CookieLike, *, on_progress: ProgressCallback | None = None
    ) -> JobHandle:
        """Become one of the job's clients (ATTACH): the handle resolves with its RESULT.

        A live job's RESULT comes when it ends (STARTED and PROGRESS too); an
        ended job's retained RESULT at once. An unknown or expired cookie
        raises `CookieNotFound`. A job this client already awaits returns its
        handle. The cookie: a `uuid.UUID`, its string or its 16 bytes.
        """
        raw = cookie_bytes(cookie)
        handle = self._jobs.get(raw)
        if handle is not None:
            return handle
        info = await self.job(raw)  # raises CookieNotFound; names the pipeline
        handle = self._jobs.get(raw)
        if handle is not None:
            return handle
        handle = JobHandle(self, raw, info.pipeline or "", False, on_progress)
        handle.accepted = True  # re-ATTACHed, never re-sent, after a lost connection
        self._jobs[raw] = handle
        peer = self._require_peer()
        if not peer.closed:
            try:
                await peer.send(p.Attach(raw, True))
            except BrokerConnectionError as exc:
                if not (self.resume and not self._closed):
                    self._jobs.pop(raw, None)
                    raise BrokerWentAway(
                        f"connection lost: {peer.close_reason or exc}", cookie=handle.cookie
                    ) from exc
        elif not self._resuming:
            self._jobs.pop(raw, None)
            raise BrokerWentAway(f"connection lost: {peer.close_reason}", cookie=handle.cookie)
        return handle

    async def job(self, cookie: CookieLike) -> JobInfo:
        """Where the job is now (ATTACH with `wait` false, answered JOB), without attaching.

        Raises `CookieNotFound` for an unknown or expired cookie,
        `UnsupportedPacketType` when the broker offers no ATTACH, BrokerWentAway
        when the connection is lost (a resuming client asks again once
        reconnected).
        """
        raw = cookie_bytes(cookie)
        peer = self._require_peer()
        uid = uuid.UUID(bytes=raw)
        if not peer.closed and "attach" not in peer.broker_hello.features:
            raise UnsupportedPacketType("this broker does not offer ATTACH", cookie=uid)
        if peer.closed and not self._resuming:
            raise BrokerWentAway(f"connection lost: {peer.close_reason}", cookie=uid)
        answer: asyncio.Future[JobInfo] = asyncio.get_running_loop().create_future()
        waiting = self._queries.setdefault(raw, [])
        waiting.append(answer)
        try:
            if not peer.closed:
                try:
                    await peer.send(p.Attach(raw, False))
                except BrokerConnectionError as exc:
                    if not (self.resume and not self._closed):
                        raise BrokerWentAway(
                            f"connection lost: {peer.close_reason or exc}", cookie=uid
                        ) from exc
            return await answer
        finally:
            waiting = self._queries.get(raw, [])
            if answer in waiting:
                waiting.remove(answer)
                if not waiting:
                    del self._queries[raw]

    def _require_peer(self) -> Peer:
        if self._closed:
            raise RuntimeError("this Client is closed")
        if self._peer is None:
            raise RuntimeError("this Client is not connected: use `async with` or `connect()`")
        return self._peer

    # -- the connection's life ---------------------------------------------------

    async def _serve(self, peer: Peer) -> None:
        """Read the broker's packets; on a loss, resume (or fail every pending job)."""
        reason = "connection closed"
        failure: type[BrokerWentAway] = BrokerWentAway
        try:
            while True:
                await self._read(peer)
                reason = peer.close_reason or "connection closed"
                if self._closed or not self.resume:
                    return
                resumed = await self._reconnect(reason)
                if resumed is None:
                    failure = ResumeTimeout
                    reason = f"no broker reachable within {self._resume_timeout} s ({reason})"
                    return
                peer = resumed
        finally:
            self._fail_all(reason, failure)

    async def _read(self, peer: Peer) -> None:
        dispatch = self._dispatch

        def consume(batch: list[p.Packet]) -> None:
            # In the transport's read callback: no task wakes up to read. The
            # run() calls this read answers send again before its write.
            for packet in batch:
                dispatch(packet)

        try:
            await peer.serve(consume)
        except Exception:
            peer.log.exception("client_reader_failed")
            peer.abort("client reader failed")

    async def _reconnect(self, reason: str) -> Peer | None:
        """Reconnect with backoff, cycling through the URLs, until `resume_timeout`.

        Returns the new peer with every pending job re-ATTACHed or re-sent, or
        None when the time is up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resume_timeout
        log.warning(
            "client_resuming",
            url=self.url,
            reason=reason,
            pending=len(self._jobs),
            resume_timeout_s=self._resume_timeout,
        )
        self._resuming = True
        attempt = 0
        last = reason
        try:
            while True:
                for url in self.urls:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        log.warning(
                            "client_resume_failed",
                            urls=list(self.urls),
                            pending=len(self._jobs),
                            error=last,
                        )
                        return None
                    try:
                        peer = await self._open(url, min(self._connect_timeout, remaining))
                    except (BrokerConnectionError, Unauthorized) as exc:
                        last = str(exc)
                        log.debug("client_reconnect_failed", url=url, error=last, attempt=attempt)
                        continue
                    self._use(peer)
                    self._replay(peer)
                    return peer
                delay = min(reconnect_delay(attempt), max(deadline - loop.time(), 0.0))
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            self._resuming = False

    def _replay(self, peer: Peer) -> None:
        """After a reconnect: ATTACH each accepted job, re-send each RUN not yet
        accepted (same cookie: PROTOCOL.md section 7 makes that safe), ask each
        pending JOB question again."""
        attach = "attach" in peer.broker_hello.features
        reattached = resent = lost = 0
        try:
            for cookie, job in list(self._jobs.items()):
                if job._run is None:  # accepted (or attached): the broker may still have it
                    if not attach:
                        del self._jobs[cookie]
                        why = "connection lost, and the new broker offers no ATTACH"
                        job._settle(BrokerWentAway(why, cookie=job.cookie), None)
                        lost += 1
                        continue
                    peer.send_nowait(p.Attach(cookie, True))
                    reattached += 1
                else:
                    job._resent = True
                    peer.send_nowait(job._run)
                    resent += 1
                    if not self._accepting:
                        job._accepted()  # the broker will not say: written is all we know
                        if job.detach:
                            del self._jobs[cookie]
                            job._settle(None, None)
                if job._cancel_sent:
                    peer.send_nowait(p.Cancel(cookie))
            if attach:
                for cookie, waiting in self._queries.items():
                    for _ in waiting:
                        peer.send_nowait(p.Attach(cookie, False))
        except BrokerConnectionError:
            pass  # lost again already: the reader sees it and resumes again
        peer.log.info(
            "client_resumed",
            broker_version=peer.broker_hello.version,
            reattached=reattached,
            resent=resent,
            lost=lost,
        )

    def _dispatch(self, packet: p.Packet) -> None:
        match packet:
            case p.Result(cookie=cookie):
                if cookie is None:
                    log.warning("broker_error", rc=packet.rc.value, error=packet.error)
                    return
                if self._queries and packet.rc is p.ResultCode.COOKIE_NOT_FOUND:
                    answer = self._next_query(cookie)
                    if answer is not None:
                        answer.set_exception(error_for(packet))
                        return
                job = self._jobs.pop(cookie, None)
                if job is None:
                    # E.g. CANCELLED for a job whose run() was cancelled, or a
                    # detached job's answer to a CANCEL.
                    log.debug("result_for_unknown_job", cookie=p.cookie_str(cookie))
                elif (
                    job._resent
                    and job._run is not None
                    and (packet.rc is p.ResultCode.COOKIE_COLLISION)
                ):
                    # The re-sent RUN's twin made it before the connection was
                    # lost (PROTOCOL.md section 7): the job is accepted; attach.
                    job._accepted()
                    if job.detach:
                        job._settle(None, None)
                        return
                    self._jobs[cookie] = job
                    peer = self._peer
                    if peer is not None:
                        with contextlib.suppress(BrokerConnectionError):
                            peer.send_nowait(p.Attach(cookie, True))
                else:
                    job._resolve(packet)
            case p.Accepted(cookie=cookie):
                job = self._jobs.get(cookie)
                if job is not None and not job.accepted:
                    job._accepted()
                    if job.detach:
                        del self._jobs[cookie]
                        job._settle(None, None)
            case p.Job(cookie=cookie):
                answer = self._next_query(cookie)
                if answer is not None:
                    answer.set_result(JobInfo.from_packet(packet))
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

    def _next_query(self, cookie: bytes) -> asyncio.Future[JobInfo] | None:
        """The oldest Client.job() call still waiting for this cookie's answer."""
        waiting = self._queries.get(cookie)
        while waiting:
            answer = waiting.pop(0)
            if not waiting:
                del self._queries[cookie]
            if not answer.done():  # its caller may have been cancelled
                return answer
        return None

    def _fail_all(self, reason: str, failure: type[BrokerWentAway] = BrokerWentAway) -> None:
        jobs, self._jobs = self._jobs, {}
        queries, self._queries = self._queries, {}
        if jobs and self._closed:
            log.info("client_closed_with_pending_jobs", url=self.url, pending=len(jobs))
        elif jobs:
            log.warning("broker_went_away", url=self.url, reason=reason, pending=len(jobs))
        for job in jobs.values():
            job._settle(failure(f"connection lost: {reason}", cookie=job.cookie), None)
            if self._closed:
                # close() with jobs pending was the application's choice: whoever
                # awaits them still gets BrokerWentAway, but asyncio must not
                # print "Future exception was never retrieved" for the others.
                job._mark_retrieved()
        for cookie, waiting in queries.items():
            for answer in waiting:
                if not answer.done():
                    answer.set_exception(
                        failure(f"connection lost: {reason}", cookie=uuid.UUID(bytes=cookie))
                    )


def _timeout_ms(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if not 0 < timeout < math.inf:  # also rejects NaN
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return math.ceil(timeout * 1000)
