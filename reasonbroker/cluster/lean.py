"""The node's NATS hot path, beside nats-py's: messages handed to their callback as the
parser reads them, publishes written as one pre-encoded command.

A job costs a node a few NATS messages each way (a publish and its acknowledgement, a
delivery, a KV create and its answer, a result event, an ack). nats-py turns each
message it reads into a `Msg` dataclass (subject and reply decoded, headers parsed into
a dict), puts it on its subscription's queue and hands it to the callback from that
subscription's task; and it builds each publish through subject validation and a header
encoder that checks every key with a regular expression. Profiled under
`scripts/bench --cluster` those were about a fifth of a node's CPU.

Here a subscription's callback is called from the connection's read loop with a
`LeanMsg` (data and reply as they came, headers parsed only if asked), in the order the
messages came; and `publish` appends the PUB/HPUB command to nats-py's pending buffer
and wakes its flusher, as nats-py's own publish does. Everything else (connecting,
reconnecting and resubscribing, PING/PONG, the flusher, JetStream API calls, other
subscriptions) stays nats-py's.

A callback must not block: it runs in the read loop, so one that waits stops every
message of the connection. (The node's callbacks only record what came and wake a
task.) This leans on two internals of nats-py, pinned by `tests/test_cluster_lean.py`:
its parser calls `Client._process_msg(sid, subject, reply, data, headers)` for every
message, and a publish is a command appended to `Client._pending` with the flusher
woken through `Client._flush_pending()`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog

_log = structlog.get_logger("reasonbroker.cluster")

Callback = Callable[["LeanMsg"], Awaitable[None]]

_ACK: Final = b""
_NAK: Final = b"-NAK"
_PROGRESS: Final = b"+WPI"
_TERM: Final = b"+TERM"


def encode_headers(headers: dict[str, str]) -> bytes:
    """A NATS header block (our own headers: keys are tokens, values have no newline)."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def parse_headers(raw: bytes) -> dict[str, str]:
    """A header block as nats-py gives it: an inline status ("NATS/1.0 408 Request
    Timeout") as "Status" (and "Description"), then each `Key: Value` line."""
    lines = raw.decode("utf-8", "replace").split("\r\n")
    out: dict[str, str] = {}
    first = lines[0]
    if first.startswith("NATS/1.0 "):
        status, _, description = first[len("NATS/1.0 ") :].strip().partition(" ")
        if status.isdigit():
            out["Status"] = status
        if description:
            out["Description"] = description
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


class LeanMsg:
    """A message as it came: `data` (bytes), `reply` (str), `subject` and `headers` on
    demand; a JetStream delivery is acked, nak'ed, termed or kept in progress by
    publishing to its reply subject, as nats-py's Msg does."""

    __slots__ = ("_headers", "_lean", "_raw_headers", "_subject", "data", "reply")

    def __init__(
        self, lean: Lean, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self._lean = lean
        self._subject = subject
        self.reply = reply.decode() if reply else ""
        self.data = data
        self._raw_headers = headers
        self._headers: dict[str, str] | None = None

    @property
    def subject(self) -> str:
        return self._subject.decode()

    @property
    def headers(self) -> dict[str, str] | None:
        if self._raw_headers is None:
            return None
        if self._headers is None:
            self._headers = parse_headers(self._raw_headers)
        return self._headers or None

    @property
    def metadata(self) -> Any:
        """nats-py's JetStream metadata of a delivery (parsed from the reply subject)."""
        from nats.aio.msg import Msg

        return Msg.Metadata._from_reply(self.reply)

    async def ack(self) -> None:
        await self._lean.publish(self.reply, _ACK)

    async def nak(self) -> None:
        await self._lean.publish(self.reply, _NAK)

    async def in_progress(self) -> None:
        await self._lean.publish(self.reply, _PROGRESS)

    async def term(self) -> None:
        await self._lean.publish(self.reply, _TERM)


class LeanSub:
    def __init__(self, lean: Lean, sub: Any) -> None:
        self._lean = lean
        self._sub = sub

    async def unsubscribe(self) -> None:
        self._lean._callbacks.pop(self._sub._id, None)
        await self._sub.unsubscribe()


class Lean:
    """The lean path on one nats-py connection (installed once per connection)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._callbacks: dict[int, Callback] = {}
        self.errors = 0  # callbacks that raised
        if getattr(nc, "_rb_lean", None) is not None:
            raise RuntimeError("a connection has one Lean")
        for name in ("_process_msg", "_pending", "_flush_pending"):
            if not hasattr(nc, name):
                raise RuntimeError(f"nats-py without Client.{name}: the lean path needs it")
        self._next = nc._process_msg
        nc._process_msg = self._process_msg
        nc._rb_lean = self

    async def subscribe(self, subject: str, cb: Callback) -> LeanSub:
        """Every message on `subject` to `cb`, from the read loop (it must not block).
        Resubscribed by nats-py after a reconnect, under the same id."""
        sub = await self._nc.subscribe(subject)  # no nats-py callback: none is delivered to it
        self._callbacks[sub._id] = cb
        return LeanSub(self, sub)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        cb = self._callbacks.get(sid)
        if cb is None:
            await self._next(sid, subject, reply, data, headers)
            return
        try:
            await cb(LeanMsg(self, subject, reply, data, headers))
        except Exception:
            self.errors += 1
            _log.exception("cluster_callback_failed", subject=subject.decode("utf-8", "replace"))

    async def publish(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: dict[str, str] | bytes | None = None,
    ) -> None:
        """What nats-py's publish does while connected; while not, nats-py's publish
        itself (it buffers, or refuses when its buffer is full). `headers` may be a
        block already encoded (`encode_headers`)."""
        nc = self._nc
        if not nc.is_connected:
            if isinstance(headers, bytes):
                headers = parse_headers(headers)
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        if headers:
            block = headers if isinstance(headers, bytes) else encode_headers(headers)
            cmd = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
                subject.encode(),
                reply.encode(),
                len(block),
                len(block) + len(payload),
                block,
                payload,
            )
        else:
            cmd = b"PUB %b %b %d\r\n%b\r\n" % (
                subject.encode(),
                reply.encode(),
                len(payload),
                payload,
            )
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            await nc._flush_pending(force_flush=True)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
