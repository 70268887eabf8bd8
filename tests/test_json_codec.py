"""The JSON codec's two backends (orjson when installed, else the stdlib) and
its in-place reader and piece writer for per-job frames: the bytes on the
wire are ReasonChip's own, whichever backend writes them, and every reading
is the general path's.

The golden frames below are what ReasonChip 0.0.6's pydantic `SocketPacket`
dumps (`model_dump_json()`) for the same packets; the interop suite checks
them against the real package when it can run it
(tests/test_reasonchip_interop.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reasonbroker.core import codecs
from reasonbroker.core.errors import RemoteProtocolError
from reasonbroker.core.protocol import (
    Cancel,
    Codec,
    Packet,
    PacketDecoder,
    RawJson,
    Result,
    ResultCode,
    Run,
    encode,
)

# orjson as the codec found it (None when not installed), before any test takes it away.
ORJSON: Any = codecs._orjson
C = uuid.UUID("0123abcd-4567-89ef-0123-456789abcdef").bytes
_OPEN = b'{"packet_type":"RUN","cookie":"0123abcd-4567-89ef-0123-456789abcdef","capacity":null,'
_RESULT = (
    b'{"packet_type":"RESULT","cookie":"0123abcd-4567-89ef-0123-456789abcdef","capacity":null,'
    b'"pipeline":null,"variables":null,"detach":null,'
)
_NOTHING = b'"rc":null,"error":null,"stacktrace":null,"result":null}'

# (packet, what ReasonChip's SocketPacket.model_dump_json() writes for it)
GOLDEN: list[tuple[Packet, bytes]] = [
    (
        Run(C, "echo", '{"name": "x", "n": 1}'),
        _OPEN + b'"pipeline":"echo","variables":"{\\"name\\": \\"x\\", \\"n\\": 1}",'
        b'"detach":null,' + _NOTHING,
    ),
    (Run(C, "p", None, True), _OPEN + b'"pipeline":"p","variables":null,"detach":true,' + _NOTHING),
    (
        # Non-ASCII raw, control characters escaped (\t, \u0001), DEL raw,
        # quotes, backslashes and slashes as json writes them.
        Run(C, "caf\u00e9", '{"s": "\\u00e9"}\t\u00e9\u2028\U0001f600\x01\x7f"\\/'),
        _OPEN + b'"pipeline":"caf\xc3\xa9","variables":"{\\"s\\": \\"\\\\u00e9\\"}\\t\xc3\xa9'
        b'\xe2\x80\xa8\xf0\x9f\x98\x80\\u0001\x7f\\"\\\\/","detach":null,' + _NOTHING,
    ),
    (
        Result(C, ResultCode.OK, result='{"greeting": "hello"}'),
        _RESULT + b'"rc":"OK","error":null,"stacktrace":null,'
        b'"result":"{\\"greeting\\": \\"hello\\"}"}',
    ),
    (
        Result(C, ResultCode.NO_CAPACITY, "no worker serves p"),
        _RESULT + b'"rc":"NO_CAPACITY","error":"no worker serves p","stacktrace":null,'
        b'"result":null}',
    ),
    (
        Result(C, ResultCode.PROCESSOR_EXCEPTION, "n < 0", ("Traceback:\n", "  \u00e9\n")),
        _RESULT + b'"rc":"PROCESSOR_EXCEPTION","error":"n < 0",'
        b'"stacktrace":["Traceback:\\n","  \xc3\xa9\\n"],"result":null}',
    ),
    (
        Result(None, ResultCode.BAD_PACKET, "bad"),
        b'{"packet_type":"RESULT","cookie":null,"capacity":null,"pipeline":null,'
        b'"variables":null,"detach":null,"rc":"BAD_PACKET","error":"bad","stacktrace":null,'
        b'"result":null}',
    ),
    (
        Cancel(C),
        b'{"packet_type":"CANCEL","cookie":"0123abcd-4567-89ef-0123-456789abcdef",'
        b'"capacity":null,"pipeline":null,"variables":null,"detach":null,' + _NOTHING,
    ),
]


@pytest.fixture(params=["orjson", "stdlib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once with orjson (when installed) and once with the stdlib alone."""
    if request.param == "orjson":
        if ORJSON is None:
            pytest.skip("orjson is not installed")
    else:
        monkeypatch.setattr(codecs, "_orjson", None)
    yield request.param


