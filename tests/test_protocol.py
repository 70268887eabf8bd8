"""Pure tests of the wire protocol (core packets, codecs, framing): both codecs, fields, encoding.

No sockets, no asyncio: bytes in, packets out (PROTOCOL.md sections 1-3, and the
legacy rules of section 6).
"""

from __future__ import annotations

import inspect
import json
import math
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import reasonbroker
from reasonbroker.core import codecs
from reasonbroker.core.actions import Send
from reasonbroker.core.errors import EncodeError, RemoteProtocolError
from reasonbroker.core.protocol import (
    HEADER_BYTES,
    LEGACY_RESULT_CODES,
    BadPacket,
    Cancel,
    Chunk,
    Codec,
    Hello,
    Packet,
    PacketDecoder,
    Ping,
    Pong,
    Progress,
    Raw,
    Record,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Shutdown,
    Started,
    Unsupported,
    can_carry,
    cookie_str,
    decode_body,
    encode,
    encode_into,
    for_legacy,
    packet_from_map,
    packet_to_map,
    payload_kind,
)

MAX = 1 << 20
C = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef").bytes
C_STR = "01234567-89ab-cdef-0123-456789abcdef"
C2 = bytes(range(16))

JSON_KEYS = {
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
}

THE_TEN = [
    ResultCode.OK,
    ResultCode.BAD_PACKET,
    ResultCode.UNSUPPORTED_PACKET_TYPE,
    ResultCode.NO_CAPACITY,
    ResultCode.COOKIE_NOT_FOUND,
    ResultCode.COOKIE_COLLISION,
    ResultCode.WORKER_WENT_AWAY,
    ResultCode.BROKER_WENT_AWAY,
    ResultCode.PROCESSOR_EXCEPTION,
    ResultCode.EXCEPTION,
]
OWN_CODES = [ResultCode.CANCELLED, ResultCode.TIMEOUT, ResultCode.UNAUTHORIZED]


# ---------------------------------------------------------------------------
# helpers


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def mp(d: dict[Any, Any]) -> bytes:
    """One msgpack frame for map `d`."""
    body: bytes = msgpack.packb(d, use_bin_type=True)
    return frame(body)


def js(d: dict[str, Any]) -> bytes:
    """One JSON frame for object `d`."""
    return frame(json.dumps(d).encode())


def decode_all(data: bytes, max_frame_bytes: int = MAX) -> list[Packet]:
    return PacketDecoder(max_frame_bytes).feed(data)


def decode_one(data: bytes) -> Packet:
    packets = decode_all(data)
    assert len(packets) == 1
    return packets[0]


def feed_bytewise(data: bytes) -> list[Packet]:
    dec = PacketDecoder(MAX)
    out: list[Packet] = []
    for i in range(len(data)):
        out.extend(dec.feed(data[i : i + 1]))
    assert dec.buffered == 0
    return out


# ---------------------------------------------------------------------------
# round trips

MSGPACK_PACKETS: list[Packet] = [
    Register(3),
    Register(2, ("a", "b")),
    Run(C, "p"),
    Run(C, "p", {"x": [1, 2.5, None, True], "b": b"\x00\xff"}, True, 5, 1000, 3),
    Run(C, "p", b"raw bytes", priority=-7),
    Run(C, "p", "text", max_attempts=1),
    Run(C, "p", "asks", ack=True),
    Run(C, "p", None, True, ack=True),
    Cancel(C),
    *[Result(C, rc) for rc in ResultCode],
    Result(C, ResultCode.PROCESSOR_EXCEPTION, "boom", ("frame 1", "frame 2"), {"partial": 1}),
    Result(C, ResultCode.OK, result=b"\x01\x02"),
    Hello(Role.CLIENT, "tok", ("started", "progress"), "me"),
    Hello(Role.WORKER),
    Hello(),
    Hello(Role.WORKER, features=("started",), version="1.2.3", heartbeat_ms=5000),
    Ping(),
    Pong(),
    Started(C),
    Progress(C, [1, 2, 3]),
    Progress(C),
    Shutdown(),
]

JSON_PACKETS: list[Packet] = [
    Register(3),
    Register(1, ("a",)),
    Run(C, "p"),
    Run(C, "p", '{"x": 1}', True),
    Run(C, "p", "v", False, 3, 250, 2),
    Run(C, "p", "v", ack=True),
    Cancel(C),
    *[Result(C, rc) for rc in ResultCode],
    Result(C, ResultCode.PROCESSOR_EXCEPTION, "boom", ("frame 1",), "partial"),
    Result(C, ResultCode.OK, result="done \u00e9\u4e2d"),
    Hello(Role.CLIENT, "tok", ("progress",), "me"),
    Hello(Role.WORKER, version="9", heartbeat_ms=1),
    Ping(),
    Pong(),
    Started(C),
    Progress(C, "half"),
    Progress(C),
    Shutdown(),
]


@pytest.mark.parametrize("packet", MSGPACK_PACKETS, ids=repr)
def test_msgpack_round_trip(packet: Packet) -> None:
    data = encode(packet)
    assert int.from_bytes(data[:HEADER_BYTES], "big") == len(data) - HEADER_BYTES
    dec = PacketDecoder(MAX)
    assert dec.feed(data) == [packet]
    assert dec.codec is Codec.MSGPACK
    assert dec.buffered == 0


@pytest.mark.parametrize("packet", JSON_PACKETS, ids=repr)
def test_json_round_trip(packet: Packet) -> None:
    data = encode(packet, Codec.JSON)
    assert data[HEADER_BYTES : HEADER_BYTES + 1] == b"{"
    dec = PacketDecoder(MAX)
    assert dec.feed(data) == [packet]
    assert dec.codec is Codec.JSON


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize(
    "rc", [ResultCode.UNAUTHORIZED, ResultCode.BAD_PACKET, ResultCode.UNSUPPORTED_PACKET_TYPE]
)
def test_cookieless_result_round_trip(rc: ResultCode, codec: Codec) -> None:
    # The broker's own answers may carry no cookie (UNAUTHORIZED to a HELLO, ...).
    packet = Result(None, rc, "why")
    assert decode_all(encode(packet, codec)) == [packet]


def test_default_codec_is_msgpack() -> None:
    assert encode(Ping()) == encode(Ping(), Codec.MSGPACK)
    assert encode(Ping())[HEADER_BYTES] in range(0x80, 0x90)


@pytest.mark.parametrize(
    ("packets", "codec"), [(MSGPACK_PACKETS, Codec.MSGPACK), (JSON_PACKETS, Codec.JSON)]
)
def test_byte_at_a_time_equals_whole_buffer(packets: list[Packet], codec: Codec) -> None:
    stream = b"".join(encode(p, codec) for p in packets)
    whole = decode_all(stream)
    assert whole == packets
    assert feed_bytewise(stream) == whole


def test_partial_feed_keeps_the_rest_buffered() -> None:
    data = encode(Run(C, "p", "v")) + encode(Cancel(C))
    dec = PacketDecoder(MAX)
    first_len = len(encode(Run(C, "p", "v")))
    assert dec.feed(data[: first_len + 2]) == [Run(C, "p", "v")]
    assert dec.buffered == 2
    assert dec.feed(data[first_len + 2 :]) == [Cancel(C)]
    assert dec.buffered == 0
    assert dec.feed(b"") == []


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(MSGPACK_PACKETS), min_size=1, max_size=30),
    st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40),
)
def test_random_split_points_give_the_same_packets(packets: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(p) for p in packets)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    dec = PacketDecoder(MAX)
    got: list[Packet] = []
    prev = 0
    for point in [*points, len(stream)]:
        got.extend(dec.feed(stream[prev:point]))
        prev = point
    assert got == packets
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(JSON_PACKETS), min_size=1, max_size=20),
    st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20),
)
def test_random_split_points_json(packets: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(p, Codec.JSON) for p in packets)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    dec = PacketDecoder(MAX)
    got: list[Packet] = []
    prev = 0
    for point in [*points, len(stream)]:
        got.extend(dec.feed(stream[prev:point]))
        prev = point
    assert got == packets


