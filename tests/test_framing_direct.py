"""PacketDecoder's in-place reads (`direct_from`), pure: `frame_buffer` and `frame_filled`.

`read_like_the_broker` drives a decoder as the transport and the broker do: each
read goes into the decoder's frame buffer when it offers one, else it is fed.
Whatever the frames and however the bytes are cut into reads, the packets (and
the error, for a bad stream) must be those of feeding the same bytes to a decoder
without `direct_from`. tests/test_big_frames.py does the same over real sockets.
"""

from __future__ import annotations

import itertools
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonbroker.core.errors import RemoteProtocolError
from reasonbroker.core.framing import DIRECT_MAX_BYTES, HEADER_BYTES
from reasonbroker.core.protocol import (
    Codec,
    Packet,
    PacketDecoder,
    Ping,
    Raw,
    Result,
    ResultCode,
    Run,
    encode,
)

MAX = 4 * 1024 * 1024
DIRECT = 32 * 1024  # the broker's threshold (daemon/broker.py)
C = bytes(range(16))


def big_run(size: int, n: int = 0, codec: Codec = Codec.MSGPACK) -> bytes:
    """A RUN frame whose payload is `size` bytes of data (bin, or a JSON string)."""
    if codec is Codec.JSON:
        return encode(Run(C, "echo", chr(0x61 + n % 26) * size), codec)
    payload = msgpack.packb(bytes([n % 256]) * size, use_bin_type=True)
    return encode(Run(C, "echo", Raw(payload)))


