"""The wire protocol, sans-IO: framing, the two codecs, packet types and result codes.

Nothing here touches a socket, a clock or a logger. Bytes go in
(`PacketDecoder.feed`), packets come out; packets go in (`encode`), bytes come
out. The contract is ../shared/PROTOCOL.md; docs/protocol.md records the
decisions this module makes where the contract is silent.

Cookies are carried internally as the 16 raw bytes of the UUID: that is what
msgpack puts on the wire, so the native hot path never builds `uuid.UUID`
objects.
"""

from __future__ import annotations

import enum
import json
import json.scanner
import re
import struct
import uuid
from dataclasses import field
from typing import Any, ClassVar, Final, cast

import msgpack
from mypy_extensions import i64

from ._frozen import packet as _packet
from .errors import EncodeError, RemoteProtocolError

HEADER_BYTES: Final = 4
_pack_length = struct.Struct(">I").pack
# The largest RUN timeout_ms (about 24.8 days, a signed 32-bit count of ms):
# JSON integers are unbounded, and a deadline must stay a finite float.
MAX_TIMEOUT_MS: Final = 2**31 - 1
_MAX_ENCODABLE: Final = 0xFFFFFFFF
# Frame headers for the small sizes every RUN and RESULT of an everyday job
# has, made once: indexing a tuple is cheaper than a struct call per frame.
_SMALL_FRAME: Final = 4096
_SMALL_HEADERS: Final = tuple(_pack_length(n) for n in range(_SMALL_FRAME))


class PacketType(enum.StrEnum):
    REGISTER = "REGISTER"
    SHUTDOWN = "SHUTDOWN"
    RUN = "RUN"
    CANCEL = "CANCEL"
    RESULT = "RESULT"
    # reasonbroker extensions (PROTOCOL.md section 6): sent only to peers that said HELLO.
    HELLO = "HELLO"
    PING = "PING"
    PONG = "PONG"
    STARTED = "STARTED"
    PROGRESS = "PROGRESS"
    STATUS = "STATUS"


class ResultCode(enum.StrEnum):
    # ReasonChip's ten, in ReasonChip's order.
    OK = "OK"
    BAD_PACKET = "BAD_PACKET"
    UNSUPPORTED_PACKET_TYPE = "UNSUPPORTED_PACKET_TYPE"
    NO_CAPACITY = "NO_CAPACITY"
    COOKIE_NOT_FOUND = "COOKIE_NOT_FOUND"
    COOKIE_COLLISION = "COOKIE_COLLISION"
    WORKER_WENT_AWAY = "WORKER_WENT_AWAY"
    BROKER_WENT_AWAY = "BROKER_WENT_AWAY"
    PROCESSOR_EXCEPTION = "PROCESSOR_EXCEPTION"
    EXCEPTION = "EXCEPTION"
    # reasonbroker's own: a legacy peer gets these as EXCEPTION (see `for_legacy`).
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNAUTHORIZED = "UNAUTHORIZED"


LEGACY_RESULT_CODES: Final = frozenset(list(ResultCode)[:10])
_RESULT_CODES: Final = {rc.value: rc for rc in ResultCode}
_RESULT_CODES_RAW: Final = {rc.value.encode(): rc for rc in ResultCode}


class Codec(enum.Enum):
    MSGPACK = "msgpack"
    JSON = "json"


class Role(enum.StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    # Asks the broker for its STATUS; only on a listener with an admin token.
    ADMIN = "admin"


# ---------------------------------------------------------------------------
# Packets: one immutable class per type, in a closed union. RUN and RESULT are
# written by hand (see Record); the rest are made by `_packet` (see _frozen.py).


@_packet
class Register:
    capacity: int
    pipelines: tuple[str, ...] | None = None


class Record:
    """Value semantics for a hand-written class: equality, hash and repr over
    its `__match_args__`, which name every field in order.

    The two packets every job carries (RUN and RESULT, four of them per job)
    are written out by hand on this base rather than made by the `_packet`
    decorator: under mypyc a class with a plain `__init__` is a native class,
    built in about 50 ns and read as a struct field, where a dataclass costs
    about 190 ns to build and each field read is a generic attribute lookup.
    Their fields are `Final`: mypy --strict refuses an assignment, and the
    compiled class refuses one at run time too.
    """

    __slots__ = ()
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self.__match_args__])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self) or not isinstance(other, Record):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{n}={v!r}" for n, v in zip(self.__match_args__, self._values(), strict=True)
        )
        return f"{type(self).__name__}({fields})"


