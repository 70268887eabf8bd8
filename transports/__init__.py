"""Byte transports for reasonbroker: tcp://, unix:// and tls://, chosen by URL scheme.

This package owns moving bytes -- listening, accepting, connecting -- and
nothing about packets. The broker calls `listener_for(url)` and receives one
`Stream` per accepted connection; the client and worker libraries call
`connect(url)`. Both go through `parse_url`, which looks the scheme up in the
one registry, `SCHEMES`. Adding a scheme (tls://) is one entry there plus its
`Endpoint` subclass, as tls:// (transports/tls.py) shows.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Callable

from .base import BACKLOG, Endpoint, Listener, OnStream, Stream, StreamHandler, StreamProtocol
from .tcp import TcpEndpoint, TcpListener
from .tls import TlsEndpoint, client_context, server_context
from .unix import UnixEndpoint, UnixListener

__all__ = [
    "BACKLOG",
    "SCHEMES",
    "Endpoint",
    "Listener",
    "OnStream",
    "Stream",
    "StreamHandler",
    "StreamProtocol",
    "TcpEndpoint",
    "TcpListener",
    "TlsEndpoint",
    "UnixEndpoint",
    "UnixListener",
    "client_context",
    "connect",
    "listener_for",
    "parse_url",
    "server_context",
]

SCHEMES: dict[str, Callable[[str, str], Endpoint]] = {
    "tcp": TcpEndpoint.parse,
    "unix": UnixEndpoint.parse,
    "tls": TlsEndpoint.parse,
}
"""Scheme -> parser. A parser gets (whole URL, text after ``scheme://``) and
returns an `Endpoint` or raises ValueError naming the URL."""


def parse_url(url: str) -> Endpoint:
    """Parse a transport URL (``tcp://127.0.0.1:7000``, ``tcp://[::1]:0``,
    ``tls://broker.example:7443``, ``unix:///run/reasonbroker.sock``);
    ValueError naming the URL if it is not one."""
    scheme, separator, address = url.partition("://")
    if not separator or not scheme:
        raise ValueError(
            f"bad transport URL {url!r}: expected scheme://address, "
            "e.g. tcp://127.0.0.1:7000 or unix:///run/reasonbroker.sock"
        )
    parse = SCHEMES.get(scheme.lower())
    if parse is None:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise ValueError(f"bad transport URL {url!r}: unknown scheme {scheme!r} (known: {known})")
    return parse(url, address)


def listener_for(
    url: str, *, ssl: _ssl.SSLContext | None = None, unix_mode: int | None = None
) -> Listener:
    """An unstarted listener for `url`; call ``await listener.start(on_stream)``.

    `unix_mode` (e.g. ``0o660``) sets the socket file's permissions and is
    ignored by network schemes. `ssl` is for TLS schemes, which require it
    (see `server_context`); plaintext schemes refuse it. Both are ValueError.
    """
    return parse_url(url).listener(ssl=ssl, unix_mode=unix_mode)


async def connect(
    url: str, *, ssl: _ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a client connection to `url` (the same URLs `listener_for` accepts).

    ValueError for a bad URL; OSError naming the URL if the connection fails
    (ssl.SSLError, an OSError, if the TLS handshake does). A tls:// URL without
    `ssl` verifies the broker against the system's trusted CAs.
    """
    return await parse_url(url).connect(ssl=ssl)
