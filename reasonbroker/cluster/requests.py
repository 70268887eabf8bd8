"""JetStream requests of the hot path over one shared inbox, answered through futures.

Each job costs a node one JetStream publish (the client side's store) or one KV create
(the worker side's result): a request and its answer. nats-py's `request` gives every
one a NUID, a random token and a timer (`asyncio.wait_for`), and its `js.publish` parses
the answer into a dataclass by introspection; at a thousand jobs a second those are a
good share of a node's CPU. Here a request is a counter token under one subscribed
inbox and a bare future; one sweep, a few times a second, times out the late ones
(`nats.errors.TimeoutError`, as nats-py raises). Requests and answers take the
connection's lean path (lean.py: no Msg objects, no per-subscription task).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, Final

import structlog

from .lean import Lean, LeanMsg

_log = structlog.get_logger("reasonbroker.cluster")

SWEEP_S: Final = 0.25  # how often late requests are timed out
ERR_WRONG_LAST_SEQUENCE: Final = 10071  # JetStream's err_code: the expected sequence differs
# A publish acknowledged and not a duplicate, as the server writes it.
_PLAIN_ACK: Final = re.compile(rb'\{"stream":"([^"\\]*)",(?:"domain":"[^"\\]*",)?"seq":(\d+)\}')


class PublishError(Exception):
    """JetStream refused the publish; `err_code` says why (the stream's API error code)."""

    def __init__(self, description: str, err_code: int) -> None:
        super().__init__(description)
        self.err_code = err_code


class Requests:
    def __init__(self, nc: Any, timeout_s: float) -> None:
        self._nc = nc
        self.lean = Lean(nc)  # the connection's lean path, shared with the bridge
        self._timeout_s = timeout_s
        self._prefix = ""
        self._next = 0
        # token -> (the answer's future, when it is late)
        self._pending: dict[str, tuple[asyncio.Future[LeanMsg], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = f"{self._nc.new_inbox()}."
        self._sub = await self.lean.subscribe(f"{self._prefix}*", self._answer)
        self._sweeper = asyncio.create_task(self._sweep(), name="cluster request timeouts")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for future, _ in self._pending.values():
            if not future.done():
                future.cancel()

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | bytes
    ) -> LeanMsg:
        """The answer (a LeanMsg) to a request, or nats' TimeoutError or NoRespondersError."""
        import nats.errors

        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[LeanMsg] = loop.create_future()
        self._pending[token] = (future, loop.time() + self._timeout_s)
        try:
            await self.lean.publish(subject, payload, self._prefix + token, headers)
            msg = await future
        finally:
            self._pending.pop(token, None)
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | bytes) -> Any:
        """A JetStream publish: its acknowledgement as a map ("seq", "duplicate", ...), or
        PublishError with the stream's reason."""
        msg = await self.request(subject, payload, headers)
        plain = _PLAIN_ACK.fullmatch(msg.data)
        if plain is not None:  # the usual answer, read without the JSON parser
            return {"stream": plain[1].decode(), "seq": int(plain[2])}
        ack = json.loads(msg.data)
        error = ack.get("error")
        if error is not None:
            raise PublishError(str(error.get("description", error)), int(error.get("err_code", 0)))
        return ack

    async def _answer(self, msg: LeanMsg) -> None:
        entry = self._pending.get(msg.subject[len(self._prefix) :])
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    async def _sweep(self) -> None:
        import nats.errors

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            late_ones = 0
            for future, late in list(self._pending.values()):
                if late <= now and not future.done():
                    late_ones += 1
                    future.set_exception(nats.errors.TimeoutError())
            if late_ones:
                _log.warning("cluster_requests_timed_out", requests=late_ones)
