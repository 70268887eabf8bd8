"""The cluster's store: the client side's journal is the JetStream job stream.

The node's client-side broker runs its switchboard in durable mode with this
store behind it (daemon/store/base.py's interface, the one the SQLite journal
implements): a job accepted there is published to the pipeline's subject of
the work-queue stream, with `Nats-Msg-Id` = its cookie so that a resend is
deduplicated by the server, and its batch counts as committed once JetStream
acknowledged every publish in it. So ACCEPTED, and every RESULT, reach a
client only after JetStream has the job, exactly as with the SQLite journal.

A job that ends on this node without a result from the cluster (its deadline,
a refusal, the broker giving up) has that end written to the results bucket
(KV create: the first writer wins, so a result another node wrote first
stands) and announced on the cancel subject, so that whichever node runs it
stops. Ends that came from the cluster are already in the bucket: nothing is
written for them. Batches are published concurrently and reported committed
in order. When NATS fails, a batch is retried with backoff (same ids, so no
duplicates) and the switchboard is told (`on_trouble`): new RUNs are refused
NO_CAPACITY with the reason until the publishes succeed again.

Nothing comes back at start-up: the jobs live in the stream, and results in
the bucket (ATTACH on another node finds them there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from ..daemon.store.base import Accepted, Ended, OnCommit, OnTrouble, Recovered, Store
from .requests import ERR_WRONG_LAST_SEQUENCE, PublishError, Requests
from .wire import CREATE_HEADER_BLOCK, JobMessage, Names, Outcome, band_of, msg_id_block

_log = structlog.get_logger("reasonbroker.cluster")

# One operation of a batch: None once done, else why it failed (to be retried).
_Op = Callable[[], Awaitable[BaseException | None]]

RETRY_FIRST_S: Final = 0.05
RETRY_MAX_S: Final = 2.0


class JetStreamStore(Store):
    durable = True

    def __init__(
        self,
        requests: Requests,
        names: Names,
        node: str,
        *,
        settled: set[bytes],
        publish_cancel: Callable[[bytes], None],
        new_pipeline: Callable[[str], None],
        resent: Callable[[bytes], None],
        location: str,
    ) -> None:
        self._requests = requests
        self._names = names
        self._node = node
        # Cookies whose end came from the cluster (the bridge relayed a
        # bucket's result): their end is not written again.
        self._settled = settled
        self._publish_cancel = publish_cancel
        self._new_pipeline = new_pipeline
        # A job whose publish was a duplicate: the stream's copy may be another node's.
        self._resent = resent
        self._pipelines: set[str] = set()
        self.location = location
        self._on_commit: OnCommit | None = None
        self._on_trouble: OnTrouble | None = None
        self._accepts: list[Accepted] = []
        self._ends: list[Ended] = []
        self._number = 0  # the last batch number handed out
        self._committed = 0
        self._done: set[int] = set()
        self._in_flight: dict[int, int] = {}  # batch number -> operations
        self._tasks: set[asyncio.Task[None]] = set()
        self._troubled = False
        self.published = 0
        self.failures = 0

    def open(self, now: float, on_commit: OnCommit, on_trouble: OnTrouble) -> Recovered:
        self._on_commit = on_commit
        self._on_trouble = on_trouble
        return Recovered(pending=[], ended=[], next_seq=1)

    def accept(self, job: Accepted) -> None:
        self._accepts.append(job)
        if job.pipeline not in self._pipelines:
            self._pipelines.add(job.pipeline)
            self._new_pipeline(job.pipeline)

    def dispatch(self, cookie: bytes, attempts: int) -> None:
        pass  # the job runs wherever the cluster sends it; the stream tracks that

    def requeue(self, cookie: bytes, attempts: int) -> None:
        pass

    def end(self, ended: Ended) -> None:
        if ended.cookie in self._settled:
            self._settled.discard(ended.cookie)
            return
        self._ends.append(ended)

    def forget(self, cookies: Sequence[bytes]) -> None:
        pass  # the bucket's TTL expires results

    def mark(self) -> int:
        return self._number + 1 if self._accepts or self._ends else self._number

    def flush(self) -> None:
        if not (self._accepts or self._ends):
            return
        accepts, self._accepts = self._accepts, []
        ends, self._ends = self._ends, []
        self._number += 1
        number = self._number
        self._in_flight[number] = len(accepts) + len(ends)
        task = asyncio.get_running_loop().create_task(self._commit(number, accepts, ends))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def backlog(self) -> int:
        return len(self._accepts) + len(self._ends) + sum(self._in_flight.values())

    async def close(self) -> None:
        self.flush()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    # -- the commit of one batch -------------------------------------------------

    async def _commit(self, number: int, accepts: list[Accepted], ends: list[Ended]) -> None:
        delay = RETRY_FIRST_S
        pending = [self._publish(job) for job in accepts] + [self._write_end(e) for e in ends]
        while True:
            results = await asyncio.gather(*(op() for op in pending))
            failed = [op for op, r in zip(pending, results, strict=True) if r is not None]
            if not failed:
                break
            self.failures += 1
            reason = next(str(r) for r in results if r is not None) or "NATS did not answer"
            if not self._troubled:
                self._troubled = True
                _log.error("cluster_publish_failing", why=reason, batch=number)
                if self._on_trouble is not None:
                    self._on_trouble(f"the cluster's NATS is failing: {reason}")
            pending = failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
        if self._troubled:
            self._troubled = False
            _log.warning("cluster_publish_recovered", batch=number)
            if self._on_trouble is not None:
                self._on_trouble(None)
        del self._in_flight[number]
        self._done.add(number)
        while self._committed + 1 in self._done:
            self._committed += 1
            self._done.discard(self._committed)
        if self._on_commit is not None:
            self._on_commit(self._committed)

    def _publish(self, job: Accepted) -> _Op:
        message = JobMessage(
            cookie=job.cookie,
            pipeline=job.pipeline,
            variables=job.variables,
            priority=job.priority,
            deadline=job.deadline,
            timeout_ms=job.timeout_ms,
            max_attempts=job.max_attempts,
            origin=self._node,
            accepted_at=job.accepted_at,
        ).encode()
        subject = self._names.jobs(job.pipeline, band_of(job.priority))
        headers = msg_id_block(job.cookie)

        async def publish() -> BaseException | None:
            try:
                ack = await self._requests.publish(subject, message, headers)
            except Exception as exc:  # any failure is retried, and reported
                return exc
            self.published += 1
            if ack.get("duplicate"):
                # The stream had this cookie already: our own earlier try (a publish
                # retried after a timeout), or another node's, which published it and
                # died before its ACCEPTED reached the client, who resumed here and
                # sent the RUN again. Then the job names that node as its origin, and
                # its RESULT goes to that node's subject: the bucket is watched for it.
                self._resent(job.cookie)
            return None

        return publish

    def _write_end(self, ended: Ended) -> _Op:
        outcome = Outcome(
            cookie=ended.cookie,
            rc=ended.rc,
            error=ended.error,
            stacktrace=ended.stacktrace,
            result=ended.result,
            node=self._node,
            attempts=ended.attempts,
            ended_at=ended.ended_at or time.time(),
            pipeline=ended.pipeline,
        ).encode()
        subject = self._names.result(ended.cookie)

        async def write() -> BaseException | None:
            try:
                await self._requests.publish(subject, outcome, CREATE_HEADER_BLOCK)
            except PublishError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    return exc  # retried, and reported
                # else the job's result was written first (by the node that ran it): it stands
            except Exception as exc:  # retried, and reported
                return exc
            self._publish_cancel(ended.cookie)
            return None

        return write
