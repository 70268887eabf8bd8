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

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reasonbroker.core import codecs, framing
from reasonbroker.core.errors import RemoteProtocolError
from reasonbroker.core.protocol import (
    Cancel,
    Codec,
    Packet,
    PacketDecoder,
    Raw,
    RawJson,
    Result,
    ResultCode,
    Run,
    decode_body,
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


# -- payloads passed on as they came (RawJson) ---------------------------------------

W = uuid.UUID("fedcba98-7654-3210-fedc-ba9876543210").bytes  # the worker's cookie for the job

# Payload texts whose literals the writer gives back byte for byte: JSON text with
# its quotes escaped, non-ASCII raw, big numbers and nesting (opaque text to the
# broker), control characters, and sizes either side of the scanned length.
PASSED_ON = [
    '{"name": "x", "n": 1}',
    '{"big": 123456789012345678901234567890, "f": 1e400, "nested": {"a": [1, {"b": null}]}}',
    "caf\u00e9 \u2028 \U0001f600 \x7f",
    'tab\tnew\nline\r back\\slash "q" \x00\x01\x1f \x08\x0c',
    "",
    "x" * (framing._SCAN_MAX - 2),  # the literal: exactly _SCAN_MAX bytes
    "x" * (framing._SCAN_MAX - 1),
    '{"k": "\u00e9\\n"}' * 200,
]


def _run_frame(cookie: bytes, literal: bytes, detach: bytes = b"false") -> bytes:
    """A RUN, its variables given as a literal: ReasonChip's client sends detach
    false, the broker writes null."""
    body = (
        b'{"packet_type":"RUN","cookie":"' + codecs.json_cookie(cookie) + b'","capacity":null,'
        b'"pipeline":"echo","variables":' + literal + b',"detach":' + detach + b"," + _NOTHING
    )
    return _frame(body)


def _result_frame(cookie: bytes, literal: bytes) -> bytes:
    """A ReasonChip worker's RESULT, its result given as a literal."""
    body = (
        b'{"packet_type":"RESULT","cookie":"' + codecs.json_cookie(cookie) + b'","capacity":null,'
        b'"pipeline":null,"variables":null,"detach":null,"rc":"OK","error":null,'
        b'"stacktrace":null,"result":' + literal + b"}"
    )
    return _frame(body)


def _read(frame: bytes) -> Packet:
    """The one packet a broker's decoder reads from a JSON frame."""
    decoder = PacketDecoder(1 << 24, raw_payloads=True)
    decoder.codec = Codec.JSON
    (packet,) = decoder.feed(frame)
    return packet


def _relayed(frame: bytes, codec: Codec) -> bytes:
    """What the broker writes to the next peer (in `codec`) for a RUN or RESULT
    it read from `frame`: the same payload under the other side's cookie."""
    packet = _read(frame)
    if isinstance(packet, Run):
        return encode(Run(W, packet.pipeline, packet.variables), codec)
    assert isinstance(packet, Result)
    return encode(Result(C, packet.rc, packet.error, None, packet.result), codec)


@pytest.mark.parametrize("text", PASSED_ON, ids=range(len(PASSED_ON)))
def test_a_json_payload_reaches_a_json_peer_byte_for_byte(backend: str, text: str) -> None:
    literal = json.dumps(text, ensure_ascii=False).encode()  # what ReasonChip writes
    run = _read(_run_frame(C, literal))
    assert isinstance(run, Run)
    assert run.variables == RawJson(literal, len(text))  # kept as it came, not decoded
    assert codecs.payload_size(run.variables) == len(text)  # the budgets count characters
    assert _relayed(_run_frame(C, literal), Codec.JSON) == _run_frame(W, literal, b"null")
    # The worker's RESULT reaches the client the same way.
    assert _relayed(_result_frame(W, literal), Codec.JSON) == _result_frame(C, literal)


@pytest.mark.parametrize("text", PASSED_ON, ids=range(len(PASSED_ON)))
def test_a_json_payload_reaches_a_msgpack_peer_as_its_text(text: str) -> None:
    literal = json.dumps(text, ensure_ascii=False).encode()
    run = decode_body(_relayed(_run_frame(C, literal), Codec.MSGPACK)[4:], Codec.MSGPACK)
    assert run == Run(W, "echo", text)
    res = decode_body(_relayed(_result_frame(W, literal), Codec.MSGPACK)[4:], Codec.MSGPACK)
    assert res == Result(C, ResultCode.OK, result=text)


@pytest.mark.parametrize("text", PASSED_ON, ids=range(len(PASSED_ON)))
def test_a_msgpack_payload_reaches_a_json_peer_as_the_writers_literal(text: str) -> None:
    raw = Raw(msgpack.packb(text))
    literal = codecs._json_text(text)
    assert encode(Run(W, "echo", raw), Codec.JSON) == encode(Run(W, "echo", text), Codec.JSON)
    frame = encode(Result(C, ResultCode.OK, result=raw), Codec.JSON)
    assert frame == _result_frame(C, literal)
    assert json.loads(frame[4:])["result"] == text


def _literals(text: str) -> list[bytes]:
    """Literals json reads as `text`: the writer's own, the stdlib's with
    ensure_ascii (\\u00e9, surrogate pairs), and with / escaped (\\/)."""
    out = [json.dumps(text).encode(), json.dumps(text).replace("/", "\\/").encode()]
    try:
        out.append(codecs._json_text(text))
    except UnicodeEncodeError:
        pass  # a lone surrogate: no writer's literal
    return out


_ANY_TEXT = st.text(max_size=40) | st.builds(
    lambda head, pad, tail: head + pad + tail,
    st.text(max_size=10),
    st.sampled_from(["x" * 600, "\u00e9" * 300, '\\"' * 200]),
    st.text(max_size=10),
)


@settings(max_examples=300)
@given(_ANY_TEXT, st.integers(0, 2), st.booleans())
@example("\ud800", 0, False)  # a lone surrogate, escaped: refused as before
@example("\ud83d\ude00", 0, False)  # escaped, a pair: read as U+1F600, written raw
@example("a/b", 1, True)
@example("\u00e9" * 300, 0, True)
def test_relayed_json_payloads_are_what_decoding_and_writing_gives(
    text: str, form: int, result: bool
) -> None:
    literals = _literals(text)
    literal = literals[form % len(literals)]
    frame = (_result_frame if result else _run_frame)(W if result else C, literal)
    reference = _general(frame[4:])
    if reference is RemoteProtocolError:  # a lone surrogate: the connection's error
        with pytest.raises(RemoteProtocolError):
            _read(frame)
        return
    packet = _read(frame)
    payload = packet.result if isinstance(packet, Result) else packet.variables  # type: ignore[union-attr]
    text = json.loads(literal)  # an escaped surrogate pair is read as one character
    writers = codecs._json_text(text)
    # Kept as it came exactly when it is the writer's literal; read to its text otherwise.
    assert (type(payload) is RawJson) == (literal == writers)
    assert _as_read(packet) == reference
    out = _relayed(frame, Codec.JSON)
    assert out == (_result_frame(C, writers) if result else _run_frame(W, writers, b"null"))
    back = decode_body(_relayed(frame, Codec.MSGPACK)[4:], Codec.MSGPACK)
    assert (back.result if isinstance(back, Result) else back.variables) == text  # type: ignore[union-attr]


# -- cookie text, remembered (framing._cookie_text, PacketDecoder._cookie_at) ------


def _cookies() -> st.SearchStrategy[list[bytes]]:
    """Cookies as a broker meets them: runs that share their first 15 bytes
    (its own, for workers), others that share fewer or none (clients')."""
    stems = st.sampled_from([bytes(15), b"\xff" * 15, C[:15], W[:15], C[:14] + b"\x00"])
    shared = st.builds(lambda stem, last: stem + bytes([last]), stems, st.integers(0, 255))
    return st.lists(shared | _COOKIES, min_size=1, max_size=30)


@settings(max_examples=200)
@given(_cookies(), st.lists(st.booleans(), min_size=30, max_size=30))
def test_cookie_text_is_the_same_whatever_came_before(
    cookies: list[bytes], upper: list[bool]
) -> None:
    # One decoder reads them all in turn (RUNs as a client sends them, in
    # either case, and RESULTs as a worker does): each cookie is its text's
    # bytes; and each frame written for them is the general writer's.
    decoder = PacketDecoder(1 << 20, raw_payloads=True)
    decoder.codec = Codec.JSON
    for cookie, up in zip(cookies, upper, strict=False):
        text = str(uuid.UUID(bytes=cookie))
        text = text.upper() if up else text
        run = _run_frame(C, b'"v"').replace(codecs.json_cookie(C), text.encode())
        result = _result_frame(C, b"null").replace(codecs.json_cookie(C), text.encode())
        (got_run,) = decoder.feed(run)
        (got_result,) = decoder.feed(result)
        assert isinstance(got_run, Run) and isinstance(got_result, Result)
        assert got_run.cookie == got_result.cookie == cookie
        for packet in (Run(cookie, "echo", "v"), Result(cookie, ResultCode.OK, result="v")):
            frame = encode(packet, Codec.JSON)
            assert frame == _frame(codecs._json_body(codecs.packet_to_map(packet)))
            assert json.loads(frame[4:])["cookie"] == str(uuid.UUID(bytes=cookie))


@pytest.mark.parametrize("last", ["g", "-", " ", "\u00e9", "F", "0"])
def test_a_cookie_like_the_last_one_but_its_end_reads_as_the_general_path(last: str) -> None:
    text = codecs.json_cookie(C)
    decoder = PacketDecoder(1 << 20, raw_payloads=True)
    decoder.codec = Codec.JSON
    (first,) = decoder.feed(_run_frame(C, b'"v"'))
    assert isinstance(first, Run) and first.cookie == C
    body = _run_frame(C, b'"v"').replace(text, text[:35] + last.encode())[4:]
    try:
        (packet,) = decoder.feed(_frame(body))
    except RemoteProtocolError:
        assert _general(body) is RemoteProtocolError
    else:
        assert _as_read(packet) == _general(body)
