"""Hardening against hostile peers (issue 19, items 12-22): pure switchboard
rules as events in, actions out; the broker's own rules over loopback are in
tests/test_hardening_broker.py.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from reasonbroker.core.actions import Action, Close, Log, Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.codecs import decode_body
from reasonbroker.core.errors import ConfigError
from reasonbroker.core.guard import LOG_ITEMS, LOG_TEXT_CHARS, clip
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.packets import (
    Cancel,
    Codec,
    Hello,
    Raw,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    new_cookie,
)


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


# -- items 12 and 20: limits on what peers name -----------------------------------

SMALL = Limits(
    max_pipeline_name_bytes=8,
    max_pipelines_per_worker=3,
    max_hello_name_bytes=10,
    max_hello_features=2,
    max_hello_feature_bytes=8,
)


def _worker(board: Switchboard, conn: int = 1) -> None:
    board.connect(conn, ListenerRole.BOTH)
    board.receive(conn, Hello(role=Role.WORKER), 0.0)


def _logs(actions: list[Action], event: str) -> list[Log]:
    return [a for a in actions if isinstance(a, Log) and a.event == event]


def test_register_with_a_long_pipeline_name_is_bad_packet_and_adds_nothing() -> None:
    board = Switchboard(SMALL)
    _worker(board)
    out = board.receive(1, Register(5, ("x" * 9,)), 0.0)
    assert [r.rc for r in _results(out)] == [ResultCode.BAD_PACKET]
    assert board.slots(1) == (0, 0)
    assert board.workers() == []


def test_pipeline_name_limit_counts_utf8_bytes() -> None:
    board = Switchboard(SMALL)
    _worker(board)
    out = board.receive(1, Register(1, ("\u00e9" * 5,)), 0.0)  # 5 chars, 10 bytes
    assert [r.rc for r in _results(out)] == [ResultCode.BAD_PACKET]
    out = board.receive(1, Register(1, ("\u00e9" * 4,)), 0.0)  # 8 bytes: fits
    assert _results(out) == []


def test_pipelines_per_worker_count_the_union_of_every_register() -> None:
    board = Switchboard(SMALL)
    _worker(board)
    assert _results(board.receive(1, Register(1, ("a", "b")), 0.0)) == []
    # Repeats, of this REGISTER's names and of earlier ones, count once.
    assert _results(board.receive(1, Register(1, ("a", "b", "c", "c", "a")), 0.0)) == []
    out = board.receive(1, Register(1, ("d",)), 0.0)
    assert [r.rc for r in _results(out)] == [ResultCode.BAD_PACKET]
    assert "max_pipelines_per_worker" in (_results(out)[0].error or "")
    assert board.slots(1) == (2, 0)


def test_worker_registered_logs_only_the_pipelines_added_and_clips_them() -> None:
    board = Switchboard(Limits())
    _worker(board)
    names = tuple(f"p{i:04}" for i in range(100))
    first = _logs(board.receive(1, Register(1, names), 0.0), "worker_registered")[0]
    assert first.fields["pipelines_total"] == 100
    logged = first.fields["pipelines"]
    assert len(logged) == LOG_ITEMS + 1 and logged[-1] == f"... ({100 - LOG_ITEMS} more)"
    again = _logs(board.receive(1, Register(1, (*names, "new")), 0.0), "worker_registered")[0]
    assert again.fields["pipelines"] == ["new"]
    assert again.fields["pipelines_total"] == 101


def test_run_with_a_long_pipeline_name_is_bad_packet() -> None:
    board = Switchboard(SMALL)
    _worker(board)
    board.receive(1, Register(1), 0.0)
    board.connect(2, ListenerRole.BOTH)
    cookie = new_cookie()
    out = board.receive(2, Run(cookie, "y" * 9, None), 0.0)
    assert [(r.cookie, r.rc) for r in _results(out)] == [(cookie, ResultCode.BAD_PACKET)]
    assert board.live_jobs == 0


@pytest.mark.parametrize(
    "hello",
    [
        Hello(role=Role.CLIENT, name="n" * 11),
        Hello(role=Role.CLIENT, features=("a", "b", "c")),
        Hello(role=Role.CLIENT, features=("f" * 9,)),
    ],
    ids=["name", "features-count", "feature-length"],
)
def test_hello_over_its_limits_is_bad_packet_then_closed(hello: Hello) -> None:
    board = Switchboard(SMALL)
    board.connect(1, ListenerRole.BOTH)
    out = board.receive(1, hello, 0.0)
    assert [r.rc for r in _results(out)] == [ResultCode.BAD_PACKET]
    assert any(isinstance(a, Close) for a in out)
    assert not any(isinstance(a, Send) and isinstance(a.packet, Hello) for a in out)


def test_hello_within_its_limits_is_welcome() -> None:
    board = Switchboard(SMALL)
    board.connect(1, ListenerRole.BOTH)
    out = board.receive(1, Hello(role=Role.CLIENT, name="n" * 10, features=("f" * 8, "g")), 0.0)
    assert any(isinstance(a, Send) and isinstance(a.packet, Hello) for a in out)


def test_clip_bounds_strings_lists_and_maps() -> None:
    assert clip("short") == "short"
    long = clip("z" * 10_000)
    assert len(long) < LOG_TEXT_CHARS + 40 and long.endswith("(9800 more chars)")
    clipped = clip({"a": ["q" * 500] * 1000})
    assert len(clipped["a"]) == LOG_ITEMS + 1
    assert all(len(x) < LOG_TEXT_CHARS + 40 for x in clipped["a"])
    assert clip(7) == 7 and clip(None) is None


@pytest.mark.parametrize(
    "field",
    [
        "max_pipeline_name_bytes",
        "max_pipelines_per_worker",
        "max_hello_name_bytes",
        "max_hello_features",
        "max_hello_feature_bytes",
    ],
)
def test_the_new_limits_are_validated(field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Limits(**{field: 0})
    assert info.value.key == field


# -- item 19: the pipeline-name cache is bounded in bytes -------------------------


def test_pipeline_name_cache_keeps_no_long_names_and_stays_small_in_bytes() -> None:
    from reasonbroker.core import codecs
    from reasonbroker.core.framing import encode

    codecs._PIPELINE_THEN3.clear()
    codecs._PIPELINE_THEN4.clear()
    for i in range(150):
        name = f"{i:03}" + "n" * 100_000
        frame = encode(Run(new_cookie(), name, "v"))
        assert name.encode() in frame  # still encoded right
    encode(Run(new_cookie(), "short", None))
    held = sum(len(k) + len(v) for k, v in codecs._PIPELINE_THEN4.items())
    held += sum(len(k) + len(v) for k, v in codecs._PIPELINE_THEN3.items())
    assert held < 1_000
    assert list(codecs._PIPELINE_THEN3) == ["short"]
    # The bound in bytes: entries x (the longest cached name, 4 bytes a char, + keys).
    bound = codecs._PACKED_NAMES_MAX * (4 * codecs._PACKED_NAME_MAX_CHARS + 40)
    assert bound < 2 * 1024 * 1024


# -- item 18: payload bytes budgeted; payloads kept raw on every msgpack path -------

BUDGET = Limits(
    max_frame_bytes=100,
    outbox_high_water_bytes=100,
    max_payload_bytes_per_client=100,
    max_payload_bytes_total=150,
)


def _client(board: Switchboard, conn: int) -> None:
    board.connect(conn, ListenerRole.BOTH)
    board.receive(conn, Hello(role=Role.CLIENT), 0.0)


def _run_rc(board: Switchboard, conn: int, cookie: bytes, size: int) -> ResultCode | None:
    out = board.receive(conn, Run(cookie, "p", Raw(msgpack.packb(b"x" * (size - 2)))), 0.0)
    results = _results(out)
    return results[0].rc if results else None


def test_payload_bytes_are_budgeted_per_client_and_in_total() -> None:
    board = Switchboard(BUDGET)
    _worker(board)
    board.receive(1, Register(1), 0.0)
    for conn in (2, 3, 4):
        _client(board, conn)
    first, second = new_cookie(), new_cookie()
    assert _run_rc(board, 2, first, 60) is None  # running
    assert _run_rc(board, 2, second, 30) is None  # queued: 90 for client 2
    out = board.receive(2, Run(new_cookie(), "p", Raw(msgpack.packb("y" * 18))), 0.0)
    (refused,) = _results(out)
    assert refused.rc is ResultCode.NO_CAPACITY
    assert "max_payload_bytes_per_client (100)" in (refused.error or "")
    assert _run_rc(board, 3, new_cookie(), 50) is None  # 140 in all
    out = board.receive(4, Run(new_cookie(), "p", Raw(msgpack.packb("z" * 18))), 0.0)
    assert "max_payload_bytes_total (150)" in (_results(out)[0].error or "")
    assert board.payload_bytes == 140
    # Endings release: a cancelled queued job, a finished one, a client gone.
    board.receive(2, Cancel(second), 0.0)
    assert board.payload_bytes == 110
    wcookie = next(iter(board._conns[1].running))
    board.receive(1, Result(wcookie, ResultCode.OK), 0.0)  # frees the slot: client 3's job runs
    assert board.payload_bytes == 50
    board.disconnect(3, 0.0)
    assert board.payload_bytes == 50  # running, though its client is gone: still held
    wcookie = next(iter(board._conns[1].running))
    board.receive(1, Result(wcookie, ResultCode.OK), 0.0)
    assert board.payload_bytes == 0
    assert board._conns[2].payload_bytes == 0


def test_a_client_gone_releases_its_queued_payloads() -> None:
    board = Switchboard(BUDGET)
    _worker(board)
    board.receive(1, Register(1), 0.0)
    _client(board, 2)
    for _ in range(3):
        assert _run_rc(board, 2, new_cookie(), 30) is None
    board.disconnect(2, 0.0)
    assert board.payload_bytes == 30  # the running one, until its worker answers
    board.disconnect(1, 0.0)
    assert board.payload_bytes == 0


def test_the_broker_decoder_keeps_payloads_raw_off_the_plain_path_too() -> None:
    import tracemalloc

    from reasonbroker.core.framing import PacketDecoder, encode

    variables = [f"s{i % 1000}" for i in range(200_000)]  # ~1 MB of short strings
    frame = encode(Run(new_cookie(), "p", variables, priority=5, timeout_ms=1_000))
    tracemalloc.start()
    try:
        (packet,) = PacketDecoder(8 * 1024 * 1024, raw_payloads=True).feed(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(packet, Run) and packet.priority == 5 and packet.timeout_ms == 1_000
    assert isinstance(packet.variables, Raw)
    assert packet.variables.value() == variables
    assert peak < 3 * len(frame), (peak, len(frame))  # decoded it would be > 10x
    # A decoder that decodes payloads (the SDK's) still does.
    (decoded,) = PacketDecoder(8 * 1024 * 1024).feed(frame)
    assert isinstance(decoded, Run) and decoded.variables == variables


def test_raw_map_reading_refuses_what_msgpack_refuses() -> None:
    from reasonbroker.core.codecs import _unpack_map, unpack_map_raw
    from reasonbroker.core.errors import RemoteProtocolError

    good = msgpack.packb({"packet_type": "RUN", "variables": [1, {"a": b"x"}], 7: None})
    assert unpack_map_raw(good)["variables"] == Raw(msgpack.packb([1, {"a": b"x"}]))
    assert unpack_map_raw(good)[7] is None
    for bad in (good + b"\x00", good[:-1], b"\x81\x91\x01\x02", b"\x81\xc1\x00"):
        with pytest.raises(RemoteProtocolError):
            _unpack_map(bad)
        with pytest.raises(RemoteProtocolError):
            unpack_map_raw(bad)