# ---------------------------------------------------------------------------
# framing errors: the connection is over (RemoteProtocolError)

_RUN_MAP = {"packet_type": "RUN", "cookie": C, "pipeline": "p"}
_RUN_BODY: bytes = msgpack.packb(_RUN_MAP, use_bin_type=True)

_PING_MP = mp({"packet_type": "PING"})
_PING_JS = js({"packet_type": "PING"})

# (name, bytes, the packets decoded before the error)
FRAMING_ERRORS: list[tuple[str, bytes, list[Packet]]] = [
    ("length 0", b"\x00\x00\x00\x00", []),
    ("length 0 after a good frame", mp(_RUN_MAP) + b"\x00\x00\x00\x00", [Run(C, "p")]),
    ("too long after a good frame", _PING_MP + b"\xff\xff\xff\xff", [Ping()]),
    ("msgpack array", frame(msgpack.packb([1, 2, 3])), []),
    ("msgpack int", frame(msgpack.packb(7)), []),
    ("msgpack string", frame(msgpack.packb("RUN")), []),
    ("msgpack nil", frame(b"\xc0"), []),
    ("JSON array", frame(b'[{"packet_type": "PING"}]'), []),
    ("JSON string", frame(b'"PING"'), []),
    ("leading whitespace before {", frame(b' {"packet_type": "PING"}'), []),
    ("plain text", frame(b"hello"), []),
    ("truncated msgpack", frame(_RUN_BODY[:-3]), []),
    ("msgpack with trailing bytes", frame(_RUN_BODY + b"\x00"), []),
    ("msgpack invalid utf-8 str", frame(b"\x81\xabpacket_type\xa2\xff\xfe"), []),
    ("msgpack map with an unhashable key", frame(b"\x81\x91\x01\x01"), []),
    ("msgpack huge declared array", frame(b"\x81\xa1v\xdd\xff\xff\xff\xff"), []),
    ("msgpack huge declared str", frame(b"\x81\xa1v\xdb\xff\xff\xff\xff"), []),
    ("invalid JSON", frame(b'{"packet_type":'), []),
    ("JSON with trailing garbage", frame(b'{"packet_type": "PING"} x'), []),
    ("JSON invalid utf-8", frame(b'{"packet_type": "\xff"}'), []),
    ("msgpack then JSON", _PING_MP + _PING_JS, [Ping()]),
    ("JSON then msgpack", _PING_JS + _PING_MP, [Ping()]),
]


def _feed_until_error(dec: PacketDecoder, chunks: list[bytes]) -> list[Packet]:
    """Feed chunks; the bad frame must raise RemoteProtocolError, at the latest on the
    next feed (good packets before it in the same feed are returned first)."""
    got: list[Packet] = []
    with pytest.raises(RemoteProtocolError):
        for chunk in chunks:
            got.extend(dec.feed(chunk))
        dec.feed(b"")
    assert dec.error is not None
    with pytest.raises(RemoteProtocolError):  # final: every later feed raises too
        dec.feed(encode(Ping()))
    return got


@pytest.mark.parametrize(
    ("data", "before"),
    [(d, b) for _, d, b in FRAMING_ERRORS],
    ids=[n for n, _, _ in FRAMING_ERRORS],
)
def test_framing_error(data: bytes, before: list[Packet]) -> None:
    assert _feed_until_error(PacketDecoder(MAX), [data]) == before


@pytest.mark.parametrize(
    ("data", "before"),
    [(d, b) for _, d, b in FRAMING_ERRORS],
    ids=[n for n, _, _ in FRAMING_ERRORS],
)
def test_framing_error_byte_at_a_time(data: bytes, before: list[Packet]) -> None:
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert _feed_until_error(PacketDecoder(MAX), chunks) == before


def test_good_packets_before_garbage_are_returned_then_the_error() -> None:
    dec = PacketDecoder(MAX)
    data = encode(Run(C, "p")) + encode(Cancel(C)) + b"\x00\x00\x00\x05hello"
    assert dec.feed(data) == [Run(C, "p"), Cancel(C)]
    assert dec.buffered == 0
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"")


def test_oversized_length_raises_from_the_header_alone() -> None:
    dec = PacketDecoder(1024)
    header = (1025).to_bytes(HEADER_BYTES, "big")
    assert dec.feed(header[:3]) == []  # not yet a whole header
    with pytest.raises(RemoteProtocolError, match="1025"):
        dec.feed(header[3:])


def test_oversized_length_raises_with_the_whole_header_at_once() -> None:
    with pytest.raises(RemoteProtocolError):
        PacketDecoder(10).feed((0xFFFFFFFF).to_bytes(HEADER_BYTES, "big"))


def test_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    body: bytes = msgpack.packb({"packet_type": "PING", "pad": "x" * 50})
    assert PacketDecoder(len(body)).feed(frame(body)) == [Ping()]
    with pytest.raises(RemoteProtocolError):
        PacketDecoder(len(body) - 1).feed(frame(body))


def test_zero_length_header_raises_before_more_bytes() -> None:
    dec = PacketDecoder(MAX)
    with pytest.raises(RemoteProtocolError, match="0"):
        dec.feed(b"\x00\x00\x00\x00")


def test_codec_is_fixed_by_the_first_frame() -> None:
    dec = PacketDecoder(MAX)
    assert dec.codec is None
    assert dec.feed(js({"packet_type": "PING"})) == [Ping()]
    assert dec.codec is Codec.JSON
    with pytest.raises(RemoteProtocolError):
        dec.feed(mp({"packet_type": "PING"}))


def _nested_msgpack_map(depth: int) -> bytes:
    # {"packet_type": "RUN", "cookie": C, "pipeline": "p", "variables": [[[...nil...]]]}
    head: bytes = msgpack.packb(
        {"packet_type": "RUN", "cookie": C, "pipeline": "p"}, use_bin_type=True
    )
    assert head[0] == 0x83
    key: bytes = msgpack.packb("variables")
    return b"\x84" + head[1:] + key + b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize("depth", [10, 500, 1000, 5000, 100_000])
def test_deep_msgpack_nesting_is_a_packet_or_a_protocol_error(depth: int) -> None:
    try:
        packets = decode_all(frame(_nested_msgpack_map(depth)))
    except RemoteProtocolError:
        return
    assert len(packets) == 1
    assert isinstance(packets[0], Run)


@pytest.mark.parametrize("depth", [10, 500, 100_000])
def test_deep_json_nesting_is_a_packet_or_a_protocol_error(depth: int) -> None:
    body = b'{"packet_type": "PING", "x": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        packets = decode_all(frame(body))
    except RemoteProtocolError:
        return
    assert packets == [Ping()]


@pytest.mark.parametrize("depth", [10, 500, 1000])
def test_decoded_deep_msgpack_re_encodes(depth: int) -> None:
    """What the decoder accepts, the broker can forward (msgpack to msgpack)."""
    try:
        packet = decode_one(frame(_nested_msgpack_map(depth)))
    except RemoteProtocolError:
        return
    assert isinstance(packet, Run)
    # Compare bytes: == on a 1000-deep list recurses past Python's limit.
    assert encode(packet) == frame(_nested_msgpack_map(depth))


# ---------------------------------------------------------------------------
# field validation: BadPacket (answered, the connection stays), Unsupported

