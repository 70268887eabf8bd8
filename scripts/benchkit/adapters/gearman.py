"""The Gearman binary protocol (gearmand): packet framing, the generator's client
(SUBMIT_JOB, JOB_CREATED, WORK_COMPLETE) and the echo worker (CAN_DO, pipelined GRAB_JOB,
PRE_SLEEP / NOOP, JOB_ASSIGN, WORK_COMPLETE).
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Final

from ..common import PIPELINE, log
from .base import Client, Worker, work

if TYPE_CHECKING:
    from ..loadgen import Gen


GEAR_REQ: Final = b"\0REQ"
GEAR_RES: Final = b"\0RES"
# Gearman packet types used here.
G_CAN_DO, G_PRE_SLEEP, G_NOOP, G_SUBMIT_JOB, G_JOB_CREATED = 1, 4, 6, 7, 8
G_GRAB_JOB, G_NO_JOB, G_JOB_ASSIGN, G_WORK_COMPLETE, G_WORK_FAIL = 9, 10, 11, 13, 14
G_ECHO_REQ, G_ECHO_RES, G_ERROR, G_WORK_EXCEPTION = 16, 17, 19, 25


def gear_packet(ptype: int, body: bytes) -> bytes:
    return GEAR_REQ + ptype.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def split_gearman(buf: bytearray, data: bytes) -> list[tuple[int, bytes]]:
    """Gearman binary responses: \\0RES, 4-byte type, 4-byte size, body."""
    buf += data
    out: list[tuple[int, bytes]] = []
    n = len(buf)
    pos = 0
    while n - pos >= 12:
        if buf[pos : pos + 4] != GEAR_RES:
            raise ConnectionError(f"gearman: bad magic {bytes(buf[pos : pos + 4])!r}")
        end = pos + 12 + int.from_bytes(buf[pos + 8 : pos + 12], "big")
        if end > n:
            break
        out.append((int.from_bytes(buf[pos + 4 : pos + 8], "big"), bytes(buf[pos + 12 : end])))
        pos = end
    if pos:
        del buf[:pos]
    return out


class GearmanClient(Client):
    """Gearman: SUBMIT_JOB (unique per job, as libgearman makes one), JOB_CREATED comes back
    in submission order on the connection, WORK_COMPLETE names the job handle."""

    def __init__(self, gen: Gen, payload: bytes) -> None:
        super().__init__(gen, payload)
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.seq = 0
        self.created: deque[float] = deque()
        self.handles: dict[bytes, float] = {}
        self.fixed = len(PIPELINE) + 2 + len(payload)

    def send(self, stamps: list[float]) -> None:
        out: list[bytes] = []
        created = self.created
        prefix = self.prefix
        fixed = self.fixed
        head = GEAR_REQ + G_SUBMIT_JOB.to_bytes(4, "big")
        fn = PIPELINE.encode() + b"\0"
        payload = self.payload
        seq = self.seq
        for s in stamps:
            seq += 1
            uniq = b"%b%d" % (prefix, seq)
            out += (head, (fixed + len(uniq)).to_bytes(4, "big"), fn, uniq, b"\0", payload)
            created.append(s)
        self.seq = seq
        self.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        stamps: list[float] = []
        errors = 0
        handles = self.handles
        for ptype, body in split_gearman(self.buf, data):
            if ptype == G_JOB_CREATED:
                handles[body] = self.created.popleft()
            elif ptype == G_WORK_COMPLETE:
                handle, _, result = body.partition(b"\0")
                s = handles.pop(handle, None)
                if s is None:
                    self.gen.fail(f"gearman: WORK_COMPLETE for unknown handle {handle!r}")
                    continue
                stamps.append(s)
                if result != self.payload:
                    errors += 1
            elif ptype in (G_WORK_FAIL, G_WORK_EXCEPTION):
                s = handles.pop(body.partition(b"\0")[0], None)
                if s is not None:
                    stamps.append(s)
                errors += 1
            elif ptype == G_ERROR:
                self.gen.fail(f"gearman ERROR: {body.split(bytes(1))!r}")
        if stamps or errors:
            self.gen.completed(self, stamps, errors)


class GearmanWorker(Worker):
    """CAN_DO echo; keeps up to `depth` GRAB_JOBs outstanding (pipelined, so one connection is
    not held to one job per round trip; the bench sets depth = K per cell, as reasonbroker's
    workers register capacity); when every grab came back NO_JOB: PRE_SLEEP, and grab
    again on the server's NOOP."""

    def __init__(self, capacity: int, hold: bool, depth: int) -> None:
        super().__init__(capacity, hold)
        self.depth = max(1, depth or capacity)
        self.grabs = 0
        self.sleeping = False
        self.grab = gear_packet(G_GRAB_JOB, b"")

    def handshake(self) -> None:
        self.write(gear_packet(G_CAN_DO, PIPELINE.encode()) + gear_packet(G_ECHO_REQ, b"ready"))

    def top_up(self) -> bytes:
        missing = self.depth - self.grabs
        if missing <= 0 or self.hold or self.sleeping:
            return b""
        self.grabs += missing
        return self.grab * missing

    def set_depth(self, depth: int) -> None:
        self.depth = max(1, depth)
        grabs = self.top_up()
        if grabs:
            self.write(grabs)

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        ctl: list[bytes] = []
        for ptype, body in split_gearman(self.buf, data):
            if ptype == G_JOB_ASSIGN:
                self.grabs -= 1
                self.jobs += 1
                handle, _, rest = body.partition(b"\0")
                result = work(rest.partition(b"\0")[2])
                out += (
                    GEAR_REQ,
                    G_WORK_COMPLETE.to_bytes(4, "big"),
                    (len(handle) + 1 + len(result)).to_bytes(4, "big"),
                    handle,
                    b"\0",
                    result,
                )
                ctl.append(self.top_up())
            elif ptype == G_NO_JOB:
                self.grabs -= 1
                if self.grabs == 0:
                    ctl.append(gear_packet(G_PRE_SLEEP, b""))
                    self.sleeping = True
            elif ptype == G_NOOP:
                if self.sleeping:
                    self.sleeping = False
                    ctl.append(self.top_up())
            elif ptype == G_ECHO_RES:
                if not self.ready.done():
                    self.ready.set_result(None)
                    ctl.append(self.top_up())
            elif ptype == G_ERROR:
                log(f"gearman worker: ERROR {body!r}")
        if out:
            self.answer(out)
        if ctl:
            self.write(b"".join(ctl))

    def after_release(self) -> None:
        grabs = self.top_up()
        if grabs:
            self.write(grabs)
