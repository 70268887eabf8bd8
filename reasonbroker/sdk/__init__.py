"""The SDK a user imports: asyncio client and worker libraries for the broker.

    from reasonbroker.sdk import Client, Worker

client (submit jobs, await results), worker (serve pipelines with async
handlers), peer (the connection and HELLO both share), cmdworker (a command
per job, for `reasonbroker worker -- COMMAND`) and errors (a failed job's
exception, one per result code). Built on the core's packets and on
transports only: nothing here imports the daemon.
"""

from __future__ import annotations

from .client import Client, JobHandle, JobInfo
from .errors import (
    BadPacket,
    BrokerConnectionError,
    BrokerWentAway,
    Cancelled,
    ConnectTimeout,
    CookieCollision,
    CookieNotFound,
    JobError,
    JobException,
    JobTimeout,
    NoCapacity,
    ProcessorException,
    ResumeTimeout,
    Unauthorized,
    UnsupportedPacketType,
    WorkerWentAway,
    error_for,
)
from .worker import Handler, JobContext, Worker, current_cookie, current_job, progress

__all__ = [
    "BadPacket",
    "BrokerConnectionError",
    "BrokerWentAway",
    "Cancelled",
    "Client",
    "ConnectTimeout",
    "CookieCollision",
    "CookieNotFound",
    "Handler",
    "JobContext",
    "JobError",
    "JobException",
    "JobHandle",
    "JobInfo",
    "JobTimeout",
    "NoCapacity",
    "ProcessorException",
    "ResumeTimeout",
    "Unauthorized",
    "UnsupportedPacketType",
    "Worker",
    "WorkerWentAway",
    "current_cookie",
    "current_job",
    "error_for",
    "progress",
]