RUN_OK: dict[str, Any] = {"packet_type": "RUN", "cookie": C, "pipeline": "p"}
RESULT_OK: dict[str, Any] = {"packet_type": "RESULT", "cookie": C, "rc": "OK"}
REGISTER_OK: dict[str, Any] = {"packet_type": "REGISTER", "capacity": 1, "cookie": C}

# (name, map, salvaged cookie)
BAD_FIELDS: list[tuple[str, dict[str, Any], bytes | None]] = [
    ("cookie 15 bytes", {**RUN_OK, "cookie": b"x" * 15}, None),
    ("cookie 17 bytes", {**RUN_OK, "cookie": b"x" * 17}, None),
    ("cookie empty bytes", {**RUN_OK, "cookie": b""}, None),
    ("cookie int", {**RUN_OK, "cookie": 5}, None),
    ("cookie list", {**RUN_OK, "cookie": [1, 2]}, None),
    ("cookie missing", {"packet_type": "RUN", "pipeline": "p"}, None),
    ("cookie null", {**RUN_OK, "cookie": None}, None),
    ("cookie 36-char non-UUID", {**RUN_OK, "cookie": "x" * 36}, None),
    ("cookie 35 chars", {**RUN_OK, "cookie": C_STR[:-1]}, None),
    ("cookie 32 hex chars", {**RUN_OK, "cookie": C_STR.replace("-", "")}, None),
    ("cancel cookie bad", {"packet_type": "CANCEL", "cookie": b"short"}, None),
    ("started cookie bad", {"packet_type": "STARTED", "cookie": 1}, None),
    ("progress cookie bad", {"packet_type": "PROGRESS", "cookie": "nope"}, None),
    ("result cookie bad", {"packet_type": "RESULT", "rc": "OK", "cookie": b"123"}, None),
    ("capacity 0", {**REGISTER_OK, "capacity": 0}, C),
    ("capacity negative", {**REGISTER_OK, "capacity": -3}, C),
    ("capacity bool", {**REGISTER_OK, "capacity": True}, C),
    ("capacity str", {**REGISTER_OK, "capacity": "3"}, C),
    ("capacity float", {**REGISTER_OK, "capacity": 2.0}, C),
    ("capacity missing", {"packet_type": "REGISTER"}, None),
    ("pipelines not a list", {**REGISTER_OK, "pipelines": "a"}, C),
    ("pipelines list of int", {**REGISTER_OK, "pipelines": ["a", 1]}, C),
    ("pipeline empty", {**RUN_OK, "pipeline": ""}, C),
    ("pipeline missing", {"packet_type": "RUN", "cookie": C}, C),
    ("pipeline int", {**RUN_OK, "pipeline": 5}, C),
    ("detach int", {**RUN_OK, "detach": 1}, C),
    ("detach str", {**RUN_OK, "detach": "true"}, C),
    ("timeout_ms 0", {**RUN_OK, "timeout_ms": 0}, C),
    ("timeout_ms negative", {**RUN_OK, "timeout_ms": -1}, C),
    ("timeout_ms float", {**RUN_OK, "timeout_ms": 1.5}, C),
    ("timeout_ms str", {**RUN_OK, "timeout_ms": "10"}, C),
    ("timeout_ms 2**31", {**RUN_OK, "timeout_ms": 2**31}, C),
    ("timeout_ms 2**64-1", {**RUN_OK, "timeout_ms": 2**64 - 1}, C),
    ("max_attempts 0", {**RUN_OK, "max_attempts": 0}, C),
    ("max_attempts negative", {**RUN_OK, "max_attempts": -2}, C),
    ("max_attempts bool", {**RUN_OK, "max_attempts": True}, C),
    ("ack int", {**RUN_OK, "ack": 1}, C),
    ("ack str", {**RUN_OK, "ack": "yes"}, C),
    ("priority str", {**RUN_OK, "priority": "high"}, C),
    ("priority float", {**RUN_OK, "priority": 1.0}, C),
    ("priority bool", {**RUN_OK, "priority": False}, C),
    ("rc unknown", {**RESULT_OK, "rc": "NOPE"}, C),
    ("rc lowercase", {**RESULT_OK, "rc": "ok"}, C),
    ("rc int", {**RESULT_OK, "rc": 0}, C),
    ("rc missing", {"packet_type": "RESULT", "cookie": C}, C),
    ("error int", {**RESULT_OK, "error": 5}, C),
    ("stacktrace str", {**RESULT_OK, "stacktrace": "line"}, C),
    ("stacktrace list of int", {**RESULT_OK, "stacktrace": ["a", 2]}, C),
    ("stacktrace map", {**RESULT_OK, "stacktrace": {"a": "b"}}, C),
    ("hello role unknown", {"packet_type": "HELLO", "role": "root", "cookie": C}, C),
    ("hello role int", {"packet_type": "HELLO", "role": 1}, None),
    ("hello features str", {"packet_type": "HELLO", "features": "started"}, None),
    ("hello token int", {"packet_type": "HELLO", "token": 1}, None),
    ("hello heartbeat str", {"packet_type": "HELLO", "heartbeat_ms": "5"}, None),
]


def _packet_type_of(d: dict[str, Any]) -> str:
    pt = d.get("packet_type")
    return pt if isinstance(pt, str) else ""


@pytest.mark.parametrize(
    ("d", "cookie"), [(d, c) for _, d, c in BAD_FIELDS], ids=[n for n, _, _ in BAD_FIELDS]
)
def test_bad_field_msgpack(d: dict[str, Any], cookie: bytes | None) -> None:
    packet = decode_one(mp(d))
    assert isinstance(packet, BadPacket)
    assert packet.packet_type == _packet_type_of(d)
    assert packet.cookie == cookie
    assert packet.why


def _to_json_map(d: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON form of a msgpack test map, or None if JSON cannot say the same thing."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, bytes):
            if len(value) != 16:
                return None  # a short bin cookie has no JSON form
            value = cookie_str(value)
        out[key] = value
    return out


JSON_BAD = [
    (n, m, c) for n, d, c in BAD_FIELDS if (m := _to_json_map(d)) is not None and n != "cookie list"
]


@pytest.mark.parametrize(
    ("d", "cookie"), [(d, c) for _, d, c in JSON_BAD], ids=[n for n, _, _ in JSON_BAD]
)
def test_bad_field_json(d: dict[str, Any], cookie: bytes | None) -> None:
    packet = decode_one(js(d))
    assert isinstance(packet, BadPacket)
    assert packet.cookie == cookie


@pytest.mark.parametrize(
    "variables", [{"a": 1}, 5, [1, 2], True, 1.5], ids=["object", "int", "list", "bool", "float"]
)
def test_json_variables_must_be_a_string(variables: Any) -> None:
    d = {"packet_type": "RUN", "cookie": C_STR, "pipeline": "p", "variables": variables}
    packet = decode_one(js(d))
    assert isinstance(packet, BadPacket)
    assert packet.packet_type == "RUN"
    assert packet.cookie == C


@pytest.mark.parametrize("ptype", ["RESULT", "PROGRESS"])
def test_json_result_must_be_a_string(ptype: str) -> None:
    d = {"packet_type": ptype, "cookie": C_STR, "rc": "OK", "result": {"a": 1}}
    packet = decode_one(js(d))
    assert isinstance(packet, BadPacket)
    assert packet.cookie == C


def test_msgpack_variables_may_be_anything() -> None:
    value = {"nested": [1, {"b": b"\x00"}], "n": None, "f": 1.25}
    assert decode_one(mp({**RUN_OK, "variables": value})) == Run(C, "p", value)


@pytest.mark.parametrize(
    "d",
    [
        {"cookie": C},
        {"packet_type": None, "cookie": C},
        {"packet_type": 5, "cookie": C},
        {"packet_type": b"RUN", "cookie": C},
    ],
    ids=["missing", "null", "int", "bytes"],
)
def test_packet_type_missing_or_not_a_string(d: dict[str, Any]) -> None:
    assert decode_one(mp(d)) == BadPacket("", C, "packet_type is missing or not a string")


def test_packet_type_missing_without_cookie() -> None:
    packet = decode_one(mp({"x": 1}))
    assert isinstance(packet, BadPacket)
    assert packet.cookie is None


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"packet_type": "FROB", "cookie": C}, Unsupported("FROB", C)),
        ({"packet_type": "FROB"}, Unsupported("FROB", None)),
        ({"packet_type": "FROB", "cookie": b"bad"}, Unsupported("FROB", None)),
        ({"packet_type": "run", "cookie": C}, Unsupported("run", C)),
        ({"packet_type": "", "cookie": C}, Unsupported("", C)),
    ],
)
def test_unknown_packet_type_is_unsupported(d: dict[str, Any], expected: Packet) -> None:
    assert decode_one(mp(d)) == expected


