"""tls://host:port -- TCP with TLS on top, and the SSL contexts it needs.

This module owns the tls:// scheme (a `TcpEndpoint` whose listener and
connections always carry an SSL context) and the two context builders the
broker and the client libraries use: `server_context` (certificate, key,
optionally mutual TLS) and `client_context` (which CA to trust, optionally our
own certificate). The handshake happens inside asyncio's transport: a stream is
handed to the broker only once it has completed, so a peer that fails it
(plaintext, untrusted certificate, none when one is required) never reaches the
broker at all.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from dataclasses import dataclass
from typing import ClassVar

from .base import Listener, with_context
from .tcp import TcpEndpoint, TcpListener, _tune_transport

__all__ = ["TlsEndpoint", "client_context", "server_context"]

# TLS 1.0 and 1.1 are deprecated (RFC 8996); nothing that talks to a broker
# written in 2024+ needs them.
_MIN_VERSION = _ssl.TLSVersion.TLSv1_2


def server_context(
    certfile: str,
    keyfile: str,
    cafile: str | None = None,
    verify_client: bool = False,
) -> _ssl.SSLContext:
    """A server context presenting `certfile`/`keyfile` (PEM), TLS >= 1.2.

    With `verify_client`, every peer must present a certificate signed by a CA
    in `cafile` (mutual TLS); `cafile` is then required. Without it, `cafile`
    is still loaded (clients that offer a certificate are checked against it)
    but none is demanded. OSError / ssl.SSLError if a file is missing or the
    key does not match the certificate.
    """
    if verify_client and cafile is None:
        raise ValueError(
            "verify_client needs a cafile: the CAs whose client certificates to accept"
        )
    context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION
    context.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        context.load_verify_locations(cafile=cafile)
        context.verify_mode = _ssl.CERT_REQUIRED if verify_client else _ssl.CERT_OPTIONAL
    return context


def client_context(
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> _ssl.SSLContext:
    """A client context, TLS >= 1.2, that verifies the broker's certificate and host name.

    `cafile` replaces the system's trusted CAs (a private CA is the usual
    deployment); None trusts the system store. `certfile` (and `keyfile`, if
    the key is not in the same file) is our certificate for mutual TLS.
    """
    if keyfile is not None and certfile is None:
        raise ValueError("keyfile without certfile")
    context = _ssl.create_default_context(cafile=cafile)
    context.minimum_version = _MIN_VERSION
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def _require(url: str, ssl: _ssl.SSLContext | None, server_side: bool) -> _ssl.SSLContext:
    if ssl is None:
        what = "server_context(certfile, keyfile)" if server_side else "client_context()"
        raise ValueError(f"{url!r} is a TLS transport and needs an SSL context, e.g. {what}")
    return ssl


@dataclass(frozen=True, slots=True)
class TlsEndpoint(TcpEndpoint):
    """A parsed tls:// URL: the same host:port forms as tcp://."""

    scheme: ClassVar[str] = "tls"

    def listener(
        self, *, ssl: _ssl.SSLContext | None = None, unix_mode: int | None = None
    ) -> Listener:
        # Serving plaintext under a tls:// address would be worse than failing.
        return TcpListener(self, ssl=_require(self.url, ssl, server_side=True))

    async def connect(
        self, *, ssl: _ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # No context: verify the broker against the system's CAs, as a browser
        # would. Never an unverified default.
        context = ssl if ssl is not None else client_context()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        except _ssl.SSLError as exc:
            # Keep the SSLError subclass (with_context would turn its errno 1
            # into a PermissionError): the caller can tell an untrusted
            # certificate from a refused connection.
            raise type(exc)(
                exc.errno, f"TLS handshake with {self.url} failed: {exc.strerror or exc}"
            ) from exc
        except OSError as exc:
            raise with_context(exc, f"cannot connect to {self.url}") from exc
        _tune_transport(writer.transport)
        return reader, writer
