"""tcp://host:port -- parsing, listening and connecting over TCP.

This module owns the TCP URL grammar (IPv4, bracketed IPv6 literals, host
names; port 0 means "any free port"), the per-connection socket options the
broker relies on (no Nagle delay, keepalive to find half-open peers), and the
`TcpListener`. A future tls:// scheme is this listener with an SSL context.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl as _ssl
from dataclasses import dataclass
from typing import ClassVar, Self

from .base import (
    BACKLOG,
    Endpoint,
    Listener,
    OnStream,
    StreamProtocol,
    plaintext_only,
    read_buffer,
    with_context,
)

__all__ = ["TcpEndpoint", "TcpListener", "format_host_port", "tune_tcp_socket"]

# A host name or IPv4 literal; anything else (user@, paths, spaces) is a typo.
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")

# Keepalive finds peers that vanished without a FIN/RST (power loss, NAT
# timeout): after 30 s idle, probe every 10 s, give up after 3 misses -- a dead
# worker's slots are reclaimed within about a minute instead of ~2 hours (the
# kernel default). Options a platform lacks are skipped.
_KEEPALIVE_OPTIONS: tuple[tuple[int, int], ...] = tuple(
    (getattr(socket, name), value)
    for name, value in (
        ("TCP_KEEPIDLE", 30),  # Linux, *BSD
        ("TCP_KEEPALIVE", 30),  # macOS spelling of KEEPIDLE
        ("TCP_KEEPINTVL", 10),
        ("TCP_KEEPCNT", 3),
    )
    if hasattr(socket, name)
)


def tune_tcp_socket(sock: socket.socket) -> None:
    """Set TCP_NODELAY and keepalive (30 s idle, 10 s interval, 3 probes) on `sock`."""
    # Frames are small and latency-bound; asyncio and uvloop usually set
    # NODELAY already, but saying so costs one syscall per connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE_OPTIONS:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _tune_transport(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        tune_tcp_socket(sock)
    except OSError:
        # The peer may already have reset the connection (some platforms then
        # refuse setsockopt); connection_lost follows and says so properly.
        pass


def format_host_port(host: str, port: int) -> str:
    """``127.0.0.1:80``, ``[::1]:80``: the printable form of a socket address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(transport: asyncio.Transport) -> str:
    peername = transport.get_extra_info("peername")
    if not peername:
        # getpeername() fails if the peer reset the connection before we got here.
        return "unknown"
    return format_host_port(peername[0], peername[1])


@dataclass(frozen=True, slots=True)
class TcpEndpoint(Endpoint):
    """A parsed tcp:// URL. ``host`` is unbracketed (``::1``, not ``[::1]``)."""

    scheme: ClassVar[str] = "tcp"

    url: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, address: str) -> Self:
        """Parse the part after ``tcp://``: ``host:port`` or ``[v6 literal]:port``."""
        if address.startswith("["):
            end = address.find("]")
            if end < 0:
                raise ValueError(f"bad transport URL {url!r}: unclosed '[' in IPv6 literal")
            host, rest = address[1:end], address[end + 1 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(
                    f"bad transport URL {url!r}: {host!r} is not an IPv6 address"
                ) from None
            if not rest.startswith(":"):
                raise ValueError(f"bad transport URL {url!r}: expected ':port' after ']'")
            port_text = rest[1:]
        else:
            host, colon, port_text = address.rpartition(":")
            if not colon:
                raise ValueError(f"bad transport URL {url!r}: missing ':port'")
            if ":" in host:
                raise ValueError(
                    f"bad transport URL {url!r}: IPv6 literals go in brackets, e.g. tcp://[::1]:7000"
                )
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(f"bad transport URL {url!r}: bad or missing host {host!r}")
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise ValueError(f"bad transport URL {url!r}: port must be 0-65535, got {port_text!r}")
        return cls(url=url, host=host, port=int(port_text))

    def listener(
        self, *, ssl: _ssl.SSLContext | None = None, unix_mode: int | None = None
    ) -> Listener:
        # unix_mode is a file permission; it has no meaning for TCP and is
        # ignored so callers can pass one setting to every listener.
        plaintext_only(self.url, ssl)
        return TcpListener(self)

    async def connect(
        self, *, ssl: _ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        plaintext_only(self.url, ssl)
        return await open_tcp(self)


async def open_tcp(
    endpoint: TcpEndpoint, ssl: _ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to `endpoint` with the same socket options the listener sets."""
    try:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=ssl)
    except OSError as exc:
        raise with_context(exc, f"cannot connect to {endpoint.url}") from exc
    # Workers hold one long-lived connection; keepalive lets them notice a
    # broker host that disappeared, just as the broker notices them.
    _tune_transport(writer.transport)
    return reader, writer


class TcpListener(Listener):
    """Listens on a TCP address; `ssl` is for a TLS scheme built on this one."""

    def __init__(self, endpoint: TcpEndpoint, *, ssl: _ssl.SSLContext | None = None) -> None:
        self.url = endpoint.url
        self._endpoint = endpoint
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        self._address: str | None = None

    async def start(self, on_stream: OnStream) -> None:
        if self._address is not None:
            raise RuntimeError(f"listener {self.url} already started")

        buffer = read_buffer()

        def protocol_factory() -> StreamProtocol:
            return StreamProtocol(on_stream, _peer_of, _tune_transport, buffer)

        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                protocol_factory,
                self._endpoint.host,
                self._endpoint.port,
                backlog=BACKLOG,
                ssl=self._ssl,
            )
        except OSError as exc:
            raise with_context(exc, f"cannot listen on {self.url}") from exc
        # A host name may resolve to several addresses and so bind several
        # sockets (with port 0, on different ports); the first one is reported.
        sockname = server.sockets[0].getsockname()
        self._server = server
        self._address = f"{self._endpoint.scheme}://{format_host_port(sockname[0], sockname[1])}"

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError(f"listener {self.url} not started")
        return self._address

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # Deliberately no wait_closed(): from Python 3.12 on it waits for every
        # accepted connection to end, but closing a listener must leave
        # existing streams open. close() itself closes the listening sockets
        # synchronously (asyncio and uvloop alike).
        server.close()

    def __repr__(self) -> str:
        return f"<TcpListener {self._address or self.url}>"
