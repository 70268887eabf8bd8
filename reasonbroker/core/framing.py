"""Frames, sans-IO: the 4-byte length header, reading frames, writing them.

Owns `PacketDecoder` (bytes in, packets out, the frame length checked from the
header before any body is held, the codec fixed by the first frame, plain
msgpack RUN/RESULT frames read in place) and `encode` / `encode_into`
(packets in, whole frames out, as pieces for the broker's outbox). The body
of a frame is the codecs' business (codecs.py). The contract is
../shared/PROTOCOL.md; docs/protocol.md records the decisions taken here.
"""

from __future__ import annotations

import re
import struct
from binascii import a2b_hex as _a2b_hex
from io import BytesIO
from typing import Any, Final

from mypy_extensions import i64

from .codecs import (
    _JSON_RC_THEN,
    _JSON_RESULT_OPEN,
    _JSON_RESULT_THEN,
    _JSON_RUN_OPEN,
    _JSON_RUN_TAIL,
    _JSON_RUN_TAIL_DETACH,
    _RC_THEN3,
    _RC_THEN4,
    _RESULT_OPEN3,
    _RESULT_OPEN4,
    _RUN_OPEN3,
    _RUN_OPEN4,
    _json_body,
    _json_pipeline_then,
    _json_text,
    _packb,
    _pipeline_then,
    _same,
    _skip,
    decode_body,
    detect_codec,
    json_cookie,
    json_literal_text,
    packet_from_map,
    packet_to_map,
    unpack_map_raw,
)
from .errors import EncodeError, RemoteProtocolError
from .packets import (
    _RESULT_CODES_RAW,
    Chunk,
    Codec,
    Packet,
    Raw,
    RawJson,
    Result,
    ResultCode,
    Run,
    _unpack_value,
)

HEADER_BYTES: Final = 4
_pack_length = struct.Struct(">I").pack
_MAX_ENCODABLE: Final = 0xFFFFFFFF
# Frame headers for the small sizes every RUN and RESULT of an everyday job
# has, made once: indexing a tuple is cheaper than a struct call per frame.
_SMALL_FRAME: Final = 4096
# A decoded (not Raw) payload at least this big is unpacked from a memoryview
# of the read, not from a copy of its bytes; below it the copy is cheaper
# than making the view.
_UNPACK_VIEW_FROM: Final = 4096
_SMALL_HEADERS: Final = tuple(_pack_length(n) for n in range(_SMALL_FRAME))
# The largest frame read into a buffer of its own (`direct_from`): its whole
# length is reserved as soon as its header is in, so a bigger one is gathered
# from its reads as they come, as without `direct_from`.
DIRECT_MAX_BYTES: Final = 1024 * 1024
# A Raw payload this long, and at least half of the bytes it was read in, is
# a view of them rather than a copy (see Raw): at most twice its size is kept.
_VIEW_FROM: Final = 16 * 1024


