"""The two codecs, sans-IO: msgpack (native) and JSON (ReasonChip's).

Owns what a frame body holds: detecting its codec, decoding a body into a
packet (`decode_body`, `packet_from_map`: a known key of the wrong type gives
`BadPacket`), the msgpack value walker that checks a payload without decoding
it (`_skip`), a packet's flat map (`packet_to_map`), the pieces the plain
per-job msgpack frames are written from, the JSON body writer, and whether a
payload can cross to a peer of the other codec (`can_carry`). Framing (the
length header, the decoder's loop) is framing.py's.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
import uuid
from collections.abc import Callable
from typing import Any, Final, cast

import msgpack
from mypy_extensions import i64

try:
    import orjson
except ImportError:  # the stdlib's json serves instead, byte for byte the same
    orjson = None  # type: ignore[assignment]

from .errors import EncodeError, RemoteProtocolError
from .packets import (
    _RESULT_CODES,
    MAX_TIMEOUT_MS,
    Accepted,
    Attach,
    BadPacket,
    Cancel,
    Codec,
    Drain,
    Hello,
    Job,
    JobState,
    Packet,
    Ping,
    Pong,
    Progress,
    Raw,
    RawJson,
    Register,
    Result,
    ResultCode,
    Return,
    Role,
    Run,
    Shutdown,
    Started,
    Status,
    Unsupported,
    _unpack_value,
    cookie_str,
)


def _same(data: bytes, pos: i64, word: bytes) -> bool:
    """Whether data holds `word` at `pos` (compared in place, nothing sliced)."""
    n: i64 = len(word)
    if pos + n > len(data):
        return False
    if n > 24:
        # A long piece (the JSON shapes' runs of keys and nulls): one slice
        # and memcmp cost less than a compiled loop's two reads a byte.
        return data[pos : pos + n] == word
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
    obj = _orjson_object(body)
    if obj is not None:
        return packet_from_map(obj, codec)
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


# orjson when it is installed (a module global, so a test can take it away);
# None: the stdlib reads and writes every JSON body.
_orjson: Any = orjson


def _orjson_object(body: bytes | memoryview) -> dict[Any, Any] | None:
    """What the stdlib path below reads from a JSON object body, read by
    orjson (4x faster on a per-job packet); None when orjson is not there or
    might read the body otherwise: any error (the stdlib then gives its own
    reading or its own error: it takes NaN, 1e400 and lone surrogates, which
    orjson refuses), and any float or map at the top (orjson reads an
    integer past 64 bits as a float, the stdlib as an int; in a list, such a
    number makes the same BadPacket either way). A string orjson returns is
    valid Unicode, so the lone-surrogate check has nothing to find."""
    if _orjson is None:
        return None
    try:
        obj = _orjson.loads(body)
    except ValueError:  # orjson.JSONDecodeError
        return None
    if type(obj) is not dict:
        return None
    for value in obj.values():
        if type(value) is float or type(value) is dict:
            return None  # a map is only ever STATUS's, passed on as it was read
    return obj


def json_literal_text(literal: bytes) -> str | None:
    """The text of one whole JSON string literal (quotes included) as json
    reads it, or None when json would refuse it (a control character, a bad
    escape, not UTF-8) or it holds a lone surrogate (see _check_json_text).
    orjson checks and decodes it in one pass; else json's own C reader."""
    if _orjson is not None:
        try:
            text = _orjson.loads(literal)
        except ValueError:  # orjson.JSONDecodeError: lone surrogates too
            return None
        return text if type(text) is str else None
    try:
        decoded = literal.decode()
        found: str
        found, end = _scanstring(decoded, 1, True)
    except ValueError:  # UnicodeDecodeError, JSONDecodeError
        return None
    # (`end` counts characters: a non-ASCII literal has more bytes.)
    if end != len(decoded) or (not found.isascii() and _lone_surrogate(found)):
        return None
    return found


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