def test_unknown_packet_type_json_salvages_the_cookie() -> None:
    assert decode_one(js({"packet_type": "FROB", "cookie": C_STR})) == Unsupported("FROB", C)


def test_shutdown_decodes() -> None:
    assert decode_one(mp({"packet_type": "SHUTDOWN"})) == Shutdown()


def test_uuid_string_cookie_accepted_in_msgpack() -> None:
    assert decode_one(mp({**RUN_OK, "cookie": C_STR})) == Run(C, "p")
    assert decode_one(mp({**RUN_OK, "cookie": C_STR.upper()})) == Run(C, "p")


def test_json_cookie_is_the_canonical_string() -> None:
    assert decode_one(js({"packet_type": "CANCEL", "cookie": C_STR})) == Cancel(C)


@pytest.mark.parametrize(
    "text",
    [
        "urn:0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef----",
        "----0123456789abcdef0123456789abcdef",
        "0123456789abcdef-0123456789abcdef---",
    ],
)
def test_non_canonical_36_char_cookie_is_bad(text: str) -> None:
    assert len(text) == 36
    packet = decode_one(mp({"packet_type": "CANCEL", "cookie": text}))
    assert isinstance(packet, BadPacket)


def _reference_cookie(text: str) -> bytes | str:
    """What the cookie reader did before its fast path: uuid.UUID decides."""
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return "cookie is not a UUID"
    if len(text) != 36 or str(parsed) != text.lower():
        return "cookie is not a canonical UUID string"
    return parsed.bytes


_HEXISH = st.sampled_from("0123456789abcdefABCDEF-g {}:u ")


@settings(max_examples=400)
@given(
    st.uuids().map(str)
    | st.uuids().map(lambda u: str(u).upper())
    | st.uuids().map(lambda u: "{" + str(u) + "}")
    | st.text(_HEXISH, min_size=30, max_size=40)
    | st.text(max_size=40)
)
@example(" 123456789abcdef0123456789abcdef0123")
@example("01234567-89ab-cdef-0123-456789abcde ")
@example("01234567-89ab-cdef-0123-4567  89abcd")  # fromhex would skip the spaces
@example("01234567-89ab-cdef-0123-4567\u0661\u06629abcdef")
def test_cookie_text_is_read_as_uuid_reads_it(text: str) -> None:
    # The canonical form is read by a fast path (bytes.fromhex); whatever
    # the text, the outcome must be what uuid.UUID's reading gave.
    reference = _reference_cookie(text)
    packet = decode_one(mp({"packet_type": "CANCEL", "cookie": text}))
    if isinstance(reference, bytes):
        assert packet == Cancel(reference)
    else:
        assert isinstance(packet, BadPacket)
        assert packet.why == reference


@given(st.binary(min_size=16, max_size=16))
def test_cookie_text_is_uuids_canonical_form(cookie: bytes) -> None:
    assert cookie_str(cookie) == str(uuid.UUID(bytes=cookie))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(sorted(JSON_KEYS)) | st.text(max_size=8), _JSON_VALUES))
def test_flat_json_is_what_json_dumps_writes(d: dict[str, Any]) -> None:
    # Per-job JSON packets are written by hand (codecs._json_flat); when
    # it takes a map, the text must be exactly json.dumps' for it.
    flat = codecs._json_flat(d)
    if all(v is None or type(v) in (str, bool, int) for v in d.values()):
        assert flat == json.dumps(d, separators=(",", ":"), ensure_ascii=False)
    else:
        assert flat is None


