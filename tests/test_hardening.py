"""Hardening against hostile peers (issue 19, items 12-22): pure switchboard
rules as events in, actions out; the broker's own rules over loopback are in
tests/test_hardening_broker.py.
"""

from __future__ import annotations

from typing import Any

import msgpack

from reasonbroker.core.actions import Action, Close, Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.codecs import decode_body
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.packets import Codec, Result, ResultCode


def _results(actions: list[Action]) -> list[Result]:
    return [a.packet for a in actions if isinstance(a, Send) and isinstance(a.packet, Result)]


def _decoded(fields: dict[str, Any]) -> Any:
    return decode_body(msgpack.packb(fields, use_bin_type=True), Codec.MSGPACK)


# -- item 22: a HELLO whose token is not a string ---------------------------------


def test_hello_with_a_non_string_token_is_answered_unauthorized_then_closed() -> None:
    board = Switchboard(Limits())
    board.connect(1, ListenerRole.BOTH, token=b"s3cret-s3cret-s3cret")
    packet = _decoded({"packet_type": "HELLO", "role": "client", "token": 12345})
    out = board.receive(1, packet, 0.0)
    results = _results(out)
    assert [r.rc for r in results] == [ResultCode.UNAUTHORIZED]
    assert any(isinstance(a, Close) for a in out)
    # The answer comes before the close, as for any refused HELLO.
    kinds = [type(a) for a in out if isinstance(a, Send | Close)]
    assert kinds.index(Send) < kinds.index(Close)


def test_malformed_hello_without_a_token_listener_gets_bad_packet_not_a_close() -> None:
    board = Switchboard(Limits())
    board.connect(1, ListenerRole.BOTH)
    out = board.receive(1, _decoded({"packet_type": "HELLO", "token": [1, 2]}), 0.0)
    assert [r.rc for r in _results(out)] == [ResultCode.BAD_PACKET]
    assert not any(isinstance(a, Close) for a in out)
