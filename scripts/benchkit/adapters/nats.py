"""The NATS text protocol (nats-server), request-reply: MSG framing and the handshake
both sides share (INFO, CONNECT, SUB, PING/PONG), the generator's client (PUB with a
per-connection wildcard inbox, replies matched by subject) and the echo worker (one queue
group, PUB to each reply subject).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Final

from ..common import PIPELINE, log
from .base import Client, Worker, work

if TYPE_CHECKING:
    from ..loadgen import Gen


NatsMsg = tuple[bytes, bytes | None, bytes]  # subject, reply-to, payload


def split_nats(buf: bytearray, data: bytes) -> tuple[list[NatsMsg], list[bytes]]:
    """NATS server-to-client protocol: MSG frames and the other (control) lines."""
    buf += data
    msgs: list[NatsMsg] = []
    ctl: list[bytes] = []
    n = len(buf)
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        if buf.startswith(b"MSG ", pos):
            parts = bytes(buf[pos + 4 : eol]).split()
            start = eol + 2
            end = start + int(parts[-1])
            if end + 2 > n:
                break
            msgs.append((parts[0], parts[2] if len(parts) == 4 else None, bytes(buf[start:end])))
            pos = end + 2
        else:
            ctl.append(bytes(buf[pos:eol]))
            pos = eol + 2
    if pos:
        del buf[:pos]
    return msgs, ctl


class NatsClient(Client):
    """NATS request-reply: PUB echo <inbox>.<seq>; one wildcard inbox SUB per connection."""

    def __init__(self, gen: Gen, payload: bytes) -> None:
        super().__init__(gen, payload)
        self.inbox = b"_INBOX." + os.urandom(8).hex().encode() + b"."
        self.ilen = len(self.inbox)
        self.pending: dict[int, float] = {}
        self.seq = 0
        self.body = payload + b"\r\n"

    def on_connect(self) -> None:
        pass  # the server speaks first (INFO)

    def send(self, stamps: list[float]) -> None:
        out: list[bytes] = []
        pending = self.pending
        head = b"PUB " + PIPELINE.encode() + b" " + self.inbox
        tail = b" %d\r\n" % len(self.payload)
        body = self.body
        seq = self.seq
        for s in stamps:
            seq += 1
            pending[seq] = s
            out += (head, b"%d" % seq, tail, body)
        self.seq = seq
        self.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        msgs, ctl = split_nats(self.buf, data)
        for line in ctl:
            nats_control(self, line, b"SUB " + self.inbox + b"* 1\r\n")
        if not msgs:
            return
        stamps: list[float] = []
        errors = 0
        ilen = self.ilen
        pending = self.pending
        for subject, _, payload in msgs:
            s = pending.pop(int(subject[ilen:]), None)
            if s is None:
                continue  # a reply for a request we gave up on
            stamps.append(s)
            if payload != self.payload:
                errors += 1
        if stamps or errors:
            self.gen.completed(self, stamps, errors)


NATS_CONNECT: Final = (
    b"CONNECT "
    + json.dumps(
        {
            "verbose": False,
            "pedantic": False,
            "tls_required": False,
            "name": "bench",
            "lang": "python-asyncio",
            "version": "0",
            "protocol": 1,
            "headers": False,
        },
        separators=(",", ":"),
    ).encode()
    + b"\r\n"
)


def nats_control(peer: Client | Worker, line: bytes, subscribe: bytes) -> None:
    """INFO -> CONNECT + SUB + PING; PONG -> ready; PING -> PONG; -ERR is fatal."""
    if line.startswith(b"INFO"):
        if not peer.ready.done():
            peer.write(NATS_CONNECT + subscribe + b"PING\r\n")
    elif line == b"PING":
        peer.write(b"PONG\r\n")
    elif line == b"PONG":
        if not peer.ready.done():
            peer.ready.set_result(None)
    elif line.startswith(b"-ERR"):
        why = line.decode(errors="replace")
        if not peer.ready.done():
            peer.ready.set_exception(ConnectionError(why))
        if isinstance(peer, Client):
            peer.gen.fail(f"nats: {why}")
        else:
            log(f"nats worker: {why}")


class NatsWorker(Worker):
    """SUB echo in queue group `workers`; each MSG is answered with PUB to its reply subject."""

    def __init__(self, capacity: int, hold: bool) -> None:
        super().__init__(capacity, hold)

    def handshake(self) -> None:
        pass  # the server speaks first (INFO)

    def data_received(self, data: bytes) -> None:
        msgs, ctl = split_nats(self.buf, data)
        for line in ctl:
            nats_control(self, line, b"SUB " + PIPELINE.encode() + b" workers 1\r\n")
        if not msgs:
            return
        out: list[bytes] = []
        for _, reply, payload in msgs:
            if reply is None:
                continue
            self.jobs += 1
            result = work(payload)
            out += (b"PUB %b %d\r\n" % (reply, len(result)), result, b"\r\n")
        self.answer(out)