# json's own reader of a string literal's body (the C one: json.loads reads
# every string with it); its stub is not in typeshed.
_scanstring: Final = cast(
    "Callable[[str, int, bool], tuple[str, int]]", vars(json.decoder)["scanstring"]
)


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


_PAYLOAD_KEYS: Final = (b"\xa9variables", b"\xa6result")


def unpack_map_raw(body: bytes) -> dict[Any, Any]:
    """`_unpack_map(body)`, but with the payloads (`variables`, `result`) kept
    as `Raw` bytes, never decoded: the broker only forwards them, and a
    payload decoded into Python objects can take 15 times its frame
    (1.6 M short strings in an 8 MB frame: 112 MiB).

    Reads the top-level map entry by entry with `_skip`; anything it does not
    read (an extension type, deep nesting, a truncated or trailing byte) goes
    to `_unpack_map`, which decodes or refuses it exactly as before.
    """
    stop: i64 = len(body)
    if stop < 1:
        return _unpack_map(body)
    head: i64 = body[0]
    pos: i64 = 1
    if 0x80 <= head <= 0x8F:
        n = head & 0x0F
    elif head == 0xDE or head == 0xDF:
        width: i64 = 2 if head == 0xDE else 4
        if stop < 1 + width:
            return _unpack_map(body)
        n = _uint(body, 1, width)
        pos = 1 + width
    else:
        return _unpack_map(body)
    d: dict[Any, Any] = {}
    while n:
        n -= 1
        key_end = _skip(body, pos, stop)
        if key_end < 0:
            return _unpack_map(body)
        key_span = body[pos:key_end]
        value_end = _skip(body, key_end, stop)
        if value_end < 0:
            return _unpack_map(body)
        if key_span in _PAYLOAD_KEYS and body[key_end] != 0xC0:
            value: Any = Raw(body[key_end:value_end])
        else:
            value = _unpack_value(body[key_end:value_end])
        key = _unpack_value(key_span)
        if isinstance(key, list | dict):
            return _unpack_map(body)  # an unhashable key: msgpack refuses it
        d[key] = value
        pos = value_end
    if pos != stop:
        return _unpack_map(body)  # trailing bytes: msgpack says what is wrong
    return d


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
                raw = bytes.fromhex(value.replace("-", ""))
            except ValueError:
                raw = b""
            # 16 bytes from 32 characters: every one was a hex digit (fromhex
            # skips whitespace, and a hyphen elsewhere is taken out too, either
            # of which leaves fewer than 16).
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
            case "DRAIN":
                return Drain()
            case "RETURN":
                return Return(_cookie(d.get("cookie"), codec))
            case "STATUS":
                status = d.get("status")
                if status is not None and not isinstance(status, dict):
                    raise _Bad(f"status is a {type(status).__name__}, not a map")
                return Status(status)
            case "ACCEPTED":
                return Accepted(_cookie(d.get("cookie"), codec))
            case "ATTACH":
                wait = _opt_bool(d, "wait")
                return Attach(_cookie(d.get("cookie"), codec), True if wait is None else wait)
            case "JOB":
                state_text = _opt_str(d, "state")
                try:
                    state = JobState(state_text or "")
                except ValueError:
                    raise _Bad(f"state {state_text!r} is not queued, running or ended") from None
                rc_text = _opt_str(d, "rc")
                rc = _RESULT_CODES.get(rc_text) if rc_text is not None else None
                if rc_text is not None and rc is None:
                    raise _Bad(f"rc {rc_text!r} is not a result code")
                return Job(
                    _cookie(d.get("cookie"), codec),
                    state,
                    _opt_str(d, "pipeline"),
                    _opt_int(d, "attempts") or 0,
                    rc,
                    _opt_str(d, "error"),
                )
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
        case Drain():
            return {"packet_type": "DRAIN"}
        case Return(cookie):
            return {"packet_type": "RETURN", "cookie": cookie}
        case Status(status):
            if status is None:
                return {"packet_type": "STATUS"}
            return {"packet_type": "STATUS", "status": status}
        case Accepted(cookie):
            return {"packet_type": "ACCEPTED", "cookie": cookie}
        case Attach(cookie, wait):
            return {"packet_type": "ATTACH", "cookie": cookie, "wait": wait}
        case Job(cookie, state, pipeline, attempts, rc, error):
            d = {"packet_type": "JOB", "cookie": cookie, "state": state.value}
            d["attempts"] = attempts
            for key, value in (
                ("pipeline", pipeline),
                ("rc", rc.value if rc is not None else None),
                ("error", error),
            ):
                if value is not None:
                    d[key] = value
            return d
        case Unsupported() | BadPacket():
            raise EncodeError(f"{type(packet).__name__} is an inbound-only packet")