def big_result(size: int, n: int = 0, codec: Codec = Codec.MSGPACK) -> bytes:
    text = "é" * (size // 2) + str(n)  # two bytes each in UTF-8
    if codec is Codec.JSON:
        return encode(Result(C, ResultCode.OK, result=text), codec)
    return encode(Result(C, ResultCode.OK, result=Raw(msgpack.packb(text, use_bin_type=True))))


def reference(data: bytes) -> list[Packet]:
    return PacketDecoder(MAX, raw_payloads=True).feed(data)


def read_like_the_broker(
    dec: PacketDecoder,
    reads: list[bytes],
    offered: list[int] | None = None,
    out: list[Packet] | None = None,
    hold_view: bool = False,
) -> list[Packet]:
    """Each read goes where the decoder asks (its frame buffer, else fed); a read
    longer than the frame buffer's rest goes on to the next buffer, as libuv's
    next read would. `offered` collects the lengths of the frame buffers filled;
    the packets go to `out` (kept if a protocol error is raised) and are returned.
    The view read into is let go before `frame_filled`, as uvloop does, unless
    `hold_view` (asyncio's own loop holds it across `buffer_updated`)."""
    out = [] if out is None else out
    held: list[memoryview] = []
    for chunk in reads:
        while chunk:
            view = dec.frame_buffer()
            if view is None:
                out.extend(dec.feed(chunk))
                break
            n = min(len(view), len(chunk))
            view[:n] = chunk[:n]
            if offered is not None:
                offered.append(len(view))
            if hold_view:
                held.append(view)
            del view
            out.extend(dec.frame_filled(n))
            if dec.frame_done:
                out.extend(dec.take_frame())  # as the broker's next get_buffer() does
            chunk = chunk[n:]
    return out


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("hold_view", [False, True], ids=["in-place", "view-held"])
def test_a_big_frame_split_at_every_byte_boundary(hold_view: bool) -> None:
    data = big_run(DIRECT + 100)
    expected = reference(data)
    assert len(expected) == 1
    for k in range(1, len(data)):
        dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
        offered: list[int] = []
        got = read_like_the_broker(dec, [data[:k], data[k:]], offered, hold_view=hold_view)
        assert got == expected, k
        # Once the header is in, the rest is read into the frame's own buffer.
        assert offered == ([len(data) - k] if k >= HEADER_BYTES else []), k
        assert dec.buffered == 0


def test_every_byte_boundary_with_a_small_threshold_and_three_reads() -> None:
    # The same code with a threshold small enough to cut a frame everywhere twice.
    data = encode(Run(C, "echo", Raw(msgpack.packb(b"x" * 150)))) + encode(Ping())
    expected = reference(data)
    for i in range(1, len(data)):
        for j in range(i, len(data)):
            dec = PacketDecoder(MAX, raw_payloads=True, direct_from=64)
            reads = [data[:i], data[i:j], data[j:]]
            assert read_like_the_broker(dec, reads) == expected, (i, j)


def test_a_frame_in_many_reads_is_held_at_its_full_length() -> None:
    data = big_run(200_000)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    assert dec.feed(data[:10]) == []
    # The frame's whole length is reserved (and counted) as soon as its header is in.
    assert dec.buffered == len(data)
    view = dec.frame_buffer()
    assert view is not None and len(view) == len(data) - 10
    got: list[Packet] = []
    pos = 10
    while pos < len(data):
        view = dec.frame_buffer()
        assert view is not None
        n = min(1000, len(view))
        view[:n] = data[pos : pos + n]
        pos += n
        got.extend(dec.frame_filled(n))
        # Counted at its full length until it is decoded (take_frame).
        assert dec.buffered == len(data)
        assert dec.frame_done == (pos == len(data))
    assert got == []
    assert dec.frame_buffer() is None  # nothing is read before it is taken
    got.extend(dec.take_frame())
    assert got == reference(data)
    assert dec.buffered == 0 and not dec.frame_done


def test_the_payload_of_a_frame_read_in_place_is_a_view_of_it_and_equal() -> None:
    data = big_run(DIRECT)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    # The first frame (HELLO, for a broker) fixes the codec; the fast path reads the rest.
    assert dec.feed(encode(Ping())) == [Ping()]
    (run,) = read_like_the_broker(dec, [data[:100], data[100:]])
    assert isinstance(run, Run) and isinstance(run.variables, Raw)
    assert isinstance(run.variables.data, memoryview) and run.variables.data.readonly
    assert run == reference(data)[0]
    assert encode(run) == data  # written out again byte for byte
    assert hash(run.variables) == hash(Raw(bytes(run.variables.data)))


def _frame_filled_peak(dec: PacketDecoder, rest: bytes) -> tuple[list[Packet], int]:
    """Read `rest` (a frame's rest, after its start was fed) into the decoder's
    frame buffer, let the view go, and complete it: the packets, and the most
    memory (traced) that completing it allocated at once."""
    view = dec.frame_buffer()
    assert view is not None and len(view) == len(rest)
    view[:] = rest
    del view
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        packets = dec.frame_filled(len(rest))
        assert packets == [] and dec.frame_done
        packets = dec.take_frame()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return packets, peak


@pytest.mark.parametrize("guessed", [False, True], ids=["after-header", "guessed"])
def test_a_frame_read_in_place_is_decoded_from_its_buffer_not_a_copy(guessed: bool) -> None:
    first, data = big_run(100_000, 1), big_run(100_000, 2)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    assert dec.feed(encode(Ping())) == [Ping()]  # the codec is known: the fast path
    if guessed:
        read_like_the_broker(dec, [first])  # the next is offered a buffer at once
        start = 0
    else:
        assert dec.feed(data[:10]) == []
        start = 10
    (run,), peak = _frame_filled_peak(dec, data[start:])
    # The payload is a view of the bytes the frame was read into: no second
    # frame-sized block was made to decode it from.
    assert peak < len(data) // 4
    assert isinstance(run, Run) and isinstance(run.variables, Raw)
    assert isinstance(run.variables.data, memoryview) and run.variables.data.readonly
    assert run == reference(data)[0]
    assert encode(run) == data


def _done_frame(data: bytes) -> PacketDecoder:
    """A decoder (codec known) whose frame read in place, `data`, is done, not taken."""
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    assert dec.feed(encode(Ping()) + data[:10]) == [Ping()]
    view = dec.frame_buffer()
    assert view is not None
    view[:] = data[10:]
    del view
    assert dec.frame_filled(len(data) - 10) == []
    assert dec.frame_done
    return dec


def test_bytes_fed_after_a_done_frame_come_after_its_packets() -> None:
    data = big_run(50_000)
    dec = _done_frame(data)
    assert dec.feed(encode(Ping())) == [*reference(data), Ping()]
    assert not dec.frame_done and dec.buffered == 0
    assert dec.take_frame() == []  # nothing left to take


def test_a_bad_frame_fed_after_a_done_frame_keeps_that_frames_packets() -> None:
    data = big_run(50_000)
    dec = _done_frame(data)
    # The good frame's packets first; the error is final and raised next time.
    assert dec.feed(bytes(HEADER_BYTES)) == reference(data)
    assert dec.error is not None
    with pytest.raises(RemoteProtocolError, match="frame length is 0"):
        dec.feed(encode(Ping()))


def test_a_done_frame_that_is_bad_raises_when_taken() -> None:
    data = big_run(50_000)
    bad = data[:HEADER_BYTES] + b"\xc1" * (len(data) - HEADER_BYTES)  # never valid msgpack
    dec = _done_frame(bad)
    with pytest.raises(RemoteProtocolError):
        dec.take_frame()


def test_frame_filled_while_a_frame_is_done_is_a_caller_bug() -> None:
    dec = _done_frame(big_run(50_000))
    with pytest.raises(ValueError, match="frame_buffer"):
        dec.frame_filled(1)


def test_after_a_big_frame_the_next_is_offered_a_buffer_as_long() -> None:
    first, second = big_run(50_000, 1), big_run(50_000, 2)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    assert dec.frame_buffer() is None  # nothing known yet: read anywhere
    read_like_the_broker(dec, [first[:5], first[5:]])
    view = dec.frame_buffer()
    assert view is not None and len(view) == len(second)
    offered: list[int] = []
    assert read_like_the_broker(dec, [second], offered) == reference(second)
    assert offered == [len(second)]  # the whole frame went straight into its buffer


@pytest.mark.parametrize(
    "after",
    [
        encode(Ping()),  # shorter: the guessed buffer holds it and more
        big_run(60_000, 3),  # longer than the guess
        big_run(50_000, 4)[:3],  # not even a header yet
        big_run(50_000)[:4] + bytes(len(big_run(50_000)) - 4),  # the length guessed, a bad body
        big_run(50_000, 6) + big_run(50_000, 7) + encode(Ping()),
    ],
    ids=["small", "longer", "header-cut", "bad-body", "several"],
)
def test_a_wrong_guess_reads_the_bytes_like_any_others(after: bytes) -> None:
    first = big_run(50_000)
    data = first + after
    expected, error = _reference_or_error(data)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    got = read_like_the_broker(dec, [first])
    assert dec.frame_buffer() is not None
    got += _until_error(dec, [after])
    assert (got, dec.error is not None) == (expected, error)


def test_a_declared_length_over_the_maximum_is_refused_also_after_a_guess() -> None:
    limit = 100_000
    first = big_run(50_000)
    dec = PacketDecoder(limit, raw_payloads=True, direct_from=DIRECT)
    assert len(read_like_the_broker(dec, [first])) == 1
    assert dec.frame_buffer() is not None
    with pytest.raises(RemoteProtocolError, match="exceeds max_frame_bytes"):
        read_like_the_broker(dec, [(limit + 1).to_bytes(HEADER_BYTES, "big") + b"\x80"])
    # Nothing of it was held: the limit is checked before any buffer is made.
    assert dec.buffered == 0


def test_frames_past_direct_max_are_gathered_as_without_it() -> None:
    data = big_run(DIRECT_MAX_BYTES + 10)
    dec = PacketDecoder(2 * DIRECT_MAX_BYTES, raw_payloads=True, direct_from=DIRECT)
    assert dec.feed(data[:1000]) == []
    assert dec.frame_buffer() is None
    assert dec.buffered == 1000  # what came, not the frame's length
    assert dec.feed(data[1000:]) == reference(data)


def test_feeding_while_a_frame_is_read_in_place_keeps_its_bytes() -> None:
    # feed() still works for a caller that ignores frame_buffer() halfway.
    data = big_run(40_000) + encode(Ping())
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    assert read_like_the_broker(dec, [data[:7000]]) == []
    assert dec.feed(data[7000:]) == reference(data)
    # And a guessed buffer that was never filled is simply dropped.
    assert dec.frame_buffer() is None  # a Ping was last: no guess
    dec2 = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    read_like_the_broker(dec2, [big_run(40_000)])
    assert dec2.frame_buffer() is not None
    assert dec2.feed(encode(Ping())) == [Ping()]


def test_frame_filled_without_a_buffer_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="frame_buffer"):
        PacketDecoder(MAX, direct_from=DIRECT).frame_filled(1)