def _json_loads_or_error(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        return type(exc)


@settings(max_examples=300)
@given(
    st.builds(
        lambda obj, lead, trail, junk: (
            (lead + json.dumps(obj, ensure_ascii=False) + trail).encode("utf-8", "surrogatepass")
            + junk
        ),
        st.dictionaries(st.text(max_size=5), _JSON_VALUES, max_size=4),
        st.sampled_from(["", " ", "\n"]),
        st.sampled_from(["", " ", "\r\n", " x", "}"]),
        st.sampled_from([b"", b"\x00", b"\xff", b" "]),
    )
    | st.binary(max_size=40)
)
@example(b'{"a":1}  \x0b')  # not JSON whitespace
@example(b'{"a":"\xed\xa0\x80"}')  # a surrogate, as surrogatepass lets json.loads read it
@example(b"{\x00\x00\x00")
def test_json_bodies_are_read_as_json_loads_reads_them(data: bytes) -> None:
    # The JSON reader skips json.loads' wrappers for a body starting "{"; it
    # must give json.loads' object, or step aside (None) for json.loads to
    # give its error or its reading of other encodings.
    fast = codecs._json_object(data)
    if fast is not None:
        assert fast == _json_loads_or_error(data)
        assert isinstance(fast, dict)


def test_unknown_extra_keys_are_ignored() -> None:
    d: dict[Any, Any] = {**RUN_OK, "zzz": [1, 2], "future_field": {"a": "b"}, 7: "int key"}
    assert decode_one(mp(d)) == Run(C, "p")
    j = {**RUN_OK, "cookie": C_STR, "zzz": 1, "extra": {"x": None}}
    assert decode_one(js(j)) == Run(C, "p")


RUN_NULLS = {
    "variables": None,
    "detach": None,
    "priority": None,
    "timeout_ms": None,
    "max_attempts": None,
}


def test_null_and_absent_fields_are_alike() -> None:
    assert decode_one(mp({**RUN_OK, **RUN_NULLS})) == decode_one(mp(RUN_OK)) == Run(C, "p")
    result_nulls = {"error": None, "stacktrace": None, "result": None}
    assert decode_one(mp({**RESULT_OK, **result_nulls})) == Result(C, ResultCode.OK)
    hello_nulls = {"role": None, "token": None, "features": None, "name": None}
    assert decode_one(mp({"packet_type": "HELLO", **hello_nulls})) == Hello()
    assert decode_one(mp({**REGISTER_OK, "pipelines": None})) == Register(1)


def test_reasonchip_style_json_with_all_ten_keys() -> None:
    # What ReasonChip's pydantic SocketPacket dumps: every key, null when unset.
    run = dict.fromkeys(JSON_KEYS)
    run.update(packet_type="RUN", cookie=C_STR, pipeline="p", variables='{"a": 1}', detach=False)
    assert decode_one(js(run)) == Run(C, "p", '{"a": 1}')
    reg = dict.fromkeys(JSON_KEYS)
    reg.update(packet_type="REGISTER", capacity=4)
    assert decode_one(js(reg)) == Register(4)
    res = dict.fromkeys(JSON_KEYS)
    res.update(packet_type="RESULT", cookie=C_STR, rc="PROCESSOR_EXCEPTION", stacktrace=["a"])
    assert decode_one(js(res)) == Result(C, ResultCode.PROCESSOR_EXCEPTION, None, ("a",))


@pytest.mark.parametrize("rc", list(ResultCode))
def test_every_result_code_decodes(rc: ResultCode) -> None:
    assert decode_one(mp({**RESULT_OK, "rc": rc.value})) == Result(C, rc)


def test_timeout_ms_bounds() -> None:
    # A deadline must stay a finite float: timeout_ms is at most a signed 32-bit count.
    top = 2**31 - 1
    assert decode_one(mp({**RUN_OK, "timeout_ms": top})) == Run(C, "p", timeout_ms=top)
    assert decode_one(mp({**RUN_OK, "timeout_ms": 1})) == Run(C, "p", timeout_ms=1)


def test_run_defaults() -> None:
    run = decode_one(mp(RUN_OK))
    assert run == Run(C, "p", None, False, 0, None, None)


@pytest.mark.parametrize("field", ["variables", "pipeline"])
def test_decoded_json_strings_can_be_re_encoded(field: str) -> None:
    """A lone surrogate is valid JSON escaping but no codec can send it on: refused."""
    body = b'{"packet_type": "RUN", "cookie": "%s", "pipeline": "p", "%s": "\\ud800"}' % (
        C_STR.encode(),
        field.encode(),
    )
    try:
        packet = decode_one(frame(body))
    except RemoteProtocolError:
        return  # refusing it at the door is fine
    if isinstance(packet, BadPacket):
        return
    for codec in Codec:
        encode(packet, codec)  # what was accepted can be forwarded


@pytest.mark.parametrize(
    "d",
    [
        {"packet_type": "RESULT", "cookie": C_STR, "rc": "OK", "error": "\ud800"},
        {"packet_type": "RESULT", "cookie": C_STR, "rc": "OK", "stacktrace": ["ok", "\udfff"]},
        {"packet_type": "PROGRESS", "cookie": C_STR, "result": "x\ud800y"},
        {"packet_type": "HELLO", "features": ["\ud800"]},
    ],
)
def test_lone_surrogates_are_refused_wherever_they_would_be_forwarded(d: dict[str, Any]) -> None:
    data = js(d)  # json.dumps escapes the surrogate as \ud800
    assert b"\\ud" in data
    try:
        packet = decode_one(data)
    except RemoteProtocolError:
        return
    assert isinstance(packet, BadPacket)


# ---------------------------------------------------------------------------
# encoding


def _json_body(data: bytes) -> dict[str, Any]:
    obj = json.loads(data[HEADER_BYTES:])
    assert isinstance(obj, dict)
    return obj


@pytest.mark.parametrize(
    "packet",
    [
        Run(C, "p"),
        Run(C, "p", "vars", True),
        Cancel(C),
        Register(2),
        Result(C, ResultCode.OK, result="r"),
        Result(None, ResultCode.BAD_PACKET, "why"),
        Shutdown(),
    ],
    ids=repr,
)
def test_json_has_exactly_the_ten_reasonchip_keys(packet: Packet) -> None:
    body = _json_body(encode(packet, Codec.JSON))
    assert set(body) == JSON_KEYS


def test_json_nulls_and_cookie_form() -> None:
    body = _json_body(encode(Run(C, "pipe", "v"), Codec.JSON))
    assert body == {
        "packet_type": "RUN",
        "cookie": C_STR,
        "capacity": None,
        "pipeline": "pipe",
        "variables": "v",
        "detach": None,
        "rc": None,
        "error": None,
        "stacktrace": None,
        "result": None,
    }
    upper = uuid.UUID(bytes=bytes([0xAB] * 16))
    cookie = _json_body(encode(Cancel(upper.bytes), Codec.JSON))["cookie"]
    assert cookie == str(upper)
    assert cookie == cookie.lower()
    assert [len(part) for part in cookie.split("-")] == [8, 4, 4, 4, 12]


def test_json_result_fields() -> None:
    body = _json_body(
        encode(Result(C, ResultCode.PROCESSOR_EXCEPTION, "e", ("a", "b"), "r"), Codec.JSON)
    )
    assert body["rc"] == "PROCESSOR_EXCEPTION"
    assert body["error"] == "e"
    assert body["stacktrace"] == ["a", "b"]
    assert body["result"] == "r"
    assert body["cookie"] == C_STR


def test_json_result_without_cookie_is_null() -> None:
    assert _json_body(encode(Result(None, ResultCode.BAD_PACKET), Codec.JSON))["cookie"] is None


def test_json_extensions_ride_along() -> None:
    body = _json_body(encode(Run(C, "p", None, False, 2, 100, 3), Codec.JSON))
    assert (body["priority"], body["timeout_ms"], body["max_attempts"]) == (2, 100, 3)
    hello = _json_body(encode(Hello(Role.WORKER, features=("a",)), Codec.JSON))
    assert hello["role"] == "worker"
    assert hello["features"] == ["a"]


def test_msgpack_cookie_is_16_byte_bin() -> None:
    body = msgpack.unpackb(encode(Cancel(C))[HEADER_BYTES:], raw=False)
    assert body == {"packet_type": "CANCEL", "cookie": C}


def test_msgpack_leaves_unset_fields_out() -> None:
    body = msgpack.unpackb(encode(Run(C, "p"))[HEADER_BYTES:], raw=False)
    assert body == {"packet_type": "RUN", "cookie": C, "pipeline": "p"}


@pytest.mark.parametrize(
    "packet",
    [
        Run(C, "p", b"bytes"),
        Run(C, "p", {"a": 1}),
        Run(C, "p", 5),
        Run(C, "p", ["x"]),
        Result(C, ResultCode.OK, result=b"r"),
        Result(C, ResultCode.OK, result=7),
        Progress(C, b"p"),
        Progress(C, {"a": 1}),
    ],
    ids=repr,
)
def test_non_string_payload_to_json_is_an_encode_error(packet: Packet) -> None:
    with pytest.raises(EncodeError):
        encode(packet, Codec.JSON)
    encode(packet, Codec.MSGPACK)  # msgpack carries it


@pytest.mark.parametrize("packet", [Unsupported("X"), BadPacket("RUN", None, "why")], ids=repr)
@pytest.mark.parametrize("codec", list(Codec))
def test_inbound_only_packets_cannot_be_encoded(packet: Packet, codec: Codec) -> None:
    with pytest.raises(EncodeError):
        encode(packet, codec)


@pytest.mark.parametrize("value", [object(), 2**70, {1, 2}], ids=["object", "big int", "set"])
def test_unpackable_msgpack_is_an_encode_error_and_the_packer_recovers(value: Any) -> None:
    with pytest.raises(EncodeError):
        encode(Run(C, "p", value))
    # The shared packer must not keep half a packet around.
    assert decode_all(encode(Run(C, "p", "v"))) == [Run(C, "p", "v")]


def test_json_unicode_is_utf8() -> None:
    data = encode(Run(C, "p", "\u00e9\u4e2d"), Codec.JSON)
    assert "\u00e9\u4e2d".encode() in data
    assert decode_one(data) == Run(C, "p", "\u00e9\u4e2d")


# ---------------------------------------------------------------------------
# legacy mapping, can_carry


def test_legacy_codes_are_reasonchips_ten() -> None:
    assert set(THE_TEN) == LEGACY_RESULT_CODES
    assert [rc.value for rc in list(ResultCode)[:10]] == [rc.value for rc in THE_TEN]


@pytest.mark.parametrize("rc", OWN_CODES)
def test_for_legacy_maps_own_codes_to_exception(rc: ResultCode) -> None:
    got = for_legacy(Result(C, rc, "the message", ("st",), "res"))
    assert got == Result(C, ResultCode.EXCEPTION, f"{rc.value}: the message", ("st",), "res")
    assert for_legacy(Result(None, rc)) == Result(None, ResultCode.EXCEPTION, rc.value)


@pytest.mark.parametrize("rc", THE_TEN)
def test_for_legacy_leaves_the_ten_alone(rc: ResultCode) -> None:
    packet = Result(C, rc, "msg", ("a",), "r")
    assert for_legacy(packet) == packet


def test_for_legacy_cancelled_text() -> None:
    got = for_legacy(Result(C, ResultCode.CANCELLED, "cancelled by client"))
    assert got.error == "CANCELLED: cancelled by client"


@pytest.mark.parametrize(
    ("value", "json_ok"),
    [
        (None, True),
        ("text", True),
        ("", True),
        (b"bytes", False),
        (1, False),
        (1.5, False),
        (True, False),
        ([], False),
        ({"a": "b"}, False),
    ],
)
def test_can_carry(value: Any, json_ok: bool) -> None:
    assert can_carry(value, Codec.JSON) is json_ok
    assert can_carry(value, Codec.MSGPACK) is True


def test_cookie_str() -> None:
    assert cookie_str(C) == C_STR
    assert cookie_str(None) is None


# ---------------------------------------------------------------------------
# fuzz: the decoder raises RemoteProtocolError or returns packets, nothing else

PACKET_TYPES = [
    "RUN",
    "RESULT",
    "CANCEL",
    "REGISTER",
    "HELLO",
    "PING",
    "PONG",
    "STARTED",
    "PROGRESS",
    "SHUTDOWN",
    "FROB",
]
KEYS = [
    "packet_type",
    "cookie",
    "capacity",
    "pipeline",
    "pipelines",
    "variables",
    "detach",
    "rc",
    "error",
    "stacktrace",
    "result",
    "priority",
    "timeout_ms",
    "max_attempts",
    "ack",
    "role",
    "token",
    "features",
    "name",
    "version",
    "heartbeat_ms",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from([C, C_STR, "OK", "TIMEOUT", "client", "worker", "p", ""]),
    st.sampled_from(PACKET_TYPES),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MAPS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8) | st.builds(
    lambda pt, rest: {"packet_type": pt, **rest},
    st.sampled_from(PACKET_TYPES),
    st.dictionaries(st.sampled_from(KEYS[1:]), VALUES, max_size=8),
)


def _decode_safely(data: bytes) -> list[Packet]:
    dec = PacketDecoder(4096)
    try:
        return dec.feed(data)
    except RemoteProtocolError:
        return []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for packet in _decode_safely(data):
        assert isinstance(packet, Packet)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_arbitrary_bodies_in_good_frames(body: bytes) -> None:
    for packet in _decode_safely(frame(body)):
        assert isinstance(packet, Packet)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.sampled_from([b"\x81", b"\x8f", b"\xde", b"{"]))