def _unraw(obj: object) -> Any:
    """msgpack's `default`: a Raw or RawJson payload in a packet sent the
    general way is decoded."""
    if isinstance(obj, Raw | RawJson):
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
# names all day; the cache is bounded against a client inventing names, in
# entries and in bytes: only names of up to _PACKED_NAME_MAX_CHARS characters
# are kept (at most 4 bytes each), so it holds at most about 4096 x 270 bytes
# per dict however long the names peers send (a long name is packed each time:
# its own bytes dwarf that cost).
_PIPELINE_THEN3: Final[dict[str, bytes]] = {}
_PIPELINE_THEN4: Final[dict[str, bytes]] = {}
_PACKED_NAMES_MAX: Final = 4096
_PACKED_NAME_MAX_CHARS: Final = 64


def _pipeline_then(name: str, with_variables: bool) -> bytes:
    cache = _PIPELINE_THEN4 if with_variables else _PIPELINE_THEN3
    packed = cache.get(name)
    if packed is None:
        fresh: bytes = _PIPELINE_KEY + _packb(name)
        if with_variables:
            fresh += _VARIABLES_KEY
        if len(name) > _PACKED_NAME_MAX_CHARS:
            return fresh  # never cached: the cache stays small in bytes
        packed = fresh
        if len(cache) >= _PACKED_NAMES_MAX:
            cache.clear()  # a client inventing names: start over, stay bounded
        cache[name] = packed
    return packed


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


def _json_text(value: str) -> bytes:
    """A string as the JSON literal the stdlib writes for it (ensure_ascii=False,
    UTF-8): orjson's is the same text, checked for every code point by
    tests/test_protocol.py. A lone surrogate raises UnicodeEncodeError."""
    if _orjson is not None:
        try:
            literal: bytes = _orjson.dumps(value)
        except TypeError:
            pass  # a lone surrogate: the stdlib's error names it
        else:
            # orjson's bytes keep the whole buffer it wrote into (4 KiB at
            # least, 128 KiB for a 64 KiB text); the piece waits in an outbox,
            # so it is copied to its own size and the buffer freed at once.
            return memoryview(literal).tobytes()
    return _json_str(value).encode()


# The integers orjson writes (a 64-bit signed or unsigned range); the stdlib
# writes any, so a map holding a larger one is written by the stdlib.
_ORJSON_INT_MIN: Final = -(2**63)
_ORJSON_INT_END: Final = 2**64


def _orjson_writes_as_stdlib(d: dict[str, Any]) -> bool:
    """Whether orjson.dumps(d) is the stdlib's text for d: values of the types
    every packet sent to a JSON peer has (null, string, boolean, integer in
    64 bits, list of strings), none of the floats or maps the two write apart."""
    for value in d.values():
        kind = type(value)
        if value is None or kind is str or kind is bool:
            continue
        if kind is int:
            if not _ORJSON_INT_MIN <= value < _ORJSON_INT_END:
                return False
        elif kind is list:
            for item in value:
                if type(item) is not str:
                    return False
        else:
            return False
    return True