def test_without_direct_from_nothing_is_offered() -> None:
    dec = PacketDecoder(MAX, raw_payloads=True)
    data = big_run(100_000)
    assert dec.feed(data[:100]) == []
    assert dec.frame_buffer() is None
    assert dec.feed(data[100:]) == reference(data)
    assert dec.frame_buffer() is None


def _reference_or_error(data: bytes) -> tuple[list[Packet], bool]:
    dec = PacketDecoder(MAX, raw_payloads=True)
    return _until_error(dec, [data], fed=True), dec.error is not None


def _until_error(dec: PacketDecoder, reads: list[bytes], fed: bool = False) -> list[Packet]:
    """The packets up to a protocol error (raised at once or by the next read)."""
    got: list[Packet] = []
    try:
        if fed:
            got += dec.feed(reads[0])
        else:
            read_like_the_broker(dec, reads, out=got)
        if dec.error is not None:
            dec.feed(b"")
    except RemoteProtocolError:
        pass
    return got


_SIZES = st.sampled_from([0, 1, 100, DIRECT - 60, DIRECT - 1, DIRECT, 40_000, 70_000, 150_000])


_BAD_TAILS = st.sampled_from(
    [
        b"\x00\x00\x00\x00",  # length 0
        b"\x00\x00\x00\x02\x91\x01",  # a msgpack list
        (MAX + 1).to_bytes(HEADER_BYTES, "big"),  # over the maximum
        encode(Ping(), Codec.JSON),  # for a msgpack connection: the other codec
    ]
)


@st.composite
def _stream(draw: st.DrawFn) -> bytes:
    """Frames of one codec, of sizes around the threshold, perhaps a bad one last."""
    codec = draw(st.sampled_from(Codec))
    frames = []
    for n, size in enumerate(draw(st.lists(_SIZES, min_size=1, max_size=6))):
        kind = draw(st.sampled_from(["run", "result", "ping"]))
        if kind == "ping" or size == 0:
            frames.append(encode(Ping(), codec))
        elif kind == "run":
            frames.append(big_run(size, n, codec))
        else:
            frames.append(big_result(size, n, codec))
    if draw(st.booleans()):
        frames.append(draw(_BAD_TAILS))
    return b"".join(frames)


@settings(max_examples=150, deadline=None)
@given(data=_stream(), points=st.lists(st.integers(min_value=1), max_size=12))
def test_any_frames_cut_anywhere_read_as_if_fed_whole(data: bytes, points: list[int]) -> None:
    reads = cut(data, [p % len(data) for p in points])
    expected, error = _reference_or_error(data)
    dec = PacketDecoder(MAX, raw_payloads=True, direct_from=DIRECT)
    got = _until_error(dec, reads)
    assert got == expected
    assert (dec.error is not None) == error
