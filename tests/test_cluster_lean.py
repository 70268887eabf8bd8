"""The node's lean NATS path (reasonbroker/cluster/lean.py) against a real nats-server.

It leans on two internals of nats-py (its parser calling `Client._process_msg`, and
publishes as commands on `Client._pending`): these tests are what fails if a nats-py
release changes them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[cluster]'")

import nats

from reasonbroker.cluster.lean import Lean, LeanMsg, encode_headers, parse_headers
from tests.natscluster import NatsCluster, nats_server

__all__ = ["nats_server"]  # the fixture, imported to be found by pytest

WAIT_S = 10.0


class _Inbox:
    """What a lean subscription got, with an event per message."""

    def __init__(self) -> None:
        self.got: list[LeanMsg] = []
        self.came = asyncio.Event()

    async def __call__(self, msg: LeanMsg) -> None:
        self.got.append(msg)
        self.came.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < n:
                self.came.clear()
                await self.came.wait()


def test_headers_are_encoded_and_parsed_as_nats_py_gives_them() -> None:
    block = encode_headers({"Nats-Msg-Id": "abc", "X": "1"})
    assert block == b"NATS/1.0\r\nNats-Msg-Id: abc\r\nX: 1\r\n\r\n"
    assert parse_headers(block) == {"Nats-Msg-Id": "abc", "X": "1"}
    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n"
    assert parse_headers(status) == {
        "Status": "408",
        "Description": "Request Timeout",
        "Nats-Pending-Messages": "5",
    }
    assert parse_headers(b"NATS/1.0 404\r\n\r\n") == {"Status": "404"}


async def test_a_lean_subscription_gets_its_messages_in_order_and_others_stay_nats_pys(
    nats_server: NatsCluster,
) -> None:
    """Messages on a lean subscription come to its callback in order, with data, reply
    and headers; a plain nats-py subscription on the same connection still gets its own;
    a callback that raises is counted and the next message still comes; after
    unsubscribe nothing more does."""
    nc = await nats.connect(nats_server.urls)
    other = await nats.connect(nats_server.urls)
    try:
        lean = Lean(nc)
        inbox = _Inbox()
        sub = await lean.subscribe("lean.a", inbox)
        plain: asyncio.Queue[Any] = asyncio.Queue()

        async def on_plain(msg: Any) -> None:
            await plain.put(msg)

        await nc.subscribe("plain.a", cb=on_plain)
        await nc.flush()
        for i in range(50):
            await other.publish("lean.a", str(i).encode(), reply=f"r.{i}")
        await other.publish("lean.a", b"h", headers={"K": "v", "Nats-Msg-Id": "m1"})
        await other.publish("plain.a", b"p", headers={"K": "w"})
        await inbox.until(51)
        assert [m.data for m in inbox.got[:50]] == [str(i).encode() for i in range(50)]
        assert [m.reply for m in inbox.got[:50]] == [f"r.{i}" for i in range(50)]
        assert inbox.got[0].subject == "lean.a" and inbox.got[0].headers is None
        assert inbox.got[50].headers == {"K": "v", "Nats-Msg-Id": "m1"}
        got = await asyncio.wait_for(plain.get(), WAIT_S)
        assert got.data == b"p" and got.headers == {"K": "w"}

        async def broken(msg: LeanMsg) -> None:
            raise RuntimeError("a callback's bug")

        after = _Inbox()
        await lean.subscribe("lean.broken", broken)
        await lean.subscribe("lean.after", after)
        await nc.flush()
        await other.publish("lean.broken", b"x")
        await other.publish("lean.after", b"y")
        await after.until(1)
        assert lean.errors == 1

        await sub.unsubscribe()
        await nc.flush()
        await other.publish("lean.a", b"late")
        await other.publish("lean.after", b"z")
        await after.until(2)  # published after "late" on the same connection: it came first
        assert len(inbox.got) == 51
        with pytest.raises(RuntimeError):
            Lean(nc)  # one per connection
    finally:
        await nc.close()
        await other.close()


async def test_a_lean_publish_arrives_with_its_headers_and_a_closed_connection_refuses(
    nats_server: NatsCluster,
) -> None:
    import nats.errors

    nc = await nats.connect(nats_server.urls)
    other = await nats.connect(nats_server.urls)
    try:
        lean = Lean(nc)
        got: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            await got.put(msg)

        await other.subscribe("pub.>", cb=on_msg)
        await other.flush()
        await lean.publish("pub.a", b"one")
        await lean.publish("pub.b", b"two", "reply.b", {"Nats-Msg-Id": "m2", "X": "y"})
        await lean.publish("pub.c", b"", "reply.c")
        a, b, c = [await asyncio.wait_for(got.get(), WAIT_S) for _ in range(3)]
        assert (a.subject, a.data, a.reply, a.headers) == ("pub.a", b"one", "", None)
        assert (b.subject, b.data, b.reply) == ("pub.b", b"two", "reply.b")
        assert b.headers == {"Nats-Msg-Id": "m2", "X": "y"}
        assert (c.subject, c.data, c.reply) == ("pub.c", b"", "reply.c")
        await nc.close()
        with pytest.raises(nats.errors.ConnectionClosedError):
            await lean.publish("pub.d", b"after close")  # nats-py's own publish refuses
    finally:
        await nc.close()
        await other.close()


async def test_a_jetstream_delivery_is_acked_and_nakked_through_its_lean_message(
    nats_server: NatsCluster,
) -> None:
    """A pull request's deliveries come to a lean inbox; the ack removes the job from
    the work queue, a nak has it delivered again (the delivery count in its metadata),
    and a no-wait request of an empty consumer ends with the server's 404 status."""
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

    nc = await nats.connect(nats_server.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(
            name="LEAN", subjects=["lean.jobs"], retention=RetentionPolicy.WORK_QUEUE
        )
        await js.add_consumer(
            "LEAN", ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT)
        )
        await js.publish("lean.jobs", b"job-1")
        await js.publish("lean.jobs", b"job-2")
        lean = Lean(nc)
        inbox = _Inbox()
        await lean.subscribe("lean.inbox", inbox)
        await nc.flush()
        next_subject = "$JS.API.CONSUMER.MSG.NEXT.LEAN.w"
        await lean.publish(next_subject, json.dumps({"batch": 2}).encode(), "lean.inbox")
        await inbox.until(2)
        first, second = inbox.got
        assert (first.data, second.data) == (b"job-1", b"job-2")
        assert first.metadata.num_delivered == 1
        await first.ack()
        await second.nak()
        await lean.publish(next_subject, json.dumps({"batch": 1}).encode(), "lean.inbox")
        await inbox.until(3)
        again = inbox.got[2]
        assert again.data == b"job-2" and again.metadata.num_delivered == 2
        await again.ack()
        async with asyncio.timeout(WAIT_S):
            while (await js.stream_info("LEAN")).state.messages:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # a poll: the removal has no event
        no_wait = json.dumps({"batch": 1, "no_wait": True}).encode()
        await lean.publish(next_subject, no_wait, "lean.inbox")
        await inbox.until(4)
        end = inbox.got[3]
        assert end.data == b"" and end.headers is not None and end.headers["Status"] == "404"
    finally:
        await nc.close()


def test_the_hot_paths_header_blocks_and_ack_reading_match_the_general_ones() -> None:
    from reasonbroker.cluster.requests import _PLAIN_ACK
    from reasonbroker.cluster.wire import CREATE_HEADER_BLOCK, create_headers, msg_id_block

    assert CREATE_HEADER_BLOCK == encode_headers(create_headers())
    assert msg_id_block(b"\x01\xff") == encode_headers({"Nats-Msg-Id": "01ff"})
    plain = _PLAIN_ACK.fullmatch(b'{"stream":"RB_JOBS","seq":123}')
    assert plain is not None and (plain[1], plain[2]) == (b"RB_JOBS", b"123")
    assert _PLAIN_ACK.fullmatch(b'{"stream":"RB_JOBS","domain":"hub","seq":7}') is not None
    # A duplicate or an error is read by the JSON parser (the caller needs what it says).
    assert _PLAIN_ACK.fullmatch(b'{"stream":"RB_JOBS","seq":3,"duplicate":true}') is None
    assert _PLAIN_ACK.fullmatch(b'{"error":{"code":400,"err_code":10071}}') is None
