"""reasonbroker's own protocol, both codecs: native length-framed msgpack and ReasonChip's
length-framed JSON SocketPacket (`reasonbroker-json`). Framing helpers, the generator's
client (RUN from a pre-packed template plus the cookie; PING/PONG as a barrier) and the
echo worker (HELLO, REGISTER capacity, RESULT per RUN).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import msgpack

from ..common import PIPELINE, log
from .base import Client, Worker, work

if TYPE_CHECKING:
    from ..loadgen import Gen


def split_frames(buf: bytearray, data: bytes) -> list[bytes]:
    """4-byte big-endian length + body (reasonbroker): the complete bodies in buf + data."""
    out: list[bytes] = []
    if not buf:
        n = len(data)
        pos = 0
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
            if end > n:
                break
            out.append(data[pos + 4 : end])
            pos = end
        if pos < n:
            buf += data[pos:]
        return out
    buf += data
    n = len(buf)
    pos = 0
    while n - pos >= 4:
        end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
        if end > n:
            break
        out.append(bytes(buf[pos + 4 : end]))
        pos = end
    if pos:
        del buf[:pos]
    return out


JSON_KEYS: Final = (
    "packet_type",
    "cookie",
    "capacity",
    "pipeline",
    "variables",
    "detach",
    "rc",
    "error",
    "stacktrace",
    "result",
)
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def rb_frame(packet: dict[str, Any], json_codec: bool) -> bytes:
    if json_codec:
        full: dict[str, Any] = dict.fromkeys(JSON_KEYS)  # a SocketPacket dumps every field
        full.update(packet)
        body = json.dumps(full, separators=(",", ":")).encode()
    else:
        body = _packb(packet)
    return len(body).to_bytes(4, "big") + body


def rb_loads(body: bytes, json_codec: bool) -> dict[str, Any]:
    obj = json.loads(body) if json_codec else msgpack.unpackb(body, raw=False)
    if not isinstance(obj, dict):
        raise ConnectionError(f"reasonbroker sent a {type(obj).__name__}, not a map")
    return obj


class RBClient(Client):
    """reasonbroker, native msgpack or ReasonChip JSON. RUN bodies are built from a template
    (packed once by msgpack/json) plus the per-job cookie."""

    def __init__(self, gen: Gen, payload: bytes, json_codec: bool, hello: bool = False) -> None:
        super().__init__(gen, payload)
        self.json = json_codec
        self.hello = hello
        self.pending: dict[Any, float] = {}
        self.seq = 0
        self.pongs: deque[asyncio.Future[None]] = deque()
        self.expect: bytes | str = payload.decode() if json_codec else payload
        if json_codec:
            mark = "@@COOKIE@@"
            doc: dict[str, Any] = dict.fromkeys(JSON_KEYS)
            doc.update(packet_type="RUN", cookie=mark, pipeline=PIPELINE, variables=self.expect)
            pre, post = json.dumps(doc, separators=(",", ":")).encode().split(mark.encode())
            size = len(pre) + 36 + len(post)
            self.head = size.to_bytes(4, "big") + pre
            self.tail = post
            h = os.urandom(10).hex()  # canonical UUID text: 8-4-4-4- then a 12-digit counter
            self.cookie_prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-"
        else:
            body = _packb(
                {
                    "packet_type": "RUN",
                    "pipeline": PIPELINE,
                    "variables": payload,
                    "cookie": bytes(16),
                }
            )
            assert body.endswith(b"\xc4\x10" + bytes(16))
            self.head = len(body).to_bytes(4, "big") + body[:-16]
            self.tail = b""
            self.cookie_bytes = os.urandom(8)

    def on_connect(self) -> None:
        if self.hello:
            self.write(
                rb_frame({"packet_type": "HELLO", "role": "client", "name": "bench"}, self.json)
            )
        else:
            self.ready.set_result(None)

    def send(self, stamps: list[float]) -> None:
        pending = self.pending
        head = self.head
        seq = self.seq
        out: list[bytes] = []
        if self.json:
            tail = self.tail
            prefix = self.cookie_prefix
            for s in stamps:
                seq += 1
                cookie = f"{prefix}{seq:012x}"
                pending[cookie] = s
                out += (head, cookie.encode(), tail)
        else:
            cb = self.cookie_bytes
            for s in stamps:
                seq += 1
                cookie_b = cb + seq.to_bytes(8, "big")
                pending[cookie_b] = s
                out += (head, cookie_b)
        self.seq = seq
        self.write(b"".join(out))

    def ping(self) -> asyncio.Future[None]:
        """A PING whose PONG proves the broker has processed everything sent before it."""
        fut: asyncio.Future[None] = self.gen.loop.create_future()
        self.pongs.append(fut)
        self.write(rb_frame({"packet_type": "PING"}, self.json))
        return fut

    def data_received(self, data: bytes) -> None:
        bodies = split_frames(self.buf, data)
        if not bodies:
            return
        pending = self.pending
        expect = self.expect
        stamps: list[float] = []
        errors = 0
        json_codec = self.json
        for body in bodies:
            d = rb_loads(body, json_codec)
            ptype = d.get("packet_type")
            if ptype == "RESULT":
                s = pending.pop(d.get("cookie"), None)
                if s is None:
                    self.gen.fail(f"reasonbroker: unmatched RESULT {d.get('rc')}: {d.get('error')}")
                    continue
                stamps.append(s)
                if d.get("rc") != "OK" or d.get("result") != expect:
                    if errors == 0 and self.gen.failure is None:
                        log(f"  job failed: {d.get('rc')} {d.get('error')}")
                    errors += 1
            elif ptype == "PING":
                self.write(rb_frame({"packet_type": "PONG"}, json_codec))
            elif ptype == "PONG":
                if self.pongs:
                    self.pongs.popleft().set_result(None)
            elif ptype == "HELLO" and not self.ready.done():
                self.ready.set_result(None)
        if stamps or errors:
            self.gen.completed(self, stamps, errors)


class RBWorker(Worker):
    """HELLO role worker, REGISTER capacity, then PING: its PONG proves the REGISTER landed."""

    def __init__(
        self, capacity: int, hold: bool, json_codec: bool, pipeline: str | None = None
    ) -> None:
        super().__init__(capacity, hold)
        self.json = json_codec
        self.pipeline = pipeline  # None: serve every pipeline
        self.pong = rb_frame({"packet_type": "PONG"}, json_codec)

    def handshake(self) -> None:
        j = self.json
        self.write(
            rb_frame({"packet_type": "HELLO", "role": "worker", "name": "bench-worker"}, j)
            + rb_frame(
                {"packet_type": "REGISTER", "capacity": self.capacity}
                | ({} if self.pipeline is None else {"pipelines": [self.pipeline]}),
                j,
            )
            + rb_frame({"packet_type": "PING"}, j)
        )

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        j = self.json
        for body in split_frames(self.buf, data):
            d = rb_loads(body, j)
            ptype = d.get("packet_type")
            if ptype == "RUN":
                self.jobs += 1
                result = work(d.get("variables"))
                if j:
                    out.append(
                        rb_frame(
                            {
                                "packet_type": "RESULT",
                                "cookie": d["cookie"],
                                "rc": "OK",
                                "result": result,
                            },
                            True,
                        )
                    )
                else:
                    res = _packb(
                        {
                            "packet_type": "RESULT",
                            "cookie": d["cookie"],
                            "rc": "OK",
                            "result": result,
                        }
                    )
                    out += (len(res).to_bytes(4, "big"), res)
            elif ptype == "PING":
                self.write(self.pong)
            elif ptype == "PONG":
                if not self.ready.done():
                    self.ready.set_result(None)
            elif ptype == "RESULT":  # the broker refused something of ours
                why = f"broker answered {d.get('rc')}: {d.get('error')}"
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(why))
                log(f"worker: {why}")
        if out:
            self.answer(out)
