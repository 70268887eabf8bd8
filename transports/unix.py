"""unix:///abs/path -- parsing, listening and connecting over Unix sockets.

This module owns the socket file's life cycle: a stale file left by a crashed
broker is replaced, a live one (another broker listening) or a non-socket
file is an error, the requested permission bits are applied before anyone can
connect, and close() removes the file only if it is still the one we created.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl as _ssl
import stat
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

__all__ = ["UnixEndpoint", "UnixListener"]


@dataclass(frozen=True, slots=True)
class UnixEndpoint(Endpoint):
    """A parsed unix:// URL; ``path`` is absolute and taken verbatim (no %-decoding)."""

    scheme: ClassVar[str] = "unix"

    url: str
    path: str

    @classmethod
    def parse(cls, url: str, address: str) -> Self:
        """Parse the part after ``unix://``, which must be an absolute path."""
        # unix:///run/x.sock leaves "/run/x.sock"; unix://run/x.sock would
        # leave "run/x.sock", which a URL reader takes as host "run": refuse it
        # rather than guess.
        if not address.startswith("/"):
            raise ValueError(
                f"bad transport URL {url!r}: unix:// needs an absolute path, "
                "e.g. unix:///run/reasonbroker.sock"
            )
        if "\0" in address:
            raise ValueError(f"bad transport URL {url!r}: NUL in socket path")
        return cls(url=url, path=address)

    def listener(
        self, *, ssl: _ssl.SSLContext | None = None, unix_mode: int | None = None
    ) -> Listener:
        plaintext_only(self.url, ssl)
        return UnixListener(self, mode=unix_mode)

    async def connect(
        self, *, ssl: _ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        plaintext_only(self.url, ssl)
        try:
            return await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise with_context(exc, f"cannot connect to {self.url}") from exc


def _remove_if_stale(url: str, path: str) -> None:
    """Unlink `path` if it is a socket nobody listens on; raise if it is anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, f"cannot listen on {url}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: a live listener with a full accept queue would otherwise
    # block this connect; EAGAIN then still means "someone is listening".
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody accepts on it: the file outlived its broker (crash, SIGKILL).
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        raise with_context(exc, f"cannot listen on {url}: probing existing {path}") from exc
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE, f"cannot listen on {url}: address in use (a process is listening on it)"
    )


def _bind(url: str, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind ourselves instead of letting asyncio/uvloop do it: both unlink
        # any existing socket file at the path first, live or not, which would
        # silently steal the address from a running broker.
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise with_context(exc, f"cannot listen on {url}") from exc
            _remove_if_stale(url, path)
            try:
                sock.bind(path)
            except OSError as again:
                raise with_context(again, f"cannot listen on {url}") from again
    except BaseException:
        sock.close()
        raise
    return sock


class UnixListener(Listener):
    """Listens on a Unix socket path; `mode` (e.g. 0o660) is applied to the file."""

    def __init__(
        self,
        endpoint: UnixEndpoint,
        *,
        mode: int | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.url = endpoint.url
        self._endpoint = endpoint
        self._path = endpoint.path
        self._peer = f"unix:{endpoint.path}"
        self._mode = mode
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        # (st_dev, st_ino) of the socket file we bound, to recognise it at close().
        self._file_id: tuple[int, int] | None = None
        self._started = False

    async def start(self, on_stream: OnStream) -> None:
        if self._started:
            raise RuntimeError(f"listener {self.url} already started")
        peer = self._peer

        buffer = read_buffer()

        def protocol_factory() -> StreamProtocol:
            return StreamProtocol(on_stream, lambda _transport: peer, buffer=buffer)

        sock = _bind(self.url, self._path)
        try:
            info = os.stat(self._path)
            self._file_id = (info.st_dev, info.st_ino)
            if self._mode is not None:
                # Before listen(): nobody can connect under the umask's
                # default permissions in between.
                os.chmod(self._path, self._mode)
            self._server = await asyncio.get_running_loop().create_unix_server(
                protocol_factory, sock=sock, backlog=BACKLOG, ssl=self._ssl
            )
        except BaseException as exc:
            sock.close()
            self._unlink_if_ours()
            if isinstance(exc, OSError):
                raise with_context(exc, f"cannot listen on {self.url}") from exc
            raise
        self._started = True

    @property
    def address(self) -> str:
        if not self._started:
            raise RuntimeError(f"listener {self.url} not started")
        return f"unix://{self._path}"

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # No wait_closed(): see TcpListener.close -- it would wait for every
        # accepted stream to end.
        server.close()
        self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        file_id, self._file_id = self._file_id, None
        if file_id is None:
            return
        # Another broker may have replaced a file we thought stale, or an
        # operator may have moved ours away: only remove the inode we bound.
        # (A replacement between this stat and the unlink is not guarded.)
        try:
            info = os.stat(self._path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == file_id:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        return f"<UnixListener {self._path}>"