def _stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecs, "_orjson", None)


def _general(body: bytes) -> Packet | type[Exception]:
    """The general path's reading of a body (no in-place reader), or its error."""
    try:
        return codecs.decode_body(body, Codec.JSON)
    except RemoteProtocolError:
        return RemoteProtocolError


def _text(payload: Any) -> Any:
    """A payload as the general path reads it: a RawJson's text. A RawJson must
    be the very literal the writer writes for that text, with its length."""
    if type(payload) is not RawJson:
        return payload
    text = payload.value()
    assert payload.data == codecs._json_text(text)
    assert payload.chars == len(text)
    return text


def _as_read(packet: Packet) -> Packet:
    """`packet` with its payload as the general path gives it (see _text)."""
    if isinstance(packet, Run):
        v = packet.variables
        return Run(packet.cookie, packet.pipeline, _text(v), packet.detach, packet.priority,
                   packet.timeout_ms, packet.max_attempts)  # fmt: skip
    if isinstance(packet, Result):
        return Result(packet.cookie, packet.rc, packet.error, packet.stacktrace,
                      _text(packet.result))  # fmt: skip
    return packet


def _fed_raw(frame: bytes) -> Packet | type[Exception]:
    """A broker decoder's reading of one frame on a JSON connection (payloads
    as RawJson where it keeps them), or its error."""
    decoder = PacketDecoder(1 << 24, raw_payloads=True)
    decoder.codec = Codec.JSON
    try:
        (packet,) = decoder.feed(frame)
    except RemoteProtocolError:
        return RemoteProtocolError
    return packet


def _fed(frame: bytes) -> Packet | type[Exception]:
    """`_fed_raw`, with each RawJson checked and read to its text (`_as_read`)."""
    packet = _fed_raw(frame)
    return packet if packet is RemoteProtocolError else _as_read(packet)  # type: ignore[arg-type]


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(("packet", "golden"), GOLDEN)
def test_frames_are_reasonchips_bytes_with_either_backend(
    backend: str, packet: Packet, golden: bytes
) -> None:
    assert encode(packet, Codec.JSON) == _frame(golden)
    # The general writer (the map, then the backend) writes the same.
    assert codecs._json_body(codecs.packet_to_map(packet)) == golden


@pytest.mark.parametrize(("packet", "golden"), GOLDEN)
def test_golden_frames_read_back_with_either_backend(
    backend: str, packet: Packet, golden: bytes
) -> None:
    assert _fed(_frame(golden)) == packet
    assert codecs.decode_body(golden, Codec.JSON) == packet


def test_reasonchips_detach_false_is_read_in_place() -> None:
    # ReasonChip's client sends detach false (ours writes null): both are plain RUNs.
    body = _OPEN + b'"pipeline":"p","variables":"v","detach":false,' + _NOTHING
    assert codecs.decode_body(body, Codec.JSON) == Run(C, "p", "v")
    decoder = PacketDecoder(1 << 20, raw_payloads=True)
    decoder.codec = Codec.JSON
    assert decoder._plain_json(body, 0, len(body)) == Run(C, "p", RawJson(b'"v"', 1))


def test_orjson_writes_every_code_point_as_the_stdlib_does() -> None:
    if ORJSON is None:
        pytest.skip("orjson is not installed")
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    stdlib = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    assert ORJSON.dumps(text) == stdlib(text).encode()


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_COOKIES = st.binary(min_size=16, max_size=16)
_PACKETS = st.one_of(
    st.builds(Run, _COOKIES, _TEXT.filter(bool), st.none() | _TEXT, st.booleans()),
    st.builds(
        Result,
        _COOKIES,
        st.sampled_from(list(ResultCode)),
        st.none() | _TEXT,
        st.none() | st.lists(_TEXT, max_size=3).map(tuple),
        st.none() | _TEXT,
    ),
)


