"""The SDK's exceptions: no session with the broker, and jobs that failed.

`JobError` has one subclass per non-OK result code; `error_for` picks the one
a RESULT calls for. Built on the core's packets and `ReasonBrokerError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Final

from ..core.errors import (
    ConfigError,
    EncodeError,
    LocalProtocolError,
    ReasonBrokerError,
    RemoteProtocolError,
)
from ..core.packets import Result, ResultCode

# The core's exceptions, re-exported: one module for a user to catch from.
__all__ = [
    "BadPacket",
    "BrokerConnectionError",
    "BrokerWentAway",
    "Cancelled",
    "ConfigError",
    "ConnectTimeout",
    "CookieCollision",
    "CookieNotFound",
    "EncodeError",
    "JobError",
    "JobException",
    "JobTimeout",
    "LocalProtocolError",
    "NoCapacity",
    "ProcessorException",
    "ReasonBrokerError",
    "RemoteProtocolError",
    "ResumeTimeout",
    "Unauthorized",
    "UnsupportedPacketType",
    "WorkerWentAway",
    "error_for",
]


class BrokerConnectionError(ReasonBrokerError, ConnectionError):
    """No usable session with the broker: refused, closed during HELLO, or lost.

    A `ConnectionError`, so code that already catches OS-level connection
    failures catches this too.
    """


class ConnectTimeout(BrokerConnectionError, TimeoutError):
    """The connection and HELLO exchange did not complete within `connect_timeout`."""


class JobError(ReasonBrokerError):
    """A job ended with a result code other than OK.

    `rc` is the `ResultCode`, `error` and `stacktrace` are what the RESULT
    carried, `cookie` is the job's `uuid.UUID` (None when the RESULT had none).
    Each non-OK code has its own subclass; `error_for` picks it.
    """

    # The ResultCode value this class stands for (its text: a class attribute
    # that subclasses override with a plain string).
    code: ClassVar[str] = "EXCEPTION"

    def __init__(
        self,
        error: str | None = None,
        *,
        rc: ResultCode | None = None,
        stacktrace: Sequence[str] | None = None,
        cookie: uuid.UUID | None = None,
    ) -> None:
        self.rc: ResultCode = ResultCode(self.code) if rc is None else rc
        self.error = error
        self.stacktrace: list[str] | None = None if stacktrace is None else list(stacktrace)
        self.cookie = cookie
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.rc.value}: {self.error}" if self.error else self.rc.value

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default pickling replays `args` (the formatted message)
        # as `error`, which would double the code prefix.
        return (type(self), (self.error,), self.__dict__)


class BadPacket(JobError):
    code = "BAD_PACKET"


class UnsupportedPacketType(JobError):
    code = "UNSUPPORTED_PACKET_TYPE"


class NoCapacity(JobError):
    code = "NO_CAPACITY"


class CookieNotFound(JobError):
    code = "COOKIE_NOT_FOUND"


class CookieCollision(JobError):
    code = "COOKIE_COLLISION"


class WorkerWentAway(JobError):
    code = "WORKER_WENT_AWAY"


class BrokerWentAway(JobError):
    """The broker answered BROKER_WENT_AWAY, or the connection to it was lost."""

    code = "BROKER_WENT_AWAY"


class ResumeTimeout(BrokerWentAway, BrokerConnectionError):
    """A resuming client lost its broker and could not reconnect within `resume_timeout`.

    Both a `BrokerWentAway` (a job's error, like any lost connection) and a
    `BrokerConnectionError`: whoever catches either catches this.
    """


class ProcessorException(JobError):
    """The worker's handler raised; `stacktrace` holds the worker-side traceback."""

    code = "PROCESSOR_EXCEPTION"


class JobException(JobError):
    """rc EXCEPTION: a failure outside the handler (e.g. no handler for the pipeline)."""

    code = "EXCEPTION"


class Cancelled(JobError):
    """The job was cancelled. Not an `asyncio.CancelledError`: catching it swallows nothing.

    `by` says who cancelled: "client" when this client asked (`JobHandle.cancel()`,
    or the task awaiting `Client.run()` was cancelled), "broker" when the
    CANCELLED came without this client asking. A deadline is `JobTimeout`,
    a broker shutting down `BrokerWentAway`, never `Cancelled`.
    """

    code = "CANCELLED"
    by: str = "broker"


class JobTimeout(JobError):
    """The broker ended the job at its deadline (RUN `timeout_ms`)."""

    code = "TIMEOUT"


class Unauthorized(JobError):
    """The broker refused our HELLO token (or a request) with UNAUTHORIZED."""

    code = "UNAUTHORIZED"


_JOB_ERRORS: Final[dict[str, type[JobError]]] = {
    cls.code: cls
    for cls in (
        BadPacket,
        UnsupportedPacketType,
        NoCapacity,
        CookieNotFound,
        CookieCollision,
        WorkerWentAway,
        BrokerWentAway,
        ProcessorException,
        JobException,
        Cancelled,
        JobTimeout,
        Unauthorized,
    )
}


def error_for(result: Result) -> JobError:
    """The exception for a non-OK RESULT. An OK result is not an error: ValueError."""
    if result.rc.value == "OK":
        raise ValueError("error_for() needs a RESULT whose rc is not OK")
    cls = _JOB_ERRORS.get(result.rc.value, JobError)
    cookie = None if result.cookie is None else uuid.UUID(bytes=result.cookie)
    return cls(result.error, rc=result.rc, stacktrace=result.stacktrace, cookie=cookie)