class Run(Record):
    __slots__ = (
        "cookie",
        "detach",
        "max_attempts",
        "pipeline",
        "priority",
        "timeout_ms",
        "variables",
    )
    __match_args__ = (
        "cookie",
        "pipeline",
        "variables",
        "detach",
        "priority",
        "timeout_ms",
        "max_attempts",
    )

    def __init__(
        self,
        cookie: bytes,
        pipeline: str,
        variables: Any = None,
        detach: bool = False,
        priority: int = 0,
        timeout_ms: int | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self.cookie: Final = cookie
        self.pipeline: Final = pipeline
        self.variables: Final = variables
        self.detach: Final = detach
        self.priority: Final = priority
        self.timeout_ms: Final = timeout_ms
        self.max_attempts: Final = max_attempts


@_packet
class Cancel:
    cookie: bytes


class Result(Record):
    __slots__ = ("cookie", "error", "rc", "result", "stacktrace")
    __match_args__ = ("cookie", "rc", "error", "stacktrace", "result")

    def __init__(
        self,
        cookie: bytes | None,
        rc: ResultCode,
        error: str | None = None,
        stacktrace: tuple[str, ...] | None = None,
        result: Any = None,
    ) -> None:
        self.cookie: Final = cookie
        self.rc: Final = rc
        self.error: Final = error
        self.stacktrace: Final = stacktrace
        self.result: Final = result


class Raw(Record):
    """A msgpack payload (`variables`, `result`) kept as the bytes of its value.

    The broker's decoder (`PacketDecoder(raw_payloads=True)`) hands the
    payloads of plain RUN and RESULT frames on as Raw: checked to be one value
    msgpack decodes (see `_skip`), never decoded, and written to the next
    msgpack peer byte for byte. Only a JSON peer, or a packet sent the general
    way, has it decoded (`value`). A nil payload is None, never a Raw.
    """

    __slots__ = ("data",)
    __match_args__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: Final = data

    def value(self) -> Any:
        return _unpack_value(self.data)


@_packet
class Hello:
    role: Role | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a log line
    features: tuple[str, ...] = ()
    name: str | None = None
    version: str | None = None
    heartbeat_ms: int | None = None


@_packet
class Ping:
    pass


@_packet
class Pong:
    pass


@_packet
class Started:
    cookie: bytes


@_packet
class Progress:
    cookie: bytes
    result: Any = None


@_packet
class Shutdown:
    pass


@_packet
class Status:
    """STATUS: from an admin peer a request (`status` None), from the broker the answer."""

    status: dict[str, Any] | None = None


@_packet
class Unsupported:
    """A well-formed packet whose type this broker does not handle (answered, not fatal)."""

    packet_type: str
    cookie: bytes | None = None


@_packet
class BadPacket:
    """A packet of a known type with a known key of the wrong type (answered BAD_PACKET)."""

    packet_type: str
    cookie: bytes | None
    why: str


Packet = (
    Register
    | Run
    | Cancel
    | Result
    | Hello
    | Ping
    | Pong
    | Started
    | Progress
    | Shutdown
    | Status
    | Unsupported
    | BadPacket
)


def for_legacy(packet: Result) -> Result:
    """Map reasonbroker's own result codes to what ReasonChip's peers understand.

    ReasonChip's client drops the whole connection on a code it does not know,
    so CANCELLED, TIMEOUT and UNAUTHORIZED travel as EXCEPTION with the real
    code leading `error` (PROTOCOL.md section 6).
    """
    if packet.rc in LEGACY_RESULT_CODES:
        return packet
    error = f"{packet.rc.value}: {packet.error}" if packet.error else packet.rc.value
    return Result(packet.cookie, ResultCode.EXCEPTION, error, packet.stacktrace, packet.result)


def new_cookie() -> bytes:
    return uuid.uuid4().bytes


def cookie_str(cookie: bytes | None) -> str | None:
    """The canonical text form of a cookie, for logs and the JSON codec."""
    if cookie is None:
        return None
    if len(cookie) != 16:
        return str(uuid.UUID(bytes=cookie))  # raises ValueError, as it always did
    # What str(uuid.UUID(bytes=cookie)) gives, without building a UUID
    # (a JSON peer's every RESULT carries one).
    h = cookie.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---------------------------------------------------------------------------
# Framing


class PacketDecoder:
    """Incremental decoder for one connection: feed bytes, get packets.

    The first frame fixes the connection's codec. The length limit is checked
    as soon as the 4-byte header is in, before any of the body is buffered.
    Any `RemoteProtocolError` is final for the connection: the caller closes it.

    With `raw_payloads` (the broker's decoders) the payload of a plain RUN or
    RESULT comes out as `Raw`, its bytes unparsed; otherwise it is decoded.
    """

    __slots__ = (
        "_held",
        "_held_bytes",
        "_max",
        "_need",
        "_pipe_name",
        "_pipe_raw",
        "_raw",
        "codec",
        "error",
    )

    def __init__(self, max_frame_bytes: int, raw_payloads: bool = False) -> None:
        # The reads an unfinished frame has arrived in so far, kept as they
        # came (bytes are immutable) and joined once it is whole: a large
        # frame is copied once here, not once per read and again at the end.
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._max = max_frame_bytes
        self._raw = raw_payloads
        # Bytes held before a whole frame can be among them: a large frame
        # arriving in many reads is gathered, not re-scanned.
        self._need = 0
        # The last pipeline name read, as wire bytes and as text: a connection
        # names the same few pipelines over and over.
        self._pipe_raw = b""
        self._pipe_name = ""
        self.codec: Codec | None = None
        # Set when a bad frame followed good ones in the same feed: those good
        # packets are returned first (a worker's RESULT just before garbage
        # still counts) and the error is raised by the next feed.
        self.error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        return self._held_bytes

    def feed(self, data: bytes) -> list[Packet]:
        if self.error is not None:
            raise self.error
        if self._held:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes < self._need:
                return []
            # One copy of what was held; from here on, as if it all came at once.
            data = b"".join(self._held)
            self._held = []
            self._held_bytes = 0
        packets: list[Packet] = []
        pos: i64 = 0
        end: i64 = len(data)
        limit: i64 = self._max
        size: i64 = 0
        native = self.codec is Codec.MSGPACK
        mv: memoryview | None = None
        try:
            while end - pos >= HEADER_BYTES:
                # The 4-byte big-endian length, read in place.
                size = (
                    (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
                )
                if size == 0:
                    raise RemoteProtocolError("frame length is 0")
                if size > limit:
                    raise RemoteProtocolError(
                        f"frame length {size} exceeds max_frame_bytes {limit}"
                    )
                start = pos + HEADER_BYTES
                stop = start + size
                if stop > end:
                    self._need = stop - pos
                    break
                pos = stop
                if native:
                    # The hot path: RUN and RESULT in their plain shape, read
                    # straight from the bytes (see _plain).
                    packet = self._plain(data, start, stop)
                    if packet is not None:
                        packets.append(packet)
                        continue
                if mv is None:
                    mv = memoryview(data)  # zero-copy bodies: `data` is immutable
                packets.append(self._decode(mv[start:stop]))
                native = self.codec is Codec.MSGPACK
            else:
                self._need = 0
        except RemoteProtocolError as exc:
            self.error = exc
            if not packets:
                raise
            return packets
        if pos < end:
            rest = data[pos:] if pos else data
            self._held.append(rest)
            self._held_bytes = len(rest)
        return packets

    def _decode(self, body: bytes | memoryview) -> Packet:
        codec = detect_codec(body)
        if self.codec is None:
            self.codec = codec
        elif codec is not self.codec:
            raise RemoteProtocolError(f"{codec.value} frame on a {self.codec.value} connection")
        return decode_body(body, codec)

    def _plain(self, data: bytes, pos: i64, stop: i64) -> Packet | None:
        """RUN {packet_type, cookie, pipeline[, variables]} or RESULT {packet_type,
        cookie, rc[, result]} read from data[pos:stop] without decoding the map:
        a fixmap of fixstr keys, a 16-byte bin cookie, a known rc.

        None for anything else, even the same packet in another shape (keys
        repeated or unknown, wider types, a payload `_skip` leaves alone): the
        general path decodes that frame, and gives the same packet or raises
        for the same bad input (tests/test_protocol.py checks both).
        """
        # Positions and lengths are i64: mypyc compiles them to C integers.
        head: i64 = data[pos]
        if head < 0x83 or head > 0x84:
            return None
        pos += 1
        kind: i64 = 0  # 1 RUN, 2 RESULT
        seen: i64 = 0
        bit: i64 = 0
        n: i64 = 0
        cookie = b""
        pipeline = ""
        rc: ResultCode | None = None
        payload: Any = None
        keys = head & 0x0F
        while keys:
            keys -= 1
            if pos >= stop:
                return None
            kb: i64 = data[pos]
            if kb < 0xA2 or kb > 0xAB:  # a fixstr of 2 to 11 bytes
                return None
            k = pos + 1
            klen = kb & 0x1F
            pos = k + klen
            if pos >= stop:  # the value must follow
                return None
            if klen == 11 and _same(data, k, b"packet_type"):
                bit = 1
                if _same(data, pos, b"\xa3RUN"):
                    kind = 1
                    pos += 4
                elif _same(data, pos, b"\xa6RESULT"):
                    kind = 2
                    pos += 7
                else:
                    return None
            elif klen == 6 and _same(data, k, b"cookie"):
                bit = 2
                if data[pos] != 0xC4 or pos + 18 > stop or data[pos + 1] != 16:
                    return None
                cookie = data[pos + 2 : pos + 18]
                pos += 18
            elif klen == 8 and _same(data, k, b"pipeline"):
                bit = 4
                vb: i64 = data[pos]
                if vb >= 0xA1 and vb <= 0xBF:  # a non-empty fixstr
                    n = vb & 0x1F
                    pos += 1
                elif vb == 0xD9 and pos + 1 < stop and data[pos + 1] > 0:  # str 8
                    n = data[pos + 1]
                    pos += 2
                else:
                    return None
                if pos + n > stop:
                    return None
                if n == len(self._pipe_raw) and _same(data, pos, self._pipe_raw):
                    pipeline = self._pipe_name
                else:
                    raw_name = data[pos : pos + n]
                    try:
                        pipeline = raw_name.decode()
                    except UnicodeDecodeError:
                        return None
                    self._pipe_raw = raw_name
                    self._pipe_name = pipeline
                pos += n
            elif klen == 2 and _same(data, k, b"rc"):
                bit = 8
                if _same(data, pos, b"\xa2OK"):
                    rc = ResultCode.OK
                    pos += 3
                else:
                    vb = data[pos]
                    if vb < 0xA1 or vb > 0xBF:
                        return None
                    n = vb & 0x1F
                    if pos + 1 + n > stop:
                        return None
                    rc = _RESULT_CODES_RAW.get(data[pos + 1 : pos + 1 + n])
                    if rc is None:
                        return None
                    pos += 1 + n
            elif (klen == 9 and _same(data, k, b"variables")) or (
                klen == 6 and _same(data, k, b"result")
            ):
                bit = 16 if klen == 9 else 32
                if data[pos] == 0xC0:
                    payload = None
                    pos += 1
                else:
                    value_end = _skip(data, pos, stop)
                    if value_end < 0:
                        return None
                    span = data[pos:value_end]
                    payload = Raw(span) if self._raw else _unpack_value(span)
                    pos = value_end
            else:
                return None
            if seen & bit:
                return None  # a repeated key: the general path's map keeps the last
            seen |= bit
        if pos != stop:
            return None
        if kind == 1 and (seen | 16) == 1 | 2 | 4 | 16:
            return Run(cookie, pipeline, payload)
        if kind == 2 and rc is not None and (seen | 32) == 1 | 2 | 8 | 32:
            return Result(cookie, rc, None, None, payload)
        return None


def _same(data: bytes, pos: i64, word: bytes) -> bool:
    """Whether data holds `word` at `pos` (compared in place, nothing sliced)."""
    n: i64 = len(word)
    if pos + n > len(data):
        return False
    i: i64 = 0
    while i < n:
        if data[pos + i] != word[i]:
            return False
        i += 1
    return True


# Deeper payloads than this are left to msgpack, the general path (whose own
# limit is 1024 containers open at once).
_SKIP_MAX_DEPTH: Final = 64
# Widths of the fixed-size msgpack types after their type byte, by type byte;
# 0 where the type is sized otherwise or not handled here.
_FIXED_WIDTH: Final = bytes(
    {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
     0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}.get(b, 0) for b in range(256)
)  # fmt: skip


def _skip(data: bytes, pos: i64, stop: i64) -> i64:
    """Where the one msgpack value at data[pos] ends, or -1.

    -1 when msgpack-python (raw=False, strict_map_key=False) would refuse it
    (truncated, 0xc1, a string that is not UTF-8, a list or map as a map key)
    and also for what this walker leaves to msgpack: extension types and
    nesting deeper than _SKIP_MAX_DEPTH. So a value it passes is one msgpack
    decodes: never more lenient, only sometimes more cautious.
    """
    left: i64 = 1  # values still to read at this level (a map's keys and values both count)
    in_map = False
    n: i64 = 0
    width: i64 = 0
    # The enclosing levels, each saved as left * 2 + in_map; made at the first
    # container (most payloads are a single string or bin).
    outer: list[int] | None = None
    while True:
        if pos >= stop:
            return -1
        b = data[pos]
        is_key = in_map and left % 2 == 0
        left -= 1
        pos += 1
        if b <= 0x7F or b >= 0xE0:  # positive and negative fixint
            pass
        elif b >= 0xA0 and b <= 0xBF:  # fixstr
            n = b & 0x1F
            if n:
                if pos + n > stop or not _utf8(data, pos, n):
                    return -1
                pos += n
        elif b <= 0x9F or b >= 0xDC:  # fixmap, fixarray; array 16/32, map 16/32
            if is_key:
                return -1  # a list or dict key: unhashable in msgpack-python
            if b <= 0x8F:
                n, is_map = b & 0x0F, True
            elif b <= 0x9F:
                n, is_map = b & 0x0F, False
            else:
                width = 2 if b == 0xDC or b == 0xDE else 4
                if pos + width > stop:
                    return -1
                n = _uint(data, pos, width)
                pos += width
                is_map = b >= 0xDE
            if n:
                if outer is None:
                    outer = []
                elif len(outer) >= _SKIP_MAX_DEPTH:
                    return -1
                outer.append(left * 2 + int(in_map))
                left = n * 2 if is_map else n
                in_map = is_map
        elif 0xC4 <= b <= 0xC6 or 0xD9 <= b <= 0xDB:  # bin, str 8/16/32
            width = 1 << ((b - 0xC4) if b <= 0xC6 else (b - 0xD9))
            if pos + width > stop:
                return -1
            n = _uint(data, pos, width)
            pos += width
            if pos + n > stop:
                return -1
            if b >= 0xD9 and n and not _utf8(data, pos, n):
                return -1
            pos += n
        elif b == 0xC0 or b == 0xC2 or b == 0xC3:  # nil, false, true
            pass
        else:
            width = _FIXED_WIDTH[b]
            if not width:
                return -1  # 0xc1 (never used) or an extension type
            if pos + width > stop:
                return -1
            pos += width
        while left == 0:
            if outer is None or not outer:
                return pos
            saved = outer.pop()
            left = saved >> 1
            in_map = bool(saved & 1)


def _uint(data: bytes, pos: i64, width: i64) -> i64:
    """The big-endian unsigned integer in data[pos:pos+width] (width <= 4), read in place."""
    n: i64 = 0
    end = pos + width
    while pos < end:
        n = (n << 8) | data[pos]
        pos += 1
    return n


def _utf8(data: bytes, pos: i64, n: i64) -> bool:
    """Whether data[pos:pos+n] is UTF-8 (what msgpack's raw=False insists on)."""
    i = pos
    end = pos + n
    while i < end:
        if data[i] >= 0x80:
            break
        i += 1
    else:
        return True  # ASCII: nothing to decode
    try:
        data[pos : pos + n].decode()
    except UnicodeDecodeError:
        return False
    return True


def _unpack_value(span: bytes) -> Any:
    """A payload (`_skip` has passed it, or it is a Raw's), decoded."""
    return msgpack.unpackb(span, raw=False, strict_map_key=False)


_MSGPACK_MAP_FIRST: Final = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


def detect_codec(body: bytes | memoryview) -> Codec:
    first = body[0]
    if first in _MSGPACK_MAP_FIRST:
        return Codec.MSGPACK
    if first == 0x7B:  # "{"
        return Codec.JSON
    raise RemoteProtocolError(
        f"body is neither a msgpack map nor a JSON object (first byte 0x{first:02x})"
    )


def decode_body(body: bytes | memoryview, codec: Codec) -> Packet:
    """Decode one frame body. Raises RemoteProtocolError when it is not a map at all."""
    if codec is Codec.MSGPACK:
        return packet_from_map(_unpack_map(body), codec)
    data = bytes(body) if isinstance(body, memoryview) else body
    obj = _json_object(data)
    if obj is None:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise RemoteProtocolError(f"undecodable JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"body is a {type(obj).__name__}, not a map")
    _check_json_text(obj)
    return packet_from_map(obj, codec)


# json.loads' own steps for a UTF-8 body, without its Python-level wrappers.
_json_scan: Final = json.scanner.make_scanner(cast(Any, json.JSONDecoder()))
_json_space: Final = re.compile(r"[ \t\n\r]*").match  # json.decoder.WHITESPACE


def _json_object(data: bytes) -> Any:
    """What json.loads(data) returns, for a body that is one UTF-8 JSON object
    (what json.loads reads as UTF-8: it starts with "{"); None for anything
    else, or on any error: json.loads then says what is wrong."""
    if len(data) < 4 or data[0] != 0x7B or not data[1]:
        return None
    try:
        text = data.decode("utf-8", "surrogatepass")
        obj, end = _json_scan(text, 0)
    except (ValueError, RecursionError, StopIteration):
        return None
    space = _json_space(text, end)  # always matches: the pattern takes nothing too
    if space is None or space.end() != len(text):
        return None  # data after the object
    return obj


def _check_json_text(obj: dict[Any, Any]) -> None:
    """Refuse lone surrogates ("\\ud800"): JSON's escapes allow them, but no
    codec can send them on, so a job carrying one could never be answered."""
    for value in obj.values():
        texts = value if isinstance(value, list) else (value,)
        for text in texts:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    raise RemoteProtocolError(
                        "JSON string holds a lone surrogate (not valid Unicode)"
                    ) from None


def _unpack_map(body: bytes | memoryview) -> dict[Any, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from exc
    if type(obj) is not dict:
        raise RemoteProtocolError(f"body is a {type(obj).__name__}, not a map")
    return obj


class _Bad(Exception):
    """Internal: a known key had the wrong type."""


def _cookie(value: Any, codec: Codec) -> bytes:
    if isinstance(value, bytes) and codec is Codec.MSGPACK:
        if len(value) != 16:
            raise _Bad(f"cookie is {len(value)} bytes, not 16")
        return value
    if isinstance(value, str):
        # Only the canonical 8-4-4-4-12 form (hex digits in either case):
        # uuid.UUID() alone would also take braces, "urn:" and hyphens anywhere.
        if (
            len(value) == 36
            and value[8] == "-"
            and value[13] == "-"
            and value[18] == "-"
            and value[23] == "-"
        ):
            try:
                raw = bytes.fromhex(
                    value[:8] + value[9:13] + value[14:18] + value[19:23] + value[24:]
                )
            except ValueError:
                raw = b""
            # 16 bytes from 32 characters: every one was a hex digit (fromhex
            # skips whitespace, which would leave fewer than 16).
            if len(raw) == 16:
                return raw
        # Not canonical: uuid.UUID says which way, for the error.
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            raise _Bad("cookie is not a UUID") from None
        if len(value) != 36 or str(parsed) != value.lower():
            raise _Bad("cookie is not a canonical UUID string")
        return parsed.bytes
    raise _Bad(f"cookie is a {type(value).__name__}")


def _opt_str(d: dict[Any, Any], key: str) -> str | None:
    v = d.get(key)
    if v is None or isinstance(v, str):
        return v
    raise _Bad(f"{key} is a {type(v).__name__}, not a string")


def _opt_int(d: dict[Any, Any], key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _Bad(f"{key} is a {type(v).__name__}, not an integer")


def _opt_bool(d: dict[Any, Any], key: str) -> bool | None:
    v = d.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise _Bad(f"{key} is a {type(v).__name__}, not a boolean")


def _opt_strs(d: dict[Any, Any], key: str) -> tuple[str, ...] | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise _Bad(f"{key} is not a list of strings")


def _payload(d: dict[Any, Any], key: str, codec: Codec) -> Any:
    v = d.get(key)
    if codec is Codec.JSON and v is not None and not isinstance(v, str):
        raise _Bad(f"{key} must be a JSON string (the payload's text), not {type(v).__name__}")
    return v


def packet_from_map(d: dict[Any, Any], codec: Codec) -> Packet:
    """Build a packet from a decoded map; a known key of the wrong type gives BadPacket."""
    ptype = d.get("packet_type")
    if not isinstance(ptype, str):
        return BadPacket("", _salvage_cookie(d, codec), "packet_type is missing or not a string")
    try:
        match ptype:
            case "RUN":
                pipeline = _opt_str(d, "pipeline")
                if not pipeline:
                    raise _Bad("pipeline is missing or empty")
                priority = _opt_int(d, "priority") or 0
                timeout_ms = _opt_int(d, "timeout_ms")
                if timeout_ms is not None and not 0 < timeout_ms <= MAX_TIMEOUT_MS:
                    raise _Bad(f"timeout_ms must be > 0 and <= {MAX_TIMEOUT_MS}")
                max_attempts = _opt_int(d, "max_attempts")
                if max_attempts is not None and max_attempts < 1:
                    raise _Bad("max_attempts must be >= 1")
                return Run(
                    _cookie(d.get("cookie"), codec),
                    pipeline,
                    _payload(d, "variables", codec),
                    bool(_opt_bool(d, "detach")),
                    priority,
                    timeout_ms,
                    max_attempts,
                )
            case "RESULT":
                rc_text = _opt_str(d, "rc")
                rc = _RESULT_CODES.get(rc_text) if rc_text is not None else None
                if rc is None:
                    raise _Bad(f"rc {rc_text!r} is not a result code")
                # The broker's own answers may carry no cookie (UNAUTHORIZED to
                # a HELLO, BAD_PACKET with nothing to salvage); from a worker a
                # cookie-less RESULT matches no job and is dropped.
                raw_cookie = d.get("cookie")
                return Result(
                    None if raw_cookie is None else _cookie(raw_cookie, codec),
                    rc,
                    _opt_str(d, "error"),
                    _opt_strs(d, "stacktrace"),
                    _payload(d, "result", codec),
                )
            case "CANCEL":
                return Cancel(_cookie(d.get("cookie"), codec))
            case "REGISTER":
                capacity = _opt_int(d, "capacity")
                if capacity is None or capacity < 1:
                    raise _Bad("capacity must be an integer >= 1")
                return Register(capacity, _opt_strs(d, "pipelines"))
            case "HELLO":
                role_text = _opt_str(d, "role")
                role = None
                if role_text is not None:
                    try:
                        role = Role(role_text)
                    except ValueError:
                        raise _Bad(f"role {role_text!r} is not client, worker or admin") from None
                return Hello(
                    role,
                    _opt_str(d, "token"),
                    _opt_strs(d, "features") or (),
                    _opt_str(d, "name"),
                    _opt_str(d, "version"),
                    _opt_int(d, "heartbeat_ms"),
                )
            case "PING":
                return Ping()
            case "PONG":
                return Pong()
            case "STARTED":
                return Started(_cookie(d.get("cookie"), codec))
            case "PROGRESS":
                return Progress(_cookie(d.get("cookie"), codec), _payload(d, "result", codec))
            case "SHUTDOWN":
                return Shutdown()
            case "STATUS":
                status = d.get("status")
                if status is not None and not isinstance(status, dict):
                    raise _Bad(f"status is a {type(status).__name__}, not a map")
                return Status(status)
            case _:
                return Unsupported(ptype, _salvage_cookie(d, codec))
    except _Bad as bad:
        return BadPacket(ptype, _salvage_cookie(d, codec), str(bad))


def _salvage_cookie(d: dict[Any, Any], codec: Codec) -> bytes | None:
    try:
        return _cookie(d.get("cookie"), codec)
    except _Bad:
        return None


# ---------------------------------------------------------------------------
# Encoding


def packet_to_map(packet: Packet) -> dict[str, Any]:
    """The flat map for a packet; unset (None) fields are left out."""
    match packet:
        case Run(cookie, pipeline, variables, detach, priority, timeout_ms, max_attempts):
            d: dict[str, Any] = {"packet_type": "RUN", "cookie": cookie, "pipeline": pipeline}
            if variables is not None:
                d["variables"] = variables
            if detach:
                d["detach"] = True
            if priority:
                d["priority"] = priority
            if timeout_ms is not None:
                d["timeout_ms"] = timeout_ms
            if max_attempts is not None:
                d["max_attempts"] = max_attempts
            return d
        case Result(cookie, rc, error, stacktrace, result):
            d = {"packet_type": "RESULT", "cookie": cookie, "rc": rc.value}
            if error is not None:
                d["error"] = error
            if stacktrace is not None:
                d["stacktrace"] = list(stacktrace)
            if result is not None:
                d["result"] = result
            return d
        case Cancel(cookie):
            return {"packet_type": "CANCEL", "cookie": cookie}
        case Register(capacity, pipelines):
            d = {"packet_type": "REGISTER", "capacity": capacity}
            if pipelines is not None:
                d["pipelines"] = list(pipelines)
            return d
        case Hello(role, token, features, name, version, heartbeat_ms):
            d = {"packet_type": "HELLO", "features": list(features)}
            for key, value in (
                ("role", role.value if role is not None else None),
                ("token", token),
                ("name", name),
                ("version", version),
                ("heartbeat_ms", heartbeat_ms),
            ):
                if value is not None:
                    d[key] = value
            return d
        case Ping():
            return {"packet_type": "PING"}
        case Pong():
            return {"packet_type": "PONG"}
        case Started(cookie):
            return {"packet_type": "STARTED", "cookie": cookie}
        case Progress(cookie, result):
            return {"packet_type": "PROGRESS", "cookie": cookie, "result": result}
        case Shutdown():
            return {"packet_type": "SHUTDOWN"}
        case Status(status):
            if status is None:
                return {"packet_type": "STATUS"}
            return {"packet_type": "STATUS", "status": status}
        case Unsupported() | BadPacket():
            raise EncodeError(f"{type(packet).__name__} is an inbound-only packet")


def _unraw(obj: object) -> Any:
    """msgpack's `default`: a Raw payload in a packet sent the general way is decoded."""
    if isinstance(obj, Raw):
        return obj.value()
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


_packb = msgpack.Packer(use_bin_type=True, autoreset=True, default=_unraw).pack


def _msgpack_pieces(packet_type: str, map_size: int) -> bytes:
    """The bytes that open a plain RUN/RESULT map, up to its 16-byte cookie."""
    opening: bytes = (
        bytes([0x80 | map_size])
        + _packb("packet_type")
        + _packb(packet_type)
        + _packb("cookie")
        + b"\xc4\x10"  # bin 8, 16 bytes
    )
    return opening


# The per-job packets in their plain shape are written from these pieces:
# the same bytes as packing packet_to_map's map (the keys in the same order),
# without building the map. tests/test_protocol.py checks the two agree.
_RUN_OPEN3: Final = _msgpack_pieces("RUN", 3)
_RUN_OPEN4: Final = _msgpack_pieces("RUN", 4)
_RESULT_OPEN3: Final = _msgpack_pieces("RESULT", 3)
_RESULT_OPEN4: Final = _msgpack_pieces("RESULT", 4)
_PIPELINE_KEY: Final = _packb("pipeline")
_VARIABLES_KEY: Final = _packb("variables")
_RC_KEY: Final = _packb("rc")
_RESULT_KEY: Final = _packb("result")
# What follows the cookie, up to the payload: rc and its code, with and
# without the result key after them.
_RC_THEN3: Final = {rc: _RC_KEY + _packb(rc.value) for rc in ResultCode}
_RC_THEN4: Final = {rc: _RC_KEY + _packb(rc.value) + _RESULT_KEY for rc in ResultCode}

# The same for RUN, by pipeline name: the pipeline key and the packed name,
# with and without the variables key after them. A broker sends the same few
# names all day; the cache is bounded against a client inventing names.
_PIPELINE_THEN3: Final[dict[str, bytes]] = {}
_PIPELINE_THEN4: Final[dict[str, bytes]] = {}
_PACKED_NAMES_MAX: Final = 4096


def _pipeline_then(name: str, with_variables: bool) -> bytes:
    cache = _PIPELINE_THEN4 if with_variables else _PIPELINE_THEN3
    packed = cache.get(name)
    if packed is None:
        packed = _PIPELINE_KEY + _packb(name)
        if with_variables:
            packed += _VARIABLES_KEY
        if len(cache) >= _PACKED_NAMES_MAX:
            cache.clear()  # a client inventing names: start over, stay bounded
        cache[name] = packed
    return packed


def _header(size: int) -> bytes:
    if size < _SMALL_FRAME:
        return _SMALL_HEADERS[size]
    if size > _MAX_ENCODABLE:
        raise EncodeError(f"packet body of {size} bytes cannot be framed")
    return _pack_length(size)


def _msgpack_parts(packet: Packet, out: list[bytes]) -> int:
    """Append the frame's pieces (header first) to `out`; return its length.

    The pieces are only appended once all of them are made, so a packet that
    cannot be encoded leaves `out` as it was.
    """
    if type(packet) is Run:
        run = packet
        if (
            not (run.detach or run.priority)
            and run.timeout_ms is None
            and run.max_attempts is None
            and len(run.cookie) == 16
        ):
            opening = _RUN_OPEN3
            if run.variables is None:
                middle = _pipeline_then(run.pipeline, False)
                payload = b""
            else:
                opening = _RUN_OPEN4
                middle = _pipeline_then(run.pipeline, True)
                variables = run.variables
                payload = variables.data if type(variables) is Raw else _packb(variables)
            return _append_plain(out, opening, run.cookie, middle, payload)
    elif type(packet) is Result:
        res = packet
        cookie = res.cookie
        if (
            res.error is None
            and res.stacktrace is None
            and cookie is not None
            and len(cookie) == 16
        ):
            if res.result is None:
                return _append_plain(out, _RESULT_OPEN3, cookie, _RC_THEN3[res.rc], b"")
            result = res.result
            payload = result.data if type(result) is Raw else _packb(result)
            return _append_plain(out, _RESULT_OPEN4, cookie, _RC_THEN4[res.rc], payload)
    body: bytes = _packb(packet_to_map(packet))
    head = _header(len(body))
    out.append(head)
    out.append(body)
    return HEADER_BYTES + len(body)


def _append_plain(
    out: list[bytes], opening: bytes, cookie: bytes, middle: bytes, payload: bytes
) -> int:
    size = len(opening) + 16 + len(middle) + len(payload)
    head = _header(size)
    out.append(head)
    out.append(opening)
    out.append(cookie)
    out.append(middle)
    if payload:
        out.append(payload)
    return HEADER_BYTES + size


def encode_into(packet: Packet, codec: Codec, out: list[bytes]) -> int:
    """Append `packet`'s frame to `out` as pieces whose join is `encode(packet,
    codec)`; return the frame's length. On EncodeError `out` is unchanged.

    For a writer that joins many frames into one write anyway (the broker's
    outbox): the pieces are copied once, by that join.
    """
    try:
        if codec is Codec.MSGPACK:
            return _msgpack_parts(packet, out)
        body = _json_body(packet_to_map(packet))
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{codec.value} cannot carry this packet: {exc}") from exc
    head = _header(len(body))
    out.append(head)
    out.append(body)
    return HEADER_BYTES + len(body)


def encode(packet: Packet, codec: Codec = Codec.MSGPACK) -> bytes:
    """One whole frame (header and body) for `packet` in `codec`.

    Raises EncodeError when the codec cannot carry a value (bytes to JSON, a
    non-string payload to JSON, an object msgpack cannot pack).
    """
    parts: list[bytes] = []
    encode_into(packet, codec, parts)
    return b"".join(parts)


_JSON_KEYS: Final = (
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


# json.dumps with any option builds a JSONEncoder per call; this one is made once.
_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The C function that encoder writes each string with (ensure_ascii=False).
_json_str: Final = json.encoder.encode_basestring
_JSON_KEY_TEXT: Final = {key: _json_str(key) + ":" for key in _JSON_KEYS}


def _json_flat(d: dict[str, Any]) -> str | None:
    """`_json_encode(d)` for a map of null, string, boolean and integer values
    (every per-job packet), written here; None for anything else."""
    parts: list[str] = []
    for key, value in d.items():
        if value is None:
            text = "null"
        elif type(value) is str:
            text = _json_str(value)
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif type(value) is int:
            text = str(value)
        else:
            return None
        head = _JSON_KEY_TEXT.get(key)
        parts.append((_json_str(key) + ":" if head is None else head) + text)
    return "{" + ",".join(parts) + "}"


def _json_body(d: dict[str, Any]) -> bytes:
    # ReasonChip's SocketPacket dumps all ten keys with null for unset ones;
    # we do the same so its pydantic model sees exactly what it would send.
    out: dict[str, Any] = dict.fromkeys(_JSON_KEYS)
    for key, value in d.items():
        if isinstance(value, Raw):
            value = value.value()
        if key == "cookie":
            out[key] = cookie_str(value)
        elif key in ("variables", "result") and not (value is None or isinstance(value, str)):
            raise EncodeError(f"{key} must be a string for a JSON peer, not {type(value).__name__}")
        else:
            out[key] = value
    try:
        flat = _json_flat(out)
        return (_json_encode(out) if flat is None else flat).encode()
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"JSON cannot carry this packet: {exc}") from exc


def can_carry(value: Any, codec: Codec) -> bool:
    """Whether an opaque payload (variables/result) can cross to a peer using `codec`."""
    if codec is Codec.MSGPACK or value is None:
        return True
    if isinstance(value, Raw):
        first = value.data[0]  # a str (fixstr, str 8/16/32) or nil
        return 0xA0 <= first <= 0xBF or 0xD9 <= first <= 0xDB or first == 0xC0
    return isinstance(value, str)


def payload_kind(value: Any) -> str:
    """A payload's type, for a message saying why it could not be carried."""
    return type(value.value() if isinstance(value, Raw) else value).__name__
