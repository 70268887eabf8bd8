"""Prometheus metrics: a collector that reads the broker at scrape time, and a
tiny HTTP endpoint that serves it.

Nothing here runs on the hot path: the switchboard keeps its plain counters
and its latency histogram (`Switchboard.stats`, `.latency`), and this module
turns them into metric families only when Prometheus asks. The exposition
format is prometheus_client's, never hand-written.

The endpoint answers `GET /metrics` (and `HEAD /metrics`, the same headers
without the body), 405 with `Allow: GET, HEAD` to any other method, 404 to any
other path, 400 to a request line that is not HTTP; one request per
connection, and a request head over 8 KiB or slower than 5 s is closed
unanswered; past `_MAX_CONNECTIONS` open at once a new one is closed at once.
The same listener serves the read-only dashboard (daemon/dashboard.py) when
the broker hands one in (`Pages`): every other GET or HEAD path is offered to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..core.board import Switchboard
from .config import split_host_port


class Observed(Protocol):
    """What the collector reads of the broker (daemon/broker.py's `Broker`):
    named here so that this module does not import the broker, which imports it."""

    @property
    def board(self) -> Switchboard: ...
    @property
    def protocol_errors(self) -> int: ...
    @property
    def slow_consumers(self) -> int: ...
    @property
    def dead_peers(self) -> int: ...
    @property
    def auth_failures(self) -> int: ...
    @property
    def auth_refused(self) -> int: ...
    @property
    def uptime_s(self) -> float: ...
    def connections_by_role(self) -> dict[str, int]: ...


_log = structlog.get_logger("reasonbroker.metrics")

# A scrape request is one short line and a few headers; anything bigger or
# slower is not a scraper, and must not hold a task or memory for long.
_MAX_REQUEST_HEAD_BYTES = 8192
_REQUEST_TIMEOUT_S = 5.0
# Connections served at once: a browser opens a handful, a scraper one; past
# this a flood of slow or idle connections is refused instead of held.
_MAX_CONNECTIONS = 64
# Header lines read of a request head (the rest are ignored).
_MAX_HEADERS = 64


class Pages(Protocol):
    """What the server offers every path but /metrics (daemon/dashboard.py's `Dashboard`)."""

    def respond(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes]
    ) -> bytes | None: ...


class BrokerCollector:
    """Every reasonbroker_* metric, read from the broker when collected."""

    def __init__(self, broker: Observed) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        broker = self._broker
        board = broker.board
        stats = board.stats

        conns = GaugeMetricFamily(
            "reasonbroker_connections", "Open connections by role.", labels=["role"]
        )
        for role, n in sorted(broker.connections_by_role().items()):
            conns.add_metric([role], n)
        yield conns

        total = free = 0
        workers = board.workers()
        for conn in workers:
            capacity, busy = board.slots(conn)
            total += capacity
            free += max(capacity - busy, 0)
        yield GaugeMetricFamily(
            "reasonbroker_workers", "Registered worker connections.", len(workers)
        )
        yield GaugeMetricFamily(
            "reasonbroker_slots_total", "Job slots across registered workers.", total
        )
        yield GaugeMetricFamily("reasonbroker_slots_free", "Job slots not running a job.", free)
        yield GaugeMetricFamily(
            "reasonbroker_queue_depth", "Accepted jobs waiting for a slot.", board.queue_depth
        )
        yield GaugeMetricFamily(
            "reasonbroker_jobs_running", "Jobs holding a worker slot.", board.running
        )

        yield CounterMetricFamily(
            "reasonbroker_jobs_accepted", "RUNs accepted as jobs.", stats.accepted
        )
        yield _by_code(
            "reasonbroker_jobs_rejected", "RUNs refused at once, by result code.", stats.rejected
        )
        yield _by_code(
            "reasonbroker_jobs_completed",
            "Accepted jobs ended with a terminal RESULT, by result code.",
            stats.completed,
        )
        yield CounterMetricFamily(
            "reasonbroker_jobs_dispatched",
            "RUNs sent to workers (re-runs included).",
            stats.dispatched,
        )
        yield CounterMetricFamily(
            "reasonbroker_requeues", "Jobs re-run after their worker left.", stats.requeued
        )
        yield CounterMetricFamily("reasonbroker_cancels", "CANCELs of live jobs.", stats.cancels)
        yield CounterMetricFamily(
            "reasonbroker_results_dropped",
            "Late or duplicate worker RESULTs, never delivered.",
            stats.results_dropped,
        )
        yield CounterMetricFamily(
            "reasonbroker_protocol_errors",
            "Connections closed for breaking the protocol.",
            broker.protocol_errors,
        )
        yield CounterMetricFamily(
            "reasonbroker_slow_consumers",
            "Connections cut off for not reading their results.",
            broker.slow_consumers,
        )
        yield CounterMetricFamily(
            "reasonbroker_dead_peers",
            "Connections dropped as silent or idle.",
            broker.dead_peers,
        )
        yield CounterMetricFamily(
            "reasonbroker_auth_failures",
            "Failed authentications (wrong, missing or malformed token).",
            broker.auth_failures,
        )
        yield CounterMetricFamily(
            "reasonbroker_auth_refused",
            "Connections closed at once because their address is blocked after failed auth.",
            broker.auth_refused,
        )
        yield GaugeMetricFamily(
            "reasonbroker_uptime_seconds", "Seconds since the broker started.", broker.uptime_s
        )

        # A cluster node's own figures (cluster/bridge.py): (name, help, value); a name
        # ending in _total is a counter.
        extra = getattr(broker, "metrics_extra", None)
        if extra is not None:
            for name, doc, value in extra():
                if name.endswith("_total"):
                    yield CounterMetricFamily(name.removesuffix("_total"), doc, value)
                else:
                    yield GaugeMetricFamily(name, doc, value)

        latency = board.latency
        buckets: list[tuple[str, float]] = []
        running_total = 0
        for bound, n in zip(latency.bounds, latency.counts, strict=False):
            running_total += n
            buckets.append((_le(bound), running_total))
        buckets.append(("+Inf", latency.count))
        yield HistogramMetricFamily(
            "reasonbroker_job_latency_seconds",
            "From a job's acceptance to its terminal RESULT.",
            buckets=buckets,
            sum_value=latency.sum,
        )


def _le(bound: float) -> str:
    # As prometheus_client's own histograms write bounds: 1.0, 0.005, 300.0.
    return repr(float(bound))


def _by_code(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["code"])
    for code, n in sorted(counts.items()):
        family.add_metric([str(code)], n)
    return family


def registry_for(broker: Observed) -> CollectorRegistry:
    """A registry of this broker's metrics alone (not prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    return registry


class MetricsServer:
    """`GET /metrics` over HTTP/1.x at `address` ("host:port"; port 0 picks one)."""

    def __init__(
        self, registry: CollectorRegistry, address: str, pages: Pages | None = None
    ) -> None:
        self._registry = registry
        self._pages = pages
        self._host, self._port = split_host_port(address, "metrics_address")
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """The bound "host:port" (IPv6 in brackets)."""
        assert self._server is not None, "the metrics server is not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_MAX_REQUEST_HEAD_BYTES
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= _MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._handlers.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self._respond(head))
                await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # not a scraper, or one that went away: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        request_line = lines[0].split()
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
            return http_response(b"400 Bad Request", b"text/plain", b"bad request\n")
        method, target, _ = request_line
        if method not in (b"GET", b"HEAD"):
            # RFC 9110 15.5.6: a 405 says which methods the resource takes.
            return http_response(
                b"405 Method Not Allowed",
                b"text/plain",
                b"method not allowed: GET or HEAD only\n",
                headers=(("Allow", "GET, HEAD"),),
            )
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            answer = None
            if self._pages is not None:
                try:
                    answer = self._pages.respond(method, target, _headers(lines[1:]))
                except Exception:
                    # A bug in a page: say so, keep the broker serving.
                    _log.exception("dashboard_failed")
                    return http_response(
                        b"500 Internal Server Error", b"text/plain", b"dashboard failed\n"
                    )
            if answer is not None:
                return answer
            return http_response(b"404 Not Found", b"text/plain", b"not found\n")
        try:
            body = generate_latest(self._registry)
        except Exception:
            # A bug in collecting: say so to the scraper, keep the broker serving.
            _log.exception("metrics_collect_failed")
            return http_response(b"500 Internal Server Error", b"text/plain", b"collect failed\n")
        # HEAD: the headers GET would send (Content-Length included), no body.
        return http_response(
            b"200 OK", CONTENT_TYPE_LATEST.encode(), body, send_body=method == b"GET"
        )


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    """A request head's header lines as {lowercased name: value}; the first of a
    repeated name wins, lines without a colon are skipped, at most _MAX_HEADERS."""
    headers: dict[bytes, bytes] = {}
    for line in lines[:_MAX_HEADERS]:
        name, sep, value = line.partition(b":")
        if sep and name and name == name.strip():
            headers.setdefault(name.lower(), value.strip())
    return headers


def http_response(
    status: bytes,
    content_type: bytes,
    body: bytes,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    send_body: bool = True,
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (HEAD: `send_body` False)."""
    extra = b"".join(f"\r\n{name}: {value}".encode("latin-1") for name, value in headers)
    return b"".join(
        [
            b"HTTP/1.1 ",
            status,
            b"\r\nContent-Type: ",
            content_type,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            extra,
            b"\r\nConnection: close\r\n\r\n",
            body if send_body else b"",
        ]
    )
