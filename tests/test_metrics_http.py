"""The /metrics endpoint as HTTP (issue 19, item 16): methods, and the hostile inputs
it must keep surviving (garbage, traversal, a 10 MB header, slow requests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Gauge

from reasonbroker.daemon import metrics
from reasonbroker.daemon.metrics import MetricsServer
from tests.rawpeer import WAIT_S


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    registry = CollectorRegistry(auto_describe=False)
    Gauge("reasonbroker_test_value", "A value.", registry=registry).set(7)
    s = MetricsServer(registry, "127.0.0.1:0")
    await s.start()
    yield s
    await s.close()


async def _http(server: MetricsServer, request: bytes) -> bytes:
    """Everything the server sends back for `request`, up to its close ("" if none)."""
    host, _, port = server.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        try:
            await writer.drain()
            async with asyncio.timeout(WAIT_S):
                return await reader.read()
        except ConnectionResetError:
            return b""  # closed on us with our bytes unread: no answer
    finally:
        writer.close()


def _head(response: bytes) -> tuple[str, list[str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *headers = head.decode().split("\r\n")
    return status, headers, body


async def _still_serves(server: MetricsServer) -> None:
    status, _, body = _head(await _http(server, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK"
    assert b"reasonbroker_test_value 7.0" in body


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
async def test_other_methods_get_405_with_allow(server: MetricsServer, method: bytes) -> None:
    status, headers, _ = _head(await _http(server, method + b" /metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert "Allow: GET, HEAD" in headers


async def test_head_gets_the_headers_without_the_body(server: MetricsServer) -> None:
    get_status, get_headers, body = _head(await _http(server, b"GET /metrics HTTP/1.1\r\n\r\n"))
    status, headers, nothing = _head(await _http(server, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert (status, get_status) == ("HTTP/1.1 200 OK", "HTTP/1.1 200 OK")
    assert headers == get_headers
    assert f"Content-Length: {len(body)}" in headers
    assert body and nothing == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\x01\xfe garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics SMTP/1.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /../metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /metrics/../../etc/passwd HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /%2e%2e/metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
    ],
)
async def test_garbage_and_traversal(
    server: MetricsServer, request_bytes: bytes, status: str
) -> None:
    got, _, body = _head(await _http(server, request_bytes))
    assert got == status
    assert b"reasonbroker_test_value" not in body
    await _still_serves(server)


async def test_a_10_mb_header_is_closed_unanswered(server: MetricsServer) -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * (10 * 1024 * 1024) + b"\r\n\r\n"
    assert await _http(server, request) == b""
    await _still_serves(server)


async def test_slow_requests_are_closed_at_the_timeout(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_REQUEST_TIMEOUT_S", 0.2)
    host, _, port = server.address.rpartition(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(50)]
    try:
        for _, writer in conns:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        async with asyncio.timeout(WAIT_S):
            answers = await asyncio.gather(*(reader.read() for reader, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()
    assert answers == [b""] * 50  # each closed by the server, unanswered
    await _still_serves(server)