@settings(max_examples=200)
@given(_PACKETS)
def test_per_job_frames_are_the_same_bytes_with_either_backend_and_read_back(
    packet: Packet,
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        fast = encode(packet, Codec.JSON)
        _stdlib(mp)
        slow = encode(packet, Codec.JSON)
        slow_general = codecs._json_body(codecs.packet_to_map(packet))
        assert _fed(fast) == packet  # the in-place reader, or the stdlib's general path
    assert fast == slow == _frame(slow_general)
    assert _fed(fast) == packet == codecs.decode_body(fast[4:], Codec.JSON)


def _mutations() -> st.SearchStrategy[bytes]:
    """Plain per-job bodies, then changed a little: a byte replaced, dropped
    or added, so the in-place reader meets near-misses of its shapes."""
    bodies = st.sampled_from([g for p, g in GOLDEN if isinstance(p, Run | Result)])

    def mutate(body: bytes, at: int, how: int, byte: int) -> bytes:
        at %= len(body)
        if how == 0:
            return body[:at] + bytes([byte]) + body[at + 1 :]
        if how == 1:
            return body[:at] + body[at + 1 :]
        return body[:at] + bytes([byte]) + body[at:]

    special = st.sampled_from(b'"\\{},:0aAnu\x00\x1f\x7f\x80\xc3\xed ')
    return st.builds(
        mutate,
        bodies,
        st.integers(0, 400),
        st.integers(0, 2),
        special | st.integers(0, 255),
    )


@settings(max_examples=500)
@given(_mutations())
@example(_OPEN + b'"pipeline":"","variables":null,"detach":null,' + _NOTHING)
@example(_OPEN + b'"pipeline":"p","variables":"\\ud800","detach":null,' + _NOTHING)
@example(_OPEN + b'"pipeline":"p","variables":"\\ud83d\\ude00","detach":null,' + _NOTHING)
@example(_OPEN + b'"pipeline":"p","variables":"\xed\xa0\x80","detach":null,' + _NOTHING)
@example(_OPEN + b'"pipeline":"p","variables":"a\x01","detach":null,' + _NOTHING)
@example(_OPEN + b'"pipeline":"p","variables":"\\x","detach":null,' + _NOTHING)
@example(_OPEN.replace(b"0123abcd", b"0123ABCD") + b'"pipeline":"p","variables":null,'
         b'"detach":null,' + _NOTHING)  # fmt: skip
@example(_OPEN.replace(b"-4567-", b"-45-67")[:-1] + b'"pipeline":"p","variables":null,'
         b'"detach":null,' + _NOTHING)  # fmt: skip
def test_in_place_reading_is_the_general_paths(body: bytes) -> None:
    # Whatever the frame, the broker's decoder gives what the stdlib's general
    # path gives: the same packet, or an error for the connection.
    with pytest.MonkeyPatch.context() as mp:
        _stdlib(mp)
        reference = _general(body)
        stdlib_fed = _fed(_frame(body))
    assert stdlib_fed == reference
    assert _fed(_frame(body)) == reference  # with orjson, when installed
    assert _general(body) == reference


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.floats()
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = st.sampled_from(
    ["packet_type", "cookie", "capacity", "pipeline", "variables", "rc", "result", "stacktrace"]
)


def _body(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode("utf-8", "surrogatepass")


@settings(max_examples=300)
@given(
    st.dictionaries(_KEYS | st.text(max_size=5), _JSON_VALUES, max_size=5),
    st.sampled_from(["RUN", "RESULT", "REGISTER", "HELLO", "CANCEL", "STATUS", "X"]),
    st.sampled_from([str(uuid.UUID(bytes=C)), None]),
)
@example({"capacity": 2**70}, "REGISTER", None)  # orjson reads this as a float
@example({"capacity": -(2**64)}, "REGISTER", None)
@example({"capacity": float("nan")}, "REGISTER", None)  # the stdlib reads NaN, orjson refuses
@example({"error": "\ud800"}, "RESULT", None)
def test_orjson_reads_bodies_as_the_stdlib_does(
    d: dict[str, Any], ptype: str, cookie: str | None
) -> None:
    body = _body({"packet_type": ptype, "cookie": cookie, "rc": "OK", **d})
    with pytest.MonkeyPatch.context() as mp:
        _stdlib(mp)
        reference = _general(body)
    assert _general(body) == reference