def test_fuzz_bodies_that_look_like_maps(body: bytes, first: bytes) -> None:
    for packet in _decode_safely(frame(first + body)):
        assert isinstance(packet, Packet)


@settings(max_examples=150, deadline=None)
@given(MAPS)
def test_fuzz_msgpack_maps_decode_and_re_encode(d: dict[str, Any]) -> None:
    """Any msgpack map gives a packet; a packet that is not BadPacket/Unsupported re-encodes
    to itself."""
    body: bytes = msgpack.packb(d, use_bin_type=True)
    packets = _decode_safely(frame(body))
    if len(body) + HEADER_BYTES <= 4096:
        assert len(packets) == 1
    for packet in packets:
        if isinstance(packet, (BadPacket, Unsupported)):
            continue
        assert decode_all(encode(packet)) == [packet]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@settings(max_examples=150, deadline=None)
@given(MAPS)
def test_fuzz_json_maps_decode_and_re_encode(d: dict[str, Any]) -> None:
    body = json.dumps(_jsonable(d)).encode()
    packets = _decode_safely(frame(body))
    for packet in packets:
        if isinstance(packet, (BadPacket, Unsupported)):
            continue
        assert decode_all(encode(packet, Codec.JSON)) == [packet]


# The decoder inlines RUN and RESULT in their plain shape; any map must still
# give exactly the packet the general path builds (or the same complaint).
_FAST_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from(["", "RUN", "RESULT", "OK", "EXCEPTION", "echo", "nope"]),
    st.binary(min_size=15, max_size=17),
    st.lists(st.text(max_size=3), max_size=2),
)
_FAST_KEYS = st.sampled_from(
    ["packet_type", "cookie", "pipeline", "variables", "rc", "result", "error", "detach", "x"]
)
_FAST_BASES = st.sampled_from(
    [
        {"packet_type": "RUN", "cookie": C, "pipeline": "echo"},
        {"packet_type": "RUN", "cookie": C, "pipeline": "echo", "variables": "v"},
        {"packet_type": "RESULT", "cookie": C, "rc": "OK"},
        {"packet_type": "RESULT", "cookie": C, "rc": "OK", "result": "r"},
    ]
)
# The per-job shapes with a key or two changed, added or taken away, so the
# fast path and its near misses are both hit.
_FAST_MAPS = st.builds(
    lambda base, extra, drop: {k: v for k, v in {**base, **extra}.items() if k != drop},
    _FAST_BASES,
    st.dictionaries(_FAST_KEYS, _FAST_VALUES, max_size=2),
    st.one_of(st.none(), _FAST_KEYS),
)


@settings(max_examples=400)
@given(_FAST_MAPS)
@example({"packet_type": "RESULT", "cookie": C, "rc": "OK", "error": "boom"})
@example({"packet_type": "RESULT", "cookie": C, "rc": "OK", "result": "r", "error": "boom"})
@example({"packet_type": "RESULT", "cookie": C, "rc": "NOPE"})
@example({"packet_type": "RUN", "cookie": C, "pipeline": "echo", "detach": True})
@example({"packet_type": "RUN", "cookie": C[:15], "pipeline": "echo"})
@example({"packet_type": "RUN", "cookie": C, "pipeline": ""})
def test_decoder_fast_path_agrees_with_the_general_path(d: dict[str, Any]) -> None:
    dec = PacketDecoder(MAX)
    assert dec.feed(mp({"packet_type": "PING"})) == [Ping()]  # fixes the codec: the fast path is on
    assert dec.feed(mp(d)) == [packet_from_map(d, Codec.MSGPACK)]


# -- payloads passed through unparsed (Raw) ------------------------------------------
#
# The broker's decoder hands plain RUN/RESULT payloads on as the bytes of the
# value, after `_skip` has walked them. The contract: `_skip` never passes what
# msgpack-python (raw=False, strict_map_key=False) would refuse, so a peer can
# always decode what the broker forwards; and on the everyday payloads it
# passes, it finds exactly the value's end.

_HASHABLE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, width=32),  # packed as float 32 or 64 (use_single_float)
    st.text(max_size=4),
    st.binary(max_size=4),
)
_PLAIN_VALUES = st.recursive(
    _HASHABLE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_HASHABLE, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(_PLAIN_VALUES, st.booleans())
def test_skip_finds_the_end_of_every_plain_value(value: Any, single_float: bool) -> None:
    packed = msgpack.packb(value, use_bin_type=True, use_single_float=single_float)
    assert codecs._skip(packed + b"\x01tail", 0, len(packed)) == len(packed)
    assert codecs._skip(b"\x00" + packed, 1, 1 + len(packed)) == 1 + len(packed)
    if packed:
        assert codecs._skip(packed, 0, len(packed) - 1) == -1  # truncated


def _msgpack_accepts(data: bytes) -> bool:
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return False
    return True


_ODD_VALUES = st.recursive(
    _HASHABLE
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=3))
    | st.builds(msgpack.Timestamp, st.integers(-(2**34), 2**34), st.integers(0, 10**9 - 1)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_HASHABLE, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=500)