class PacketDecoder:
    """Incremental decoder for one connection: feed bytes, get packets.

    The first frame fixes the connection's codec. The length limit is checked
    as soon as the 4-byte header is in, before any of the body is buffered.
    Any `RemoteProtocolError` is final for the connection: the caller closes it.

    With `raw_payloads` (the broker's decoders) the payload of a plain RUN or
    RESULT comes out as `Raw`, its bytes unparsed; otherwise it is decoded.

    With `direct_from` (the broker's decoders: bytes, 0 for off) a frame of
    that length or more (up to DIRECT_MAX_BYTES) can be read in place instead:
    `frame_buffer()` is where the next read should go (None: read anywhere
    and `feed()` the bytes), `frame_filled(n)` says that it put n bytes there.
    The frame's rest then lands in one buffer of the frame's exact size rather
    than in reads that are copied out and joined. After a frame that long the
    next one is guessed to be as long (a peer sends the same payloads over and
    over): its buffer is offered at once, and if the guess is wrong the bytes
    read into it are fed as any others.

    The buffer is the storage of a `bytes` object of the frame's size, written
    through `BytesIO.getbuffer()` while only the BytesIO holds it: once the
    frame is in and every view of it is gone, `getvalue()` hands over that
    very object, so the frame is decoded from the bytes it was read into, with
    no copy. Transports hold the view they read into until `buffer_updated`
    returns (uvloop and asyncio alike), so the read that completes a frame
    only marks it done (`frame_done`; `frame_filled` returns no packets for
    it) and `take_frame()` decodes it afterwards: the caller calls it before
    the next read (the broker does in `get_buffer`, and soon after the read
    in case no next read comes). Meanwhile `frame_buffer()` offers nothing,
    and `feed()` decodes the done frame before its own bytes. A view still
    alive when it is decoded only costs the copy back.
    """

    __slots__ = (
        "_ck_raw",
        "_ck_text",
        "_direct",
        "_done",
        "_frame",
        "_got",
        "_guess",
        "_held",
        "_held_bytes",
        "_max",
        "_need",
        "_pipe_lit",
        "_pipe_name",
        "_pipe_raw",
        "_raw",
        "_view",
        "codec",
        "error",
    )

    def __init__(
        self, max_frame_bytes: int, raw_payloads: bool = False, direct_from: int = 0
    ) -> None:
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
        # The same for a JSON connection: the name's literal, quotes included.
        self._pipe_lit = b""
        # The last cookie text read on a JSON connection and its bytes: a
        # worker's next cookie differs in its last byte only (see _cookie_at).
        self._ck_text = b""
        self._ck_raw = b""
        self.codec: Codec | None = None
        # The frame read in place (direct_from): its buffer, a view of it,
        # the bytes in so far; _guess the length offered next (0: none).
        self._direct = direct_from
        self._frame: BytesIO | None = None
        self._view: memoryview | None = None
        self._got = 0
        self._guess = 0
        # The frame read in place is whole, not yet decoded (take_frame).
        self._done = False
        # Set when a bad frame followed good ones in the same feed: those good
        # packets are returned first (a worker's RESULT just before garbage
        # still counts) and the error is raised by the next feed.
        self.error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame: for one read in place, its
        whole length (reserved), once any of it is in."""
        if self._got:
            return len(self._view) if self._view is not None else 0
        return self._held_bytes

    def frame_buffer(self) -> memoryview | None:
        """Where the next bytes should be read to, or None: anywhere, then `feed()`.

        A view of the rest of the frame in progress when it is read in place
        (see `direct_from`). Only `frame_filled` or `feed` change the answer.
        """
        view = self._view
        if self._done:
            return None  # take_frame() first
        if view is None:
            guess = self._guess
            if not guess or self._held or self.error is not None:
                return None
            # After a frame read in place: offer one as long for the next.
            return self._new_frame(guess)
        got = self._got
        return view[got:] if got else view

    def frame_filled(self, nbytes: int) -> list[Packet]:
        """`nbytes` were read into the last `frame_buffer()`: the packets now whole."""
        view = self._view
        if view is None or self._frame is None or self._done:
            raise ValueError("frame_filled() without a frame_buffer()")
        got = self._got
        size = len(view)
        if not got:
            # The guessed frame: its header must say the length guessed,
            # else these are bytes like any others.
            if (
                nbytes < HEADER_BYTES
                or ((view[0] << 24) | (view[1] << 16) | (view[2] << 8) | view[3]) + HEADER_BYTES
                != size
            ):
                self._drop_frame()
                self._guess = 0
                return self.feed(view[:nbytes].tobytes())
        self._got = got = got + nbytes
        if got >= size:
            # Whole: decoded by take_frame(), once the view is let go.
            self._done = True
        return []

    @property
    def frame_done(self) -> bool:
        """A frame read in place is whole and waits for `take_frame()`."""
        return self._done

    def take_frame(self) -> list[Packet]:
        """The packets of the frame `frame_filled` completed, decoded as if it
        had come in one read ([] when none is done). Raises as `feed` does."""
        if not self._done:
            return []
        return self.feed(self._frame_bytes())

    def _new_frame(self, size: int) -> memoryview:
        """A frame buffer of `size` bytes: the storage of a new bytes object
        only a BytesIO refers to, so getbuffer() writes it in place."""
        frame = self._frame = BytesIO(bytes(size))
        view = self._view = frame.getbuffer()
        return view

    def _frame_bytes(self) -> bytes:
        """The whole frame, as the bytes object it was read into (a copy
        only if a view of it is still held somewhere)."""
        frame, view = self._frame, self._view
        assert frame is not None and view is not None
        self._drop_frame()
        try:
            view.release()  # this decoder's view: let go before getvalue()
        except BufferError:
            pass  # still exported: getvalue() copies
        return frame.getvalue()

    def _drop_frame(self) -> None:
        self._frame = None
        self._view = None
        self._got = 0
        self._done = False

    def feed(self, data: bytes) -> list[Packet]:
        if self.error is not None:
            raise self.error
        if self._done:
            return self._feed_after_frame(data)
        if self._view is not None:
            # Bytes fed while a frame is read in place: it is held as usual.
            view = self._view
            if self._got:
                self._held.append(view[: self._got].tobytes())
                self._held_bytes = self._got
                self._need = len(view)
            self._drop_frame()
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
        json_codec = self.codec is Codec.JSON
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
                elif json_codec:
                    # The same for ReasonChip's SocketPacket JSON (_plain_json).
                    packet = self._plain_json(data, start, stop)
                    if packet is not None:
                        packets.append(packet)
                        continue
                if mv is None:
                    mv = memoryview(data)  # zero-copy bodies: `data` is immutable
                packets.append(self._decode(mv[start:stop]))
                native = self.codec is Codec.MSGPACK
                json_codec = self.codec is Codec.JSON
            else:
                self._need = 0
        except RemoteProtocolError as exc:
            self.error = exc
            if not packets:
                raise
            return packets
        if pos < end:
            need = self._need
            if self._direct and need >= self._direct and need <= DIRECT_MAX_BYTES:
                # Read the rest of this frame in place (frame_buffer).
                got = end - pos
                self._new_frame(need)[:got] = memoryview(data)[pos:end]
                self._got = got
            else:
                rest = data[pos:] if pos else data
                self._held.append(rest)
                self._held_bytes = len(rest)
        elif self._direct:
            # The next frame is guessed to be as long as the last (frame_buffer).
            size += HEADER_BYTES
            self._guess = size if size >= self._direct and size <= DIRECT_MAX_BYTES else 0
        return packets

    def _feed_after_frame(self, data: bytes) -> list[Packet]:
        """`feed(data)` while a frame read in place is done: that frame first."""
        packets = self.take_frame()
        if self.error is not None:
            return packets  # the next feed raises it
        try:
            return packets + self.feed(data)
        except RemoteProtocolError:
            if not packets:
                raise
            return packets  # self.error is set: the next feed raises it

    def _decode(self, body: bytes | memoryview) -> Packet:
        codec = detect_codec(body)
        if self.codec is None:
            self.codec = codec
        elif codec is not self.codec:
            raise RemoteProtocolError(f"{codec.value} frame on a {self.codec.value} connection")
        if self._raw and codec is Codec.MSGPACK:
            # Payloads stay the bytes they came in, on this path too (a RUN
            # with priority, a RESULT with an error): see unpack_map_raw.
            return packet_from_map(unpack_map_raw(bytes(body)), codec)
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
                    n = value_end - pos
                    if not self._raw:
                        if n >= _UNPACK_VIEW_FROM:
                            # A big payload is unpacked from a view: one copy, not two.
                            payload = _unpack_value(memoryview(data)[pos:value_end])
                        else:
                            payload = _unpack_value(data[pos:value_end])
                    elif n >= _VIEW_FROM and n + n >= len(data):
                        payload = Raw(memoryview(data)[pos:value_end])
                    else:
                        payload = Raw(data[pos:value_end])
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

    def _plain_json(self, data: bytes, pos: i64, stop: i64) -> Packet | None:
        """RUN or RESULT in the shape ReasonChip's SocketPacket dumps (all ten
        keys in its order, no spaces; what `_json_plain_parts` writes too)
        read from data[pos:stop] without building the map:

            {"packet_type":"RUN","cookie":C,"capacity":null,"pipeline":P,
             "variables":S,"detach":null|false|true,"rc":null,"error":null,
             "stacktrace":null,"result":null}
            {"packet_type":"RESULT","cookie":C,"capacity":null,"pipeline":null,
             "variables":null,"detach":null,"rc":R,"error":S,"stacktrace":null,
             "result":S}

        C a canonical UUID, P a non-empty string, R a result code, S a string
        or null. None for anything else (the general path reads that frame,
        and gives the same packet or the same error for it; so does any string
        this reader is unsure of: invalid UTF-8, an escaped surrogate, a cookie
        in another form). tests/test_protocol.py checks both.
        """
        kind: i64 = 0
        if _same(data, pos, _JSON_RUN_OPEN):
            kind = 1
            pos += len(_JSON_RUN_OPEN)
        elif _same(data, pos, _JSON_RESULT_OPEN):
            kind = 2
            pos += len(_JSON_RESULT_OPEN)
        else:
            return None
        if pos + 37 > stop or data[pos + 36] != 0x22:  # 36 characters, then '"'
            return None
        cookie = self._cookie_at(data, pos, kind == 1)
        if cookie is None:
            return None
        pos += 36  # the closing quote opens the next piece
        if kind == 1:
            if not _same(data, pos, _JSON_RUN_PIPELINE):
                return None
            pos += len(_JSON_RUN_PIPELINE)
            lit = self._pipe_lit
            n: i64 = len(lit)
            if n and _same(data, pos, lit):
                pipeline = self._pipe_name
                pos += n
            else:
                end, name = _json_string(data, pos, stop)
                if not name:
                    return None  # empty or unread here: the general path says which
                pipeline = name
                self._pipe_lit = data[pos:end]
                self._pipe_name = name
                pos = end
            if not _same(data, pos, _JSON_VARIABLES):
                return None
            pos += len(_JSON_VARIABLES)
            # The variables run up to the tail, which ends the frame: one of
            # three, by detach (null and true have the same length).
            detach = False
            end = stop - len(_JSON_RUN_TAIL)
            if end < pos:
                return None
            if _same(data, end, _JSON_RUN_TAIL):
                pass
            elif _same(data, end, _JSON_RUN_TAIL_DETACH):
                detach = True
            else:
                end -= len(_JSON_RUN_TAIL_FALSE) - len(_JSON_RUN_TAIL)
                if end < pos or not _same(data, end, _JSON_RUN_TAIL_FALSE):
                    return None
            known, variables = _json_payload(data, pos, end, self._raw)
            if not known:
                return None
            return Run(cookie, pipeline, variables, detach)
        if not _same(data, pos, _JSON_RESULT_RC):
            return None
        pos += len(_JSON_RESULT_RC)
        if _same(data, pos, b'"OK"'):
            rc = ResultCode.OK
            pos += 4
        else:
            # A code is plain capitals: the first quote after the opening one ends it.
            end = data.find(b'"', pos + 1, stop)
            if data[pos] != 0x22 or end < 0:
                return None
            found = _RESULT_CODES_RAW.get(data[pos + 1 : end])
            if found is None:
                return None
            rc = found
            pos = end + 1
        if not _same(data, pos, _JSON_ERROR):
            return None
        pos += len(_JSON_ERROR)
        end, error = _json_string_or_null(data, pos, stop)
        if end < 0:
            return None
        pos = end
        if not _same(data, pos, _JSON_RESULT_THEN):
            return None
        pos += len(_JSON_RESULT_THEN)
        if data[stop - 1] != 0x7D:  # the result runs up to the "}" that ends the frame
            return None
        known, result = _json_payload(data, pos, stop - 1, self._raw)
        if not known:
            return None
        return Result(cookie, rc, error, None, result)

    def _cookie_at(self, data: bytes, pos: i64, from_client: bool) -> bytes | None:
        """The 16 bytes of the canonical UUID text at data[pos:pos+36] (hex
        digits in either case), or None.

        Reading cookie text costs about 230 ns (a slice, `replace`, `a2b_hex`),
        twice a job; two shortcuts, each giving what that would:
        - A text that shares its first 34 characters (15 bytes) with the last
          one read here takes those bytes from it: the cookies the broker gives
          a worker come in runs of 256 that differ in their last byte only
          (dispatch._wcookie_blob), and a worker answers in about that order.
        - A client's cookie text (RUN), when lowercase, is kept for the
          RESULT that answers it (`_cookie_text`), so that is not made again.
        """
        memo = self._ck_text
        if len(memo) == 36:
            i: i64 = 0
            while i < 34:
                if data[pos + i] != memo[i]:
                    break
                i += 1
            else:
                high = _HEX_VALUE[data[pos + 34]]
                low = _HEX_VALUE[data[pos + 35]]
                if high < 16 and low < 16:
                    return self._ck_raw[:15] + _ONE_BYTE[high * 16 + low]
        if data[pos + 8] != 0x2D or data[pos + 13] != 0x2D or data[pos + 18] != 0x2D:
            return None
        if data[pos + 23] != 0x2D:
            return None
        text = data[pos : pos + 36]
        try:
            # A hyphen anywhere else leaves an odd count of digits: an error.
            raw = _a2b_hex(text.replace(b"-", b""))
        except ValueError:  # binascii.Error
            return None
        self._ck_text = text
        self._ck_raw = raw
        if from_client and text.islower():  # (all digits is not "lower": not kept, rare)
            texts = _CLIENT_COOKIE_TEXT
            if len(texts) >= _CLIENT_COOKIE_TEXTS_MAX:
                texts.clear()  # jobs never answered (detached, refused): start over, bounded
            texts[raw] = text
        return raw


# What follows the cookie in the plain JSON shapes, piece by piece.
_JSON_RUN_PIPELINE: Final = b'","capacity":null,"pipeline":'
_JSON_VARIABLES: Final = b',"variables":'
_JSON_RUN_TAIL_FALSE: Final = (
    b',"detach":false,"rc":null,"error":null,"stacktrace":null,"result":null}'
)
_JSON_RESULT_RC: Final = b'","capacity":null,"pipeline":null,"variables":null,"detach":null,"rc":'
_JSON_ERROR: Final = b',"error":'
# One JSON string literal, as strict json reads it (no control characters),
# save escaped surrogates (\ud800-\udfff), left to the general path, which
# pairs them or refuses a lone one. Possessive: no backtracking on a long one.
_JSON_STRING: Final = re.compile(
    rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4})*+"'
)


def _json_string_end(data: bytes, pos: i64, stop: i64) -> i64:
    """Where the JSON string literal at data[pos] ends, or -1 (see _JSON_STRING)."""
    m = _JSON_STRING.match(data, pos, stop)
    if m is None:
        return -1
    end: i64 = m.end()
    return end


def _json_string(data: bytes, pos: i64, stop: i64) -> tuple[i64, str | None]:
    """The JSON string literal at data[pos]: where it ends and its text; -1
    and None when this reader leaves it to the general path (not a string,
    not UTF-8, a control character, an escaped surrogate, a bad escape)."""
    if pos >= stop or data[pos] != 0x22:
        return -1, None
    # Most strings (names, codes, short payloads) have no escape: the first
    # quote ends them. Any other is measured by the pattern first.
    q: i64 = data.find(b'"', pos + 1, stop)
    if q < 0:
        return -1, None
    if data.find(b"\\", pos + 1, q) < 0:
        end: i64 = q + 1
    else:
        end = _json_string_end(data, pos, stop)
        if end < 0:
            return -1, None
    text = json_literal_text(data[pos:end])
    if text is None:
        return -1, None
    return end, text


def _json_string_or_null(data: bytes, pos: i64, stop: i64) -> tuple[i64, str | None]:
    """The string or null at data[pos]: where it ends and its text or None;
    -1 when this reader leaves it to the general path."""
    if _same(data, pos, b"null"):
        return pos + 4, None
    return _json_string(data, pos, stop)


def _json_payload(data: bytes, pos: i64, end: i64, raw: bool) -> tuple[bool, Any]:
    """The payload that is data[pos:end], null or one string literal: whether
    this reader takes it, and its value (False when it leaves the frame to the
    general path: anything else there, a literal json refuses, a lone surrogate).

    With `raw` (the broker's decoders) a literal that is already the very
    bytes the broker writes for its text is kept as it came (RawJson), so the
    next JSON peer gets what decoding and writing it again would give. That is
    the form of ReasonChip's pydantic, of the stdlib's json (ensure_ascii=False)
    and of orjson: UTF-8 as it is, and only the escapes json must write. Any
    other literal (with a \\u00e9 or \\/ escape, say) is read to its text, as
    without `raw`, and written in that form when it is sent on.
    """
    n = end - pos
    if n == 4 and _same(data, pos, _JSON_NULL):
        return True, None
    if n < 2 or data[pos] != 0x22 or data[end - 1] != 0x22:
        return False, None  # (json takes spaces around it; the general path reads those)
    if raw:
        if n <= _SCAN_MAX or data.find(b"\\", pos, end) >= 0:
            chars = _json_written_chars(data, pos, end)
            if chars >= 0:
                return True, RawJson(data[pos:end], chars)
        else:
            # A long literal with no escape is the writer's if it is valid at
            # all; orjson (or json) checks that faster than the loop.
            literal = data[pos:end]
            text = json_literal_text(literal)
            if text is None:
                return False, None
            return True, RawJson(literal, len(text))
    literal = data[pos:end]
    text = json_literal_text(literal)  # checked and read by orjson (or json) in one pass
    if text is None:
        return False, None
    return True, text


# Up to this many bytes, or when it has an escape, a literal is checked by
# _json_written_chars, a compiled loop (about 1.3 ns a byte, no call, nothing
# made); a longer one with no escape by orjson (about 0.5 ns a byte, but some
# 250 ns of calls and a text made).
_SCAN_MAX: Final = 512
_HEX_LOWER: Final = b"0123456789abcdef"
# Whether json writes a control character (below 0x20) as \u00XX: all but the
# five with a short escape (\b \t \n \f \r: 8, 9, 10, 12, 13).
_LONG_ESCAPED: Final = bytes(0 if c in (8, 9, 10, 12, 13) else 1 for c in range(32))


def _json_written_chars(data: bytes, pos: i64, end: i64) -> i64:
    r"""The length in characters of the text of the string literal data[pos:end]
    (its quotes included), when the literal is the very bytes json writes for
    that text: valid UTF-8, no control character raw, and as escapes only
    \" \\ \b \f \n \r \t and \u00XX (lowercase) for the other control
    characters. -1 for any other literal, valid or not (\/, \u00e9, an
    escaped surrogate, a quote or a bad escape inside, invalid UTF-8).
    """
    i: i64 = pos + 1
    last: i64 = end - 1  # the closing quote
    # Bytes that are not a character of their own: UTF-8 continuation bytes,
    # and the rest of each escape (1 in \n, 5 in \u0001).
    extra: i64 = 0
    high = False
    while i < last:
        b: i64 = data[i]
        if b == 0x5C:  # a backslash
            if i + 1 >= last:
                return -1  # it escapes the closing quote: the literal goes on
            e: i64 = data[i + 1]
            if e == 0x22 or e == 0x5C or e == 0x6E or e == 0x74 or e == 0x72:  # " \ n t r
                i += 2
                extra += 1
            elif e == 0x62 or e == 0x66:  # b f
                i += 2
                extra += 1
            elif e == 0x75:  # u: only 00XX, lowercase, for a control without a short escape
                if i + 6 > last or data[i + 2] != 0x30 or data[i + 3] != 0x30:
                    return -1
                high_digit: i64 = data[i + 4] - 0x30
                if high_digit != 0 and high_digit != 1:
                    return -1
                low_digit: i64 = _HEX_LOWER.find(bytes([data[i + 5]]))
                if low_digit < 0 or not _LONG_ESCAPED[high_digit * 16 + low_digit]:
                    return -1
                i += 6
                extra += 5
            else:
                return -1  # \/, or an escape json has not
        elif b < 0x20 or b == 0x22:
            return -1  # raw, strict json refuses a control character; a quote ends a string
        else:
            if b >= 0x80:
                high = True
                if b < 0xC0:
                    extra += 1  # a continuation byte
            i += 1
    if high:
        try:
            data[pos + 1 : last].decode()  # strict: no surrogates, no overlong forms
        except UnicodeDecodeError:
            return -1
    return last - pos - 1 - extra


def _header(size: int) -> bytes:
    if size < _SMALL_FRAME:
        return _SMALL_HEADERS[size]
    if size > _MAX_ENCODABLE:
        raise EncodeError(f"packet body of {size} bytes cannot be framed")
    return _pack_length(size)


def _msgpack_parts(packet: Packet, out: list[Chunk]) -> int:
    """Append the frame's pieces (header first) to `out`; return its length.

    The pieces are only appended once all of them are made, so a packet that
    cannot be encoded leaves `out` as it was.
    """
    if type(packet) is Run:
        run = packet
        if (
            not (run.detach or run.priority or run.ack)
            and run.timeout_ms is None
            and run.max_attempts is None
            and len(run.cookie) == 16
        ):
            opening = _RUN_OPEN3
            payload: Chunk = b""
            if run.variables is None:
                middle = _pipeline_then(run.pipeline, False)
            else:
                opening = _RUN_OPEN4
                middle = _pipeline_then(run.pipeline, True)
                variables = run.variables
                if type(variables) is Raw:
                    payload = variables.data
                elif type(variables) is RawJson:
                    payload = _packb(variables.value())  # a JSON client's text to msgpack
                else:
                    payload = _packb(variables)
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
            data: Chunk
            if type(result) is Raw:
                data = result.data
            elif type(result) is RawJson:
                data = _packb(result.value())
            else:
                data = _packb(result)
            return _append_plain(out, _RESULT_OPEN4, cookie, _RC_THEN4[res.rc], data)
    body: bytes = _packb(packet_to_map(packet))
    head = _header(len(body))
    out.append(head)
    out.append(body)
    return HEADER_BYTES + len(body)


def _append_plain(
    out: list[Chunk], opening: bytes, cookie: bytes, middle: bytes, payload: Chunk
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


_JSON_NULL: Final = b"null"

# Hex digit values by byte (16 for a byte that is not one), and each byte as a
# bytes object and as its two lowercase hex digits: for the cookie shortcuts.
_HEX_VALUE: Final = bytes(
    int(chr(b), 16) if chr(b) in "0123456789abcdefABCDEF" else 16 for b in range(256)
)
_ONE_BYTE: Final = tuple(bytes([b]) for b in range(256))
_HEX_PAIR: Final = tuple(b"%02x" % b for b in range(256))
# A JSON client's cookie text, by its bytes, from its RUN to the RESULT that
# answers it (PacketDecoder._cookie_at). Bounded: a job that is never
# answered leaves its entry until the next clear.
_CLIENT_COOKIE_TEXT: Final[dict[bytes, bytes]] = {}
_CLIENT_COOKIE_TEXTS_MAX: Final = 65536


class _CookieText:
    """The last cookie written to a JSON peer as text (see _cookie_text)."""

    __slots__ = ("raw", "text")

    def __init__(self) -> None:
        self.raw = b""
        self.text = b""


_LAST_WRITTEN: Final = _CookieText()


def _cookie_text(cookie: bytes, answer: bool) -> bytes:
    """`json_cookie(cookie)` (about 300 ns to make), with two shortcuts: the
    text a JSON client's RUN came with, for its RESULT (`answer`); and for a
    cookie that shares its first 15 bytes with the last one written (the
    broker's cookies for workers come in runs of 256, dispatch._wcookie_blob),
    that one's first 34 characters and the last byte's two hex digits."""
    if answer:
        text = _CLIENT_COOKIE_TEXT.pop(cookie, None)
        if text is not None:
            return text
    last = _LAST_WRITTEN
    memo = last.raw
    if len(memo) == 16:
        i: i64 = 0
        while i < 15:
            if cookie[i] != memo[i]:
                break
            i += 1
        else:
            return last.text[:34] + _HEX_PAIR[cookie[15]]
    made = json_cookie(cookie)
    last.raw = cookie
    last.text = made
    return made


def _json_plain_parts(packet: Packet, out: list[Chunk]) -> int:
    """A RUN or RESULT in its per-job shape (a 16-byte cookie; a payload of
    text: a string, a JSON peer's RawJson, a msgpack peer's string as Raw, or
    none; RUN without priority, deadline, attempts or ack; RESULT without a
    stacktrace) written to `out` as pieces: `_json_body`'s bytes for it.
    0 (and `out` untouched) for any other packet: the general path writes it.
    """
    pieces: list[bytes]
    if type(packet) is Run:
        run = packet
        variables = run.variables
        if (
            run.priority
            or run.ack
            or run.timeout_ms is not None
            or run.max_attempts is not None
            or len(run.cookie) != 16
        ):
            return 0
        if variables is None:
            payload = _JSON_NULL
        elif type(variables) is RawJson:
            payload = variables.data  # a JSON client's literal, passed on as it came
        elif type(variables) is str:
            payload = _json_text(variables)
        elif type(variables) is Raw and type(text := variables.value()) is str:
            payload = _json_text(text)  # a msgpack client's string, as JSON text
        else:
            return 0  # any other msgpack payload: the general path says it cannot cross
        pieces = [
            _JSON_RUN_OPEN,
            _cookie_text(run.cookie, False),
            _json_pipeline_then(run.pipeline),
            payload,
            _JSON_RUN_TAIL_DETACH if run.detach else _JSON_RUN_TAIL,
        ]
    elif type(packet) is Result:
        res = packet
        cookie = res.cookie
        error = res.error
        result = res.result
        if cookie is None or len(cookie) != 16 or res.stacktrace is not None:
            return 0
        if result is None:
            payload = _JSON_NULL
        elif type(result) is RawJson:
            payload = result.data
        elif type(result) is str:
            payload = _json_text(result)
        elif type(result) is Raw and type(text := result.value()) is str:
            payload = _json_text(text)
        else:
            return 0
        pieces = [
            _JSON_RESULT_OPEN,
            _cookie_text(cookie, True),
            _JSON_RC_THEN[res.rc],
            _JSON_NULL if error is None else _json_text(error),
            _JSON_RESULT_THEN,
            payload,
            b"}",
        ]
    else:
        return 0
    size = 0
    for piece in pieces:
        size += len(piece)
    out.append(_header(size))
    out.extend(pieces)
    return HEADER_BYTES + size


def encode_into(packet: Packet, codec: Codec, out: list[Chunk]) -> int:
    """Append `packet`'s frame to `out` as pieces whose join is `encode(packet,
    codec)`; return the frame's length. On EncodeError `out` is unchanged.

    For a writer that joins many frames into one write anyway (the broker's
    outbox): the pieces are copied once, by that join.
    """
    try:
        if codec is Codec.MSGPACK:
            return _msgpack_parts(packet, out)
        size = _json_plain_parts(packet, out)
        if size:
            return size
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
    parts: list[Chunk] = []
    encode_into(packet, codec, parts)
    return b"".join(parts)