def _json_body(d: dict[str, Any]) -> bytes:
    # ReasonChip's SocketPacket dumps all ten keys with null for unset ones;
    # we do the same so its pydantic model sees exactly what it would send.
    out: dict[str, Any] = dict.fromkeys(_JSON_KEYS)
    for key, value in d.items():
        if isinstance(value, Raw | RawJson):
            value = value.value()
        if key == "cookie":
            out[key] = cookie_str(value)
        elif key in ("variables", "result") and not (value is None or isinstance(value, str)):
            raise EncodeError(f"{key} must be a string for a JSON peer, not {type(value).__name__}")
        else:
            out[key] = value
    if _orjson is not None and _orjson_writes_as_stdlib(out):
        try:
            return _orjson.dumps(out)  # type: ignore[no-any-return]
        except TypeError:
            pass  # a lone surrogate: the stdlib's error below names it
    try:
        flat = _json_flat(out)
        return (_json_encode(out) if flat is None else flat).encode()
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"JSON cannot carry this packet: {exc}") from exc


# The per-job JSON packets in their plain shape (framing._json_plain_parts)
# are written from these pieces: the same bytes as _json_body writes for
# them, the ten SocketPacket keys in its order, without building the map.
# tests/test_protocol.py checks the two agree.
_JSON_RUN_OPEN: Final = b'{"packet_type":"RUN","cookie":"'
_JSON_RUN_TAIL: Final = b',"detach":null,"rc":null,"error":null,"stacktrace":null,"result":null}'
_JSON_RUN_TAIL_DETACH: Final = (
    b',"detach":true,"rc":null,"error":null,"stacktrace":null,"result":null}'
)
_JSON_RESULT_OPEN: Final = b'{"packet_type":"RESULT","cookie":"'
# What follows a RESULT's cookie up to its error's value, by result code.
_JSON_RC_THEN: Final = {
    rc: b'","capacity":null,"pipeline":null,"variables":null,"detach":null,"rc":'
    + _json_text(rc.value)
    + b',"error":'
    for rc in ResultCode
}
_JSON_RESULT_THEN: Final = b',"stacktrace":null,"result":'
# After a RUN's cookie, by pipeline name, up to the variables' value; bounded
# as _PIPELINE_THEN3 is.
_JSON_PIPELINE_THEN: Final[dict[str, bytes]] = {}


def _json_pipeline_then(name: str) -> bytes:
    cache = _JSON_PIPELINE_THEN
    piece = cache.get(name)
    if piece is None:
        fresh = b'","capacity":null,"pipeline":' + _json_text(name) + b',"variables":'
        if len(name) > _PACKED_NAME_MAX_CHARS:
            return fresh
        piece = fresh
        if len(cache) >= _PACKED_NAMES_MAX:
            cache.clear()
        cache[name] = piece
    return piece


def json_cookie(cookie: bytes) -> bytes:
    """A 16-byte cookie's canonical UUID text, as the bytes a JSON body holds."""
    h = cookie.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


def can_carry(value: Any, codec: Codec) -> bool:
    """Whether an opaque payload (variables/result) can cross to a peer using `codec`."""
    if codec is Codec.MSGPACK or value is None or type(value) is RawJson:
        return True  # (a RawJson is a JSON peer's text: a string to msgpack too)
    if isinstance(value, Raw):
        first = value.data[0]  # a str (fixstr, str 8/16/32) or nil
        return 0xA0 <= first <= 0xBF or 0xD9 <= first <= 0xDB or first == 0xC0
    return isinstance(value, str)


def payload_kind(value: Any) -> str:
    """A payload's type, for a message saying why it could not be carried."""
    return type(value.value() if isinstance(value, Raw | RawJson) else value).__name__


def payload_size(value: Any) -> int:
    """The bytes a payload holds, for the payload budgets: a Raw's or a
    string's length (characters, for a JSON peer's text, whether read to a
    string or kept as a RawJson), 0 for none; any
    other value (the rare payload the raw path leaves to msgpack) packed."""
    if value is None:
        return 0
    if type(value) is Raw:
        return len(value.data)
    if type(value) is RawJson:
        return value.chars  # its text's characters, as for a decoded string
    if isinstance(value, str | bytes):
        return len(value)
    return len(_packb(value))