@given(
    _ODD_VALUES,
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
    st.integers(0, 8),
)
@example(None, [], 0)
def test_skip_never_passes_what_msgpack_refuses(
    value: Any, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(msgpack.packb(value, use_bin_type=True, datetime=False))
    for at, byte in flips:
        data[at % len(data)] = byte
    data = data[: max(1, len(data) - cut)] if cut < 4 else data
    end = codecs._skip(bytes(data), 0, len(data))
    assert end == -1 or (0 < end <= len(data) and _msgpack_accepts(bytes(data[:end])))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", "never used"),
        (b"\xa2\xff\xfe", "str that is not UTF-8"),
        (b"\xd9\x02\xed\xa0", "str 8 truncated"),
        (b"\xa3\xed\xa0\x80", "a UTF-8-encoded surrogate"),
        (b"\x81\x91\x01\x02", "list as a map key"),
        (b"\x81\x80\x02", "map as a map key"),
        (b"\x81\x90\x02", "empty list as a map key"),
        (b"\xd6\xff\x00\x00\x00\x01", "a timestamp (ext): left to msgpack"),
        (b"\xc7\x01\x05\x00", "ext 8: left to msgpack"),
        (b"\x91" * 65 + b"\x01", "nested deeper than _SKIP_MAX_DEPTH"),
        (b"\xdc\x00\x02\x01", "array 16 one short"),
        (b"\xc6\xff\xff\xff\xff", "bin 32 longer than the frame"),
        (b"\xcf\x00", "uint 64 truncated"),
        (b"", "nothing at all"),
    ],
)
def test_skip_refuses(data: bytes, reason: str) -> None:
    assert codecs._skip(data, 0, len(data)) == -1, reason


def test_skip_takes_what_it_should() -> None:
    deep = b"\x91" * 64 + b"\x01"
    assert codecs._skip(deep, 0, len(deep)) == len(deep)
    for data in (b"\xa3\xc3\xa9x", b"\x82\xc4\x01k\x01\xc0\xcb" + bytes(8), b"\x90", b"\x80"):
        assert codecs._skip(data, 0, len(data)) == len(data)


def _unrawed(packets: list[Packet]) -> list[Packet]:
    """The packets with every Raw payload decoded, to compare with the general path."""
    out: list[Packet] = []
    for p in packets:
        if isinstance(p, Run) and isinstance(p.variables, Raw):
            p = Run(p.cookie, p.pipeline, p.variables.value())
        elif isinstance(p, Result) and isinstance(p.result, Raw):
            p = Result(p.cookie, p.rc, p.error, p.stacktrace, p.result.value())
        out.append(p)
    return out


def _general(body: bytes) -> list[Packet] | str:
    try:
        return [decode_body(body, Codec.MSGPACK)]
    except RemoteProtocolError:
        return "error"


def _fast(body: bytes, raw: bool) -> list[Packet] | str:
    dec = PacketDecoder(MAX, raw_payloads=raw)
    assert dec.feed(mp({"packet_type": "PING"})) == [Ping()]  # fixes the codec: the fast path is on
    try:
        return _unrawed(dec.feed(frame(body)))
    except RemoteProtocolError:
        return "error"


@settings(max_examples=400)
@given(
    _FAST_BASES,
    st.sampled_from(["variables", "result", "pipeline", "rc", "cookie", "packet_type"]),
    _ODD_VALUES | _FAST_VALUES,
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=2),
    st.booleans(),
    st.sampled_from([b"", b"", b"", b"\x00", b"\xc0\xc0"]),
)
@example(
    {"packet_type": "RUN", "cookie": C, "pipeline": "echo"},
    "variables",
    {"k": [1.5]},
    [],
    True,
    b"",
)
@example({"packet_type": "RESULT", "cookie": C, "rc": "OK"}, "rc", "TIMEOUT", [], True, b"")
@example(
    {"packet_type": "RUN", "cookie": C, "pipeline": "echo"}, "pipeline", "é" * 40, [], True, b""
)
@example({"packet_type": "RUN", "cookie": C, "pipeline": "echo"}, "cookie", C + b"!", [], True, b"")
@example({"packet_type": "RUN", "cookie": C, "pipeline": "echo"}, "variables", 1, [], True, b"\x01")
@example(  # a flip that turns an inf into a NaN (found by CI's run)
    {"packet_type": "RUN", "cookie": C, "pipeline": "echo"},
    "variables",
    [None, None, {None: -129, -129: math.inf, -32769: 0.0}],
    [(3080, 1)],
    False,
    b"",
)
def test_plain_frames_read_in_place_agree_with_the_general_path(
    base: dict[str, Any],
    key: str,
    value: Any,
    flips: list[tuple[int, int]],
    raw: bool,
    trailer: bytes,
) -> None:
    # Byte flips land anywhere: in keys, lengths, the cookie, the payload; a
    # trailer is bytes after the map. The in-place reader must give the
    # general path's packet or its complaint.
    body = bytearray(msgpack.packb({**base, key: value}, use_bin_type=True, datetime=False))
    for at, byte in flips:
        body[at % len(body)] = byte
    body += trailer
    fast, general = _fast(bytes(body), raw), _general(bytes(body))
    # A flip can make a float NaN, and NaN != NaN: then the reprs must agree.
    assert fast == general or repr(fast) == repr(general)


