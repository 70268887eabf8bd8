"""Packet types, sans-IO: what a frame means once decoded.

Owns the closed union of packets (one immutable class per type; RUN, RESULT
Raw and RawJson written by hand as native `Record`s for mypyc), the packet and result
code enums, the codec and role names, cookies (the 16 raw bytes of a UUID,
which is what msgpack carries, so the hot path never builds `uuid.UUID`) and
the mapping of reasonbroker's own result codes for ReasonChip's peers.
Nothing here touches bytes on the wire: codecs.py and framing.py do.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import field
from typing import Any, ClassVar, Final, TypeAlias

import msgpack

try:
    from orjson import loads as _json_loads
except ImportError:  # the stdlib reads a RawJson's literal to the same text
    from json import loads as _json_loads  # type: ignore[assignment]

from ._frozen import packet as _packet

# The largest RUN timeout_ms (about 24.8 days, a signed 32-bit count of ms):
# JSON integers are unbounded, and a deadline must stay a finite float.
MAX_TIMEOUT_MS: Final = 2**31 - 1

Chunk: TypeAlias = bytes | memoryview
"""Bytes as they are read or written: a bytes object, or a read-only view
into one (a large payload stays in the frame it came in, see `Raw`)."""


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
    # Durable jobs (PROTOCOL.md section 7).
    ACCEPTED = "ACCEPTED"
    ATTACH = "ATTACH"
    JOB = "JOB"
    DRAIN = "DRAIN"
    RETURN = "RETURN"


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
        "ack",
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
        "ack",
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
        ack: bool = False,
    ) -> None:
        self.cookie: Final = cookie
        self.pipeline: Final = pipeline
        self.variables: Final = variables
        self.detach: Final = detach
        self.priority: Final = priority
        self.timeout_ms: Final = timeout_ms
        self.max_attempts: Final = max_attempts
        # Feature `ack` (docs/protocol.md): this RUN asks for its ACCEPTED.
        self.ack: Final = ack


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

    `data` is bytes, or for a large payload a read-only view of the bytes of
    the frame it came in (the rest of that frame is a few dozen bytes), so it
    is neither copied out of the frame nor into the frame it goes out in.
    """

    __slots__ = ("data",)
    __match_args__ = ("data",)

    def __init__(self, data: Chunk) -> None:
        self.data: Final = data

    def value(self) -> Any:
        return _unpack_value(self.data)


class RawJson(Record):
    """A JSON payload (`variables`, `result`) kept as the string literal it
    came in: the bytes from its opening quote to its closing one.

    The broker's decoder hands the payloads of plain JSON RUN and RESULT
    frames on as RawJson when the literal is already in the form the broker
    writes a string in (ReasonChip's pydantic and the stdlib's, see
    framing._json_literal_end): valid UTF-8, every escape the short one
    json writes. So it is written to the next JSON peer byte for byte, the
    same bytes decoding and writing it again would give; only a msgpack
    peer, or a packet sent the general way, has it decoded (`value`).
    `chars` is the text's length in characters (the payload budgets count
    characters for a JSON peer's text). A null payload is None, never a RawJson.
    """

    __slots__ = ("chars", "data")
    __match_args__ = ("data",)

    def __init__(self, data: bytes, chars: int) -> None:
        self.data: Final = data
        self.chars: Final = chars

    def value(self) -> str:
        text: str = _json_loads(self.data)
        return text


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
class Drain:
    """DRAIN, from a worker that said HELLO: it is stopping; send it no more RUNs."""


@_packet
class Return:
    """RETURN, from a worker that said HELLO: the RUN `cookie` was not started;
    the broker gives it to another worker without counting an attempt."""

    cookie: bytes


@_packet
class Status:
    """STATUS: from an admin peer a request (`status` None), from the broker the answer."""

    status: dict[str, Any] | None = None


@_packet
class Accepted:
    """ACCEPTED: the job is accepted and, with a journal, committed (section 7)."""

    cookie: bytes


@_packet
class Attach:
    """ATTACH: make this connection one of the job's clients (`wait`), or ask for its JOB."""

    cookie: bytes
    wait: bool = True


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"


@_packet
class Job:
    """JOB: the answer to ATTACH with `wait` false: where the job is."""

    cookie: bytes
    state: JobState
    pipeline: str | None = None
    attempts: int = 0
    rc: ResultCode | None = None
    error: str | None = None


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
    | Accepted
    | Attach
    | Job
    | Drain
    | Return
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


def _unpack_value(span: Chunk) -> Any:
    """A payload (`_skip` has passed it, or it is a Raw's), decoded."""
    return msgpack.unpackb(span, raw=False, strict_map_key=False)
