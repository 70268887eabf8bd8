"""Protocol adapters, one module per system; everything else in the bench is shared.

    reasonbroker       native codec: length-framed msgpack, cookie = 16-byte bin
    reasonbroker-json  ReasonChip's codec: length-framed JSON SocketPacket, payloads as strings
    gearmand           Gearman binary protocol (SUBMIT_JOB / JOB_CREATED / WORK_COMPLETE;
                       CAN_DO, GRAB_JOB, PRE_SLEEP / NOOP, JOB_ASSIGN, WORK_COMPLETE)
    nats               NATS text protocol, request-reply: workers in one queue group, one
                       inbox subscription per client connection, replies matched by subject

All adapters are hand-written on asyncio Protocol callbacks (uvloop when
installed): no per-job task, one write per callback, many jobs in flight per
connection. An adapter module holds its framing helpers, a client (a
`base.Client`: `send` a batch of jobs, parse answers into `Gen.completed`) and a
worker (a `base.Worker`: `handshake`, answer each job with `base.work`). A new
system is a module here, its name in common.SYSTEMS and a line in each factory
below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..common import GEARMAND, RB_JSON, RB_NATIVE
from .base import Client, Worker
from .gearman import GearmanClient, GearmanWorker
from .nats import NatsClient, NatsWorker
from .reasonbroker import RBClient, RBWorker

if TYPE_CHECKING:
    from ..loadgen import Gen


def make_client(system: str, gen: Gen, payload: bytes, hello: bool = False) -> Client:
    if system == RB_NATIVE:
        return RBClient(gen, payload, json_codec=False, hello=hello)
    if system == RB_JSON:
        return RBClient(gen, payload, json_codec=True, hello=hello)
    if system == GEARMAND:
        return GearmanClient(gen, payload)
    return NatsClient(gen, payload)


def make_worker(
    system: str, capacity: int, hold: bool, gearman_depth: int, pipeline: str | None = None
) -> Worker:
    if system == RB_NATIVE:
        return RBWorker(capacity, hold, json_codec=False, pipeline=pipeline)
    if system == RB_JSON:
        return RBWorker(capacity, hold, json_codec=True)
    if system == GEARMAND:
        return GearmanWorker(capacity, hold, gearman_depth)
    return NatsWorker(capacity, hold)