@pytest.mark.parametrize(
    "pairs",
    [
        [("packet_type", "RUN"), ("cookie", C), ("pipeline", "a"), ("pipeline", "b")],
        [("packet_type", "RESULT"), ("cookie", C), ("rc", "OK"), ("rc", "TIMEOUT")],
        [("packet_type", "RUN"), ("cookie", C), ("pipeline", "a"), ("packet_type", "RESULT")],
        [("packet_type", "RESULT"), ("cookie", C2), ("rc", "OK"), ("cookie", C)],
    ],
)
def test_plain_frames_with_a_repeated_key_agree_with_the_general_path(
    pairs: list[tuple[str, Any]],
) -> None:
    # msgpack.packb cannot repeat a key; a hand-built map can (the last one wins).
    body = bytes([0x80 | len(pairs)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in pairs
    )
    assert _fast(body, True) == _general(body) != "error"


@settings(max_examples=150)
@given(_FAST_BASES, _PLAIN_VALUES)
def test_plain_shapes_are_read_in_place(base: dict[str, Any], value: Any) -> None:
    # The agreement test above would also pass if nothing took the in-place
    # path; the everyday shapes must take it (and their payloads come out Raw).
    key = "variables" if base["packet_type"] == "RUN" else "result"
    body = msgpack.packb({**base, key: value}, use_bin_type=True)
    packet = PacketDecoder(MAX, raw_payloads=True)._plain(body, 0, len(body))
    assert isinstance(packet, (Run, Result))
    payload = packet.variables if isinstance(packet, Run) else packet.result
    if value is None:
        assert payload is None
    else:
        assert payload == Raw(msgpack.packb(value, use_bin_type=True))


def test_raw_payloads_are_the_senders_bytes() -> None:
    # Not re-packed: a uint32 holding 5, a float32, a map with its keys in the
    # sender's order all pass through as they came.
    payload = b"\x83\xa1b\xce\x00\x00\x00\x05\xa1a\xca\x3f\xc0\x00\x00\xa1c\xc0"
    body = msgpack.packb({"packet_type": "RUN", "cookie": C, "pipeline": "echo", "variables": 0})
    body = body[:-1] + payload
    dec = PacketDecoder(MAX, raw_payloads=True)
    dec.feed(mp({"packet_type": "PING"}))
    (run,) = dec.feed(frame(body))
    assert run == Run(C, "echo", Raw(payload))
    assert isinstance(run, Run) and isinstance(run.variables, Raw)
    assert run.variables.value() == {"b": 5, "a": 1.5, "c": None}
    out = encode(Run(b"\x01" * 16, "echo", run.variables))
    assert out.endswith(b"\xa9variables" + payload)
    assert decode_all(out) == [Run(b"\x01" * 16, "echo", {"b": 5, "a": 1.5, "c": None})]
    # A library decoder (raw_payloads off) gets the value, as before.
    assert PacketDecoder(MAX).feed(mp({"packet_type": "PING"}) + frame(body))[1] == Run(
        C, "echo", {"b": 5, "a": 1.5, "c": None}
    )


@settings(max_examples=200)
@given(_PLAIN_VALUES, st.sampled_from(["plain", "priority", "json"]))
def test_a_raw_payload_encodes_as_its_value_would(value: Any, how: str) -> None:
    raw = Raw(msgpack.packb(value, use_bin_type=True))
    assert can_carry(raw, Codec.JSON) == can_carry(value, Codec.JSON)
    assume(value is not None)  # the decoder makes None of a nil payload, never a Raw
    if how == "json":
        # Only strings cross to JSON, decoded; anything else is refused as before.
        assert payload_kind(raw) == type(value).__name__
        if isinstance(value, str):
            res = Result(C, ResultCode.OK, result=raw)
            assert encode(res, Codec.JSON) == encode(
                Result(C, ResultCode.OK, result=value), Codec.JSON
            )
        return
    priority = 1 if how == "priority" else 0  # the general (packet_to_map) path
    assert encode(Run(C, "echo", raw, priority=priority)) == encode(
        Run(C, "echo", value, priority=priority)
    )
    assert encode(Result(C, ResultCode.OK, "e" if priority else None, result=raw)) == encode(
        Result(C, ResultCode.OK, "e" if priority else None, result=value)
    )


def test_packets_are_frozen_for_the_type_checker(tmp_path: Path) -> None:
    # At run time packets are plain slotted classes (a frozen dataclass costs
    # four times as much to build); mypy --strict is what keeps them immutable:
    # RUN and RESULT (hand-written, Final fields) as well as the dataclass ones.
    from mypy import api

    snippet = tmp_path / "assign.py"
    snippet.write_text(
        "from reasonbroker.core.protocol import Cancel, Result, ResultCode, Run\n"
        "from reasonbroker.core.actions import Send\n"
        "run = Run(b'0' * 16, 'echo')\n"
        "run.pipeline = 'other'\n"
        "res = Result(None, ResultCode.OK)\n"
        "res.result = 1\n"
        "cancel = Cancel(b'0' * 16)\n"
        "cancel.cookie = b'1' * 16\n"
        "send = Send(1, res)\n"
        "send.conn = 2\n"
    )
    out, _, status = api.run(["--strict", "--cache-dir=/dev/null", str(snippet)])
    assert status == 1
    assert 'Cannot assign to final attribute "pipeline"' in out
    assert 'Cannot assign to final attribute "result"' in out
    assert 'Property "cookie" defined in "Cancel" is read-only' in out
    assert 'Cannot assign to final attribute "conn"' in out


def test_hand_written_packets_are_values() -> None:
    # RUN and RESULT are not dataclasses (see protocol.Record): equality, hash,
    # repr and match patterns must still behave like the dataclass packets'.
    run = Run(C, "echo", "vars", priority=2)
    same = Run(C, "echo", "vars", False, 2, None, None)
    assert run == same and hash(run) == hash(same) and not run != same
    assert run != Run(C, "echo", "vars", priority=3)
    assert run != Run(C, "echo", "other", priority=2)
    assert Run(C, "echo", {"a": 1}) == Run(C, "echo", {"a": 1})
    assert Result(C, ResultCode.OK, result=1) != Result(C, ResultCode.OK, result=2)
    assert Result(C, ResultCode.OK) != Cancel(C) and Cancel(C) != Result(C, ResultCode.OK)
    assert len({run, same, Result(C, ResultCode.OK), Result(C, ResultCode.OK)}) == 2
    assert repr(Result(None, ResultCode.OK, result=[1])) == (
        "Result(cookie=None, rc=<ResultCode.OK: 'OK'>, error=None, stacktrace=None, result=[1])"
    )
    match run:
        case Run(cookie, "echo", variables, priority=p):
            assert (cookie, variables, p) == (C, "vars", 2)
        case _:
            raise AssertionError("Run did not match its own pattern")
    if reasonbroker.COMPILED:
        with pytest.raises(AttributeError):
            run.pipeline = "other"  # type: ignore[misc]


@pytest.mark.parametrize("cls", [Run, Result, Send], ids=lambda cls: cls.__name__)
def test_hand_written_classes_name_every_field_once(cls: type[Record]) -> None:
    # __match_args__ drives equality, hash, repr and positional patterns: it must
    # name exactly the constructor's parameters, in order, and the slots.
    params = list(inspect.signature(cls).parameters)
    assert list(cls.__match_args__) == params
    if not reasonbroker.COMPILED:  # a compiled class keeps its fields in a C struct
        assert sorted(cls.__slots__) == sorted(params)


_PAYLOADS = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.integers(-(2**63), 2**64 - 1),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
)
_COOKIES = st.just(C) | st.binary(min_size=16, max_size=16)
_RUNS = st.builds(
    Run,
    _COOKIES,
    st.text(min_size=1, max_size=5),
    _PAYLOADS,
    st.booleans(),
    st.integers(-2, 2),
    st.none() | st.integers(1, 100),
    st.none() | st.integers(1, 3),
)
_RESULTS = st.builds(
    Result,
    st.none() | _COOKIES,
    st.sampled_from(ResultCode),
    st.none() | st.text(max_size=5),
    st.none() | st.lists(st.text(max_size=3), max_size=2).map(tuple),
    _PAYLOADS,
)


@settings(max_examples=300)
@given(_RUNS | _RESULTS)
def test_per_job_packets_are_written_as_their_map_packs(packet: Run | Result) -> None:
    # encode writes plain RUN/RESULT from prepacked pieces; the bytes must be
    # exactly those of packing the packet's map.
    expected = frame(msgpack.packb(packet_to_map(packet), use_bin_type=True))
    assert encode(packet) == expected
    # The broker's form: pieces appended after what the outbox holds already.
    out: list[Chunk] = [b"earlier frame"]
    assert encode_into(packet, Codec.MSGPACK, out) == len(expected)
    assert out[0] == b"earlier frame"
    assert b"".join(out[1:]) == expected


@pytest.mark.parametrize(
    ("packet", "codec"),
    [
        (Run(C, "p", object()), Codec.MSGPACK),
        (Run(C, "p", {"k": 2**70}), Codec.MSGPACK),
        (Result(C, ResultCode.OK, result={1, 2}), Codec.MSGPACK),
        (Run(C, "p", b"bytes"), Codec.JSON),
        (Result(C, ResultCode.OK, result=b"bytes"), Codec.JSON),
        (Unsupported("X"), Codec.MSGPACK),
    ],
    ids=repr,
)
def test_encode_into_leaves_the_outbox_alone_when_a_packet_cannot_be_encoded(
    packet: Packet, codec: Codec
) -> None:
    out: list[Chunk] = [b"earlier frame"]
    with pytest.raises(EncodeError):
        encode_into(packet, codec, out)
    assert out == [b"earlier frame"]


def test_packed_pipeline_names_stay_bounded_and_right() -> None:
    # A client inventing pipeline names must not grow the broker's cache
    # without bound, and every name must still be written correctly.
    for i in range(codecs._PACKED_NAMES_MAX + 50):
        run = Run(C, f"p{i}", "v" if i % 2 else None)
        assert encode(run) == frame(msgpack.packb(packet_to_map(run), use_bin_type=True))
    assert len(codecs._PIPELINE_THEN3) <= codecs._PACKED_NAMES_MAX
    assert len(codecs._PIPELINE_THEN4) <= codecs._PACKED_NAMES_MAX
