"""The wire protocol's public API in one namespace: `from ..core import protocol as p`.

A facade, nothing more: the packets are packets.py's, the frames
framing.py's, the bodies codecs.py's. The SDK, the CLI and the tests read
`p.Run`, `p.encode`, `p.PacketDecoder` from here; the hot path imports from
the modules themselves.
"""

from __future__ import annotations

from .codecs import (
    can_carry,
    decode_body,
    detect_codec,
    packet_from_map,
    packet_to_map,
    payload_kind,
)
from .errors import EncodeError, LocalProtocolError, RemoteProtocolError
from .framing import HEADER_BYTES, PacketDecoder, encode, encode_into
from .packets import (
    LEGACY_RESULT_CODES,
    MAX_TIMEOUT_MS,
    BadPacket,
    Cancel,
    Codec,
    Drain,
    Hello,
    Packet,
    PacketType,
    Ping,
    Pong,
    Progress,
    Raw,
    Record,
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
    cookie_str,
    for_legacy,
    new_cookie,
)

__all__ = [
    "HEADER_BYTES",
    "LEGACY_RESULT_CODES",
    "MAX_TIMEOUT_MS",
    "BadPacket",
    "Cancel",
    "Codec",
    "Drain",
    "EncodeError",
    "Hello",
    "LocalProtocolError",
    "Packet",
    "PacketDecoder",
    "PacketType",
    "Ping",
    "Pong",
    "Progress",
    "Raw",
    "Record",
    "Register",
    "RemoteProtocolError",
    "Result",
    "ResultCode",
    "Return",
    "Role",
    "Run",
    "Shutdown",
    "Started",
    "Status",
    "Unsupported",
    "can_carry",
    "cookie_str",
    "decode_body",
    "detect_codec",
    "encode",
    "encode_into",
    "for_legacy",
    "new_cookie",
    "packet_from_map",
    "packet_to_map",
    "payload_kind",
]
