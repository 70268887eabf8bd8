"""The read-only dashboard: HTML pages and a JSON API on the metrics listener.

Owns the dashboard's routes (`/`, `/static/...`, `/api/...`; docs/dashboard.md),
who may see them (the admin token when listeners use tokens), the ring of
per-second samples behind the overview's charts, and rendering. Served by
metrics.py's `MetricsServer` beside `/metrics`, so it exists only when
`metrics_address` is set.

What keeps it from disturbing job routing:

- Nothing here changes state: every route is GET or HEAD, and the views only
  read the board (core/overview.py).
- A view is built at most once per `_VIEW_TTL_S` and served from that
  snapshot to every request in between, so a flood of requests costs one
  build per view per interval, not one per request.
- Every list is cut at `_MAX_ROWS` and every response at
  `_MAX_RESPONSE_BYTES`; payloads are shown only on request, truncated.
- The ring is fixed (`_RING_SAMPLES` samples, one per `_SAMPLE_EVERY_S`),
  sampled by one timer: memory stays bounded however long the broker runs.
- The HTTP side (metrics.py) reads one request head of at most 8 KiB within
  5 s, answers it and closes, and holds at most a bounded number of
  connections.
"""

from __future__ import annotations

import hmac
import html
import json
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from ipaddress import ip_address
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, unquote

from .. import _version
from ..core import overview
from ..core.board import Switchboard
from ..core.state import LATENCY_BOUNDS_S
from .metrics import http_response

# One sample a second for five minutes: the charts' window. 300 small tuples.
_SAMPLE_EVERY_S: Final = 1.0
_RING_SAMPLES: Final = 300
# Latency quantiles are read over this many samples' worth of endings, so a
# quiet second does not make the line jump to nothing and back.
_LATENCY_WINDOW: Final = 5
# How long a built view is served before it is built again.
_VIEW_TTL_S: Final = 0.5
# Rows per list; a response over the byte cap has its rows halved until it fits.
_MAX_ROWS: Final = 500
_MAX_RESPONSE_BYTES: Final = 1024 * 1024
# The page lists this many recent failures (/api/failures has all the board keeps).
_FAILURES_SHOWN: Final = 10
# The cookie the login page sets (to the admin token, URL-encoded).
TOKEN_COOKIE: Final = "reasonbroker_admin"

_STATIC: Final = {
    "/static/dashboard.js": "text/javascript; charset=utf-8",
    "/static/dashboard.css": "text/css; charset=utf-8",
    "/static/login.js": "text/javascript; charset=utf-8",
}
# Every answer: no framing by other sites, no sniffing, scripts from here only.
_SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class Watched(Protocol):
    """What the dashboard reads of the broker (daemon/broker.py's `Broker`)."""

    @property
    def board(self) -> Switchboard: ...
    @property
    def uptime_s(self) -> float: ...
    @property
    def epoch(self) -> float: ...
    @property
    def compiled(self) -> bool: ...
    @property
    def addresses(self) -> list[tuple[str, str]]: ...
    def now(self) -> float: ...
    def peer_info(self, conn: int) -> tuple[str, float, float] | None: ...


@dataclass(frozen=True, slots=True)
class Sample:
    """The board's counters at one moment (board time)."""

    at: float
    accepted: int
    ended: int
    queued: int
    running: int
    latency: tuple[int, ...]


class Ring:
    """The last `size` samples, oldest first; fixed memory."""

    def __init__(self, size: int = _RING_SAMPLES) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)

    def take(self, board: Switchboard, now: float) -> None:
        ended = sum(e.done + e.failed for e in board.pipeline_ends.values())
        self.samples.append(
            Sample(
                now,
                board.stats.accepted,
                ended,
                board.queue_depth,
                board.running,
                tuple(board.latency.counts),
            )
        )

    def series(self) -> dict[str, list[Any]]:
        """Per sample after the first: rates over its interval, the queue then,
        and latency quantiles (ms) over the last _LATENCY_WINDOW intervals."""
        samples = list(self.samples)
        out: dict[str, list[Any]] = {
            "t": [],
            "accepted_per_s": [],
            "ended_per_s": [],
            "queued": [],
            "running": [],
            "p50_ms": [],
            "p99_ms": [],
        }
        for i in range(1, len(samples)):
            s, prev = samples[i], samples[i - 1]
            dt = max(s.at - prev.at, 1e-9)
            base = samples[max(i - _LATENCY_WINDOW, 0)]
            deltas = [a - b for a, b in zip(s.latency, base.latency, strict=True)]
            out["t"].append(s.at)
            out["accepted_per_s"].append(round((s.accepted - prev.accepted) / dt, 2))
            out["ended_per_s"].append(round((s.ended - prev.ended) / dt, 2))
            out["queued"].append(s.queued)
            out["running"].append(s.running)
            out["p50_ms"].append(quantile_ms(deltas, 0.5))
            out["p99_ms"].append(quantile_ms(deltas, 0.99))
        return out


def quantile_ms(counts: list[int], q: float) -> float | None:
    """The q-quantile (ms) of a latency histogram's bucket counts (state.Latency's
    buckets, not cumulative), interpolated within its bucket; None if empty.
    Past the last bound a job counts at the last bound (the chart's ceiling)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(counts):
        upper = LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else LATENCY_BOUNDS_S[-1]
        if n and seen + n >= rank:
            within = (rank - seen) / n
            return round((lower + (upper - lower) * within) * 1000.0, 3)
        seen += n
        lower = upper
    return round(LATENCY_BOUNDS_S[-1] * 1000.0, 3)


class Access:
    """Who may see the dashboard.

    Open (`tokens` None): anyone who reaches the listener, but only when the
    request's Host is an IP address or localhost, so that a page elsewhere
    cannot read it through DNS rebinding. Closed: a request must carry one of
    `tokens` (the listeners' admin tokens) as `Authorization: Bearer TOKEN` or
    in the cookie the login page sets; otherwise it gets the login page (or a
    401 from the API). Closed with no tokens at all: only the login page.
    """

    def __init__(self, tokens: frozenset[bytes] | None) -> None:
        self.tokens = tokens

    @property
    def open(self) -> bool:
        return self.tokens is None

    def refuses(self, headers: dict[bytes, bytes]) -> str | None:
        """Why a request may not see the dashboard ("host", "token"), or None."""
        if self.tokens is None:
            return None if _local_host(headers.get(b"host", b"")) else "host"
        presented = _presented_token(headers)
        if presented is None:
            return "token"
        # Every token compared, in constant time each: no early exit to time.
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented, token)
        return None if ok else "token"


def access_for(
    listener_tokens: list[tuple[str | None, str | None]], metrics_loopback: bool
) -> Access:
    """The dashboard's access from the listeners' (token, admin_token) pairs:
    open only when no listener uses a token and the metrics address is loopback."""
    admin = frozenset(a.encode("utf-8") for _, a in listener_tokens if a is not None)
    uses_tokens = any(t is not None or a is not None for t, a in listener_tokens)
    if not uses_tokens and metrics_loopback:
        return Access(None)
    return Access(admin)


def _presented_token(headers: dict[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip()
    cookie = headers.get(b"cookie")
    if cookie is not None:
        for part in cookie.split(b";"):
            name, sep, value = part.strip().partition(b"=")
            if sep and name == TOKEN_COOKIE.encode():
                return unquote(value.decode("latin-1")).encode("utf-8", "surrogateescape")
    return None


def _local_host(host: bytes) -> bool:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


class Dashboard:
    """The routes. `respond` answers one request head's parts with the bytes
    of a whole HTTP response, or None for a path that is not the dashboard's."""

    def __init__(self, broker: Watched, access: Access) -> None:
        self._broker = broker
        self.access = access
        self.ring = Ring()
        self._views: dict[str, tuple[float, Any]] = {}
        self._static = {path: _asset(path.rsplit("/", 1)[1]) for path in _STATIC}
        self._node = f"{socket.gethostname()}:{os.getpid()}"

    # -- sampling (the broker calls this once a second) -------------------------

    def sample(self) -> None:
        self.ring.take(self._broker.board, self._broker.now())

    # -- HTTP ----------------------------------------------------------------------

    def respond(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> bytes | None:
        path_b, _, query_b = target.partition(b"?")
        path = path_b.decode("latin-1")
        send_body = method == b"GET"
        if path in self._static:
            return _answer(b"200 OK", _STATIC[path], self._static[path], send_body)
        if not (path == "/" or path == "/api" or path.startswith("/api/")):
            return None
        try:
            query = parse_qs(query_b.decode("latin-1"), max_num_fields=8)
        except ValueError:  # more fields than any page of ours sends
            return _json(b"400 Bad Request", {"error": "too many query fields"}, send_body)
        refused = self.access.refuses(headers)
        if refused == "host":
            # An open dashboard reached by a name (DNS rebinding, or a proxy): refused.
            why = "this dashboard answers only to an IP address or localhost in Host"
            return _json(b"403 Forbidden", {"error": why}, send_body)
        if refused is not None:
            if path == "/":
                return _answer(
                    b"401 Unauthorized", "text/html; charset=utf-8", self._login_page(), send_body
                )
            return _json(b"401 Unauthorized", {"error": "unauthorized"}, send_body)
        if path == "/":
            cookie = query.get("cookie", [""])[0]
            body = self._page(cookie.strip(), query.get("payload", [""])[0] == "1")
            return _answer(b"200 OK", "text/html; charset=utf-8", body, send_body)
        if path.startswith("/api/jobs/"):
            return self._job_answer(path[len("/api/jobs/") :], query, send_body)
        view = _API.get(path)
        if view is None:
            return _json(b"404 Not Found", {"error": f"no such endpoint: {path[:100]}"}, send_body)
        return _json(b"200 OK", self._view(view), send_body)

    def _job_answer(self, text: str, query: dict[str, list[str]], send_body: bool) -> bytes:
        cookie = parse_cookie(unquote(text))
        if cookie is None:
            return _json(
                b"400 Bad Request", {"error": "not a cookie (a UUID or 32 hex digits)"}, send_body
            )
        found = self.job(cookie, query.get("payload", [""])[0] == "1")
        if found is None:
            why = "no job with this cookie (unknown, or its result has expired)"
            return _json(b"404 Not Found", {"error": why}, send_body)
        return _json(b"200 OK", found, send_body)

    # -- views -----------------------------------------------------------------------

    def _view(self, name: str) -> Any:
        """The view `name` from its snapshot, built again once _VIEW_TTL_S old."""
        now = self._broker.now()
        cached = self._views.get(name)
        if cached is not None and now - cached[0] < _VIEW_TTL_S:
            return cached[1]
        builder: Callable[[], Any] = getattr(self, name)
        value = builder()
        self._views[name] = (now, value)
        return value

    def index(self) -> dict[str, Any]:
        return {
            "endpoints": {
                "/api/overview": "uptime, version, nodes, totals, and per-second series",
                "/api/workers": "one row per worker connection",
                "/api/pipelines": "queued, running, done, failed per pipeline; oldest queued age",
                "/api/clients": "client connections and their in-flight jobs",
                "/api/failures": "the most recent jobs that did not end OK, newest first",
                "/api/jobs/COOKIE": "one job by its cookie; ?payload=1 adds its payloads, cut",
            },
            "docs": "docs/dashboard.md",
        }

    def overview(self) -> dict[str, Any]:
        b = self._broker
        board = b.board
        stats = board.stats
        total = free = 0
        for conn in board.workers():
            capacity, busy = board.slots(conn)
            total += capacity
            free += max(capacity - busy, 0)
        roles = {"client": 0, "worker": 0, "admin": 0}
        for c in board.connections():
            if c.role is not None and not c.closing:
                roles[c.role.value] += 1
        ended = sum(e.done + e.failed for e in board.pipeline_ends.values())
        failed = sum(e.failed for e in board.pipeline_ends.values())
        counts = list(board.latency.counts)
        return {
            "now": b.epoch + b.now(),
            "version": _version.__version__,
            "compiled": b.compiled,
            "uptime_s": b.uptime_s,
            "started_at": b.epoch + b.now() - b.uptime_s,
            "nodes": [{"name": self._node, "self": True, "listeners": b.addresses}],
            "journal": {"durable": board.durable, "trouble": board.journal_trouble},
            "draining": board.draining,
            "totals": {
                "accepted": stats.accepted,
                "ended": ended,
                "failed": failed,
                "rejected": sum(stats.rejected.values()),
                "requeued": stats.requeued,
                "queued": board.queue_depth,
                "running": board.running,
                "retained": len(board.retained),
                "workers": roles["worker"],
                "clients": roles["client"],
                "slots_total": total,
                "slots_free": free,
                "p50_ms": quantile_ms(counts, 0.5),
                "p99_ms": quantile_ms(counts, 0.99),
            },
            "sample_every_s": _SAMPLE_EVERY_S,
            "series": self.ring.series(),
        }

    def workers(self) -> dict[str, Any]:
        rows, total = overview.workers(self._broker.board, _MAX_ROWS)
        return self._listing(rows, total)

    def clients(self) -> dict[str, Any]:
        rows, total = overview.clients(self._broker.board, _MAX_ROWS)
        return self._listing(rows, total)

    def pipelines(self) -> dict[str, Any]:
        rows, total = overview.pipelines(self._broker.board, self._broker.now(), _MAX_ROWS)
        return self._listing(rows, total, peers=False)

    def failures(self) -> dict[str, Any]:
        rows = overview.failures(self._broker.board, self._broker.epoch)
        return self._listing(rows, len(rows), peers=False)

    def job(self, cookie: bytes, payload: bool) -> dict[str, Any] | None:
        b = self._broker
        return overview.job(b.board, cookie, b.now(), b.epoch, payload)

    def _listing(
        self, rows: list[dict[str, Any]], total: int, peers: bool = True
    ) -> dict[str, Any]:
        b = self._broker
        now = b.now()
        if peers:
            for row in rows:
                info = b.peer_info(row["conn"])
                address, opened, heard = info if info is not None else (None, None, None)
                row["address"] = address
                row["connected_at"] = None if opened is None else b.epoch + opened
                row["last_heard_s"] = None if heard is None else max(now - heard, 0.0)
        return {"now": b.epoch + now, "total": total, "truncated": total > len(rows), "rows": rows}

    # -- HTML ------------------------------------------------------------------------

    def _login_page(self) -> bytes:
        if self.access.tokens:
            form = (
                "<form id=login><label>Admin token "
                "<input type=password name=token autocomplete=current-password autofocus>"
                "</label> <button>Open the dashboard</button></form>"
                "<p class=muted>Or send <code>Authorization: Bearer TOKEN</code>.</p>"
            )
        else:
            form = (
                "<p>This dashboard needs an admin token (the listeners use tokens, or "
                "<code>metrics_address</code> is not a loopback address) and none is set: "
                "give a listener <code>admin_token</code> (or <code>admin_token_file</code>) "
                "in the config file.</p>"
            )
        return _document(
            "reasonbroker: sign in",
            f"<main class=login><h1>reasonbroker</h1>{form}</main>",
            "/static/login.js",
        )

    def _page(self, cookie_text: str, payload: bool) -> bytes:
        ov = self._view("overview")
        job_html = ""
        if cookie_text:
            cookie = parse_cookie(cookie_text)
            if cookie is None:
                job_html = "<p class=error>Not a cookie (a UUID or 32 hex digits).</p>"
            else:
                found = self.job(cookie, payload)
                job_html = (
                    "<p class=error>No job with this cookie (unknown, or its result has "
                    "expired).</p>"
                    if found is None
                    else render_job(found)
                )
        body = _PAGE.format(
            meta=html.escape(_meta_line(ov)),
            cards=_cards(ov),
            workers=_rows(self._view("workers"), _WORKER_COLUMNS),
            pipelines=_rows(self._view("pipelines"), _PIPELINE_COLUMNS),
            clients=_rows(self._view("clients"), _CLIENT_COLUMNS),
            failures=_rows(_first(self._view("failures"), _FAILURES_SHOWN), _FAILURE_COLUMNS),
            cookie=html.escape(cookie_text[:100], quote=True),
            payload_checked=" checked" if payload else "",
            job=job_html,
        )
        return _document("reasonbroker dashboard", body, "/static/dashboard.js")


# Path -> the Dashboard method that builds its view.
_API: Final = {
    "/api": "index",
    "/api/overview": "overview",
    "/api/workers": "workers",
    "/api/pipelines": "pipelines",
    "/api/clients": "clients",
    "/api/failures": "failures",
}


def parse_cookie(text: str) -> bytes | None:
    """A job cookie from its UUID text (any of uuid.UUID's forms) or 32 hex digits."""
    text = text.strip()
    if not text or len(text) > 64:
        return None
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        return None


def _asset(name: str) -> bytes:
    return resources.files("reasonbroker.daemon.static").joinpath(name).read_bytes()


def _answer(status: bytes, content_type: str, body: bytes, send_body: bool) -> bytes:
    return http_response(
        status, content_type.encode(), body, headers=_SECURITY_HEADERS, send_body=send_body
    )


def _json(status: bytes, value: Any, send_body: bool) -> bytes:
    body = json.dumps(value, separators=(",", ":"), default=str).encode()
    while len(body) > _MAX_RESPONSE_BYTES and isinstance(value, dict) and value.get("rows"):
        # Too big to send whole: fewer rows, said so.
        rows = value["rows"]
        value = {**value, "rows": rows[: len(rows) // 2], "truncated": True}
        body = json.dumps(value, separators=(",", ":"), default=str).encode()
    if len(body) > _MAX_RESPONSE_BYTES:
        status = b"500 Internal Server Error"
        body = b'{"error":"response too big"}'
    return _answer(status, "application/json", body, send_body)


# -- server-side rendering (the same tables dashboard.js renders from the API) -------

Column = tuple[str, str, Callable[[dict[str, Any], float], str]]


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ago(at: float | None, now: float) -> str:
    return "" if at is None else duration(max(now - at, 0.0)) + " ago"


def _pipelines_of(row: dict[str, Any]) -> str:
    names = row["pipelines"]
    if names is None:
        return "(all)"
    more = row["pipelines_count"] - len(names)
    return ", ".join(names) + (f" (+{more})" if more > 0 else "")


_WORKER_COLUMNS: Final[list[Column]] = [
    ("name", "Name", lambda r, n: _esc(r["name"] or f"conn {r['conn']}")),
    ("address", "Address", lambda r, n: _esc(r["address"])),
    ("pipelines", "Pipelines", lambda r, n: _esc(_pipelines_of(r))),
    ("capacity", "Capacity", lambda r, n: _esc(r["capacity"])),
    ("busy", "Busy", lambda r, n: _esc(r["busy"])),
    ("done", "Done", lambda r, n: _esc(r["done"])),
    ("failed", "Failed", lambda r, n: _esc(r["failed"])),
    ("connected", "Connected", lambda r, n: _esc(_ago(r["connected_at"], n))),
    ("heard", "Last heard", lambda r, n: _esc(duration(r["last_heard_s"]) + " ago")),
    (
        "state",
        "State",
        lambda r, n: "<span class=draining>draining</span>" if r["draining"] else "",
    ),
]
_PIPELINE_COLUMNS: Final[list[Column]] = [
    ("pipeline", "Pipeline", lambda r, n: _esc(r["pipeline"])),
    ("queued", "Queued", lambda r, n: _esc(r["queued"])),
    ("running", "Running", lambda r, n: _esc(r["running"])),
    ("done", "Done", lambda r, n: _esc(r["done"])),
    ("failed", "Failed", lambda r, n: _esc(r["failed"])),
    ("workers", "Workers", lambda r, n: _esc(r["workers"])),
    ("oldest", "Oldest queued", lambda r, n: _esc(duration(r["oldest_queued_s"]))),
]
_CLIENT_COLUMNS: Final[list[Column]] = [
    ("name", "Name", lambda r, n: _esc(r["name"] or f"conn {r['conn']}")),
    ("address", "Address", lambda r, n: _esc(r["address"])),
    ("in_flight", "In flight", lambda r, n: _esc(r["in_flight"])),
    ("connected", "Connected", lambda r, n: _esc(_ago(r["connected_at"], n))),
    ("heard", "Last heard", lambda r, n: _esc(duration(r["last_heard_s"]) + " ago")),
]
_FAILURE_COLUMNS: Final[list[Column]] = [
    ("ended", "Ended", lambda r, n: _esc(_ago(r["ended_at"], n))),
    (
        "cookie",
        "Cookie",
        lambda r, n: f"<a href='/?cookie={_esc(r['cookie'])}'>{_esc(r['cookie'])}</a>",
    ),
    ("pipeline", "Pipeline", lambda r, n: _esc(r["pipeline"])),
    ("rc", "Result", lambda r, n: _esc(r["rc"])),
    ("attempts", "Attempts", lambda r, n: _esc(r["attempts"])),
    ("error", "Error", lambda r, n: _esc((r["error"] or "")[:200])),
]


def _rows(listing: dict[str, Any], columns: list[Column]) -> str:
    now = listing["now"]
    if not listing["rows"]:
        return f"<tr><td colspan={len(columns)} class=muted>none</td></tr>"
    out = []
    for row in listing["rows"]:
        cells = "".join(f"<td class=c-{key}>{cell(row, now)}</td>" for key, _, cell in columns)
        out.append(f"<tr>{cells}</tr>")
    if listing["truncated"]:
        out.append(
            f"<tr><td colspan={len(columns)} class=muted>"
            f"{len(listing['rows'])} of {listing['total']} shown</td></tr>"
        )
    return "".join(out)


def _first(listing: dict[str, Any], n: int) -> dict[str, Any]:
    if len(listing["rows"]) <= n:
        return listing
    return {**listing, "rows": listing["rows"][:n], "truncated": True}


def _heads(columns: list[Column]) -> str:
    return "".join(f"<th class=c-{key}>{_esc(title)}</th>" for key, title, _ in columns)


def _meta_line(ov: dict[str, Any]) -> str:
    nodes = ", ".join(n["name"] for n in ov["nodes"])
    build = "compiled" if ov["compiled"] else "pure Python"
    journal = "journal" if ov["journal"]["durable"] else "no journal"
    return (
        f"version {ov['version']} ({build}, {journal}) · node {nodes} · "
        f"up {duration(ov['uptime_s'])}"
    )


_CARDS: Final = (
    ("accepted", "accepted"),
    ("ended", "ended"),
    ("failed", "failed"),
    ("queued", "queued"),
    ("running", "running"),
    ("workers", "workers"),
    ("clients", "clients"),
    ("slots_free", "free slots"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
)
_CHARTS: Final = (
    ("accepted_per_s", "jobs/s accepted"),
    ("ended_per_s", "jobs/s ended"),
    ("p50_ms", "p50 latency (ms)"),
    ("p99_ms", "p99 latency (ms)"),
    ("queued", "queue depth"),
)


def _cards(ov: dict[str, Any]) -> str:
    totals = ov["totals"]
    cards = "".join(
        f"<div class=card><b id=total-{key}>{_esc(_num(totals[key]))}</b>"
        f"<span>{_esc(label)}</span></div>"
        for key, label in _CARDS
    )
    charts = "".join(
        f"<figure class=chart><figcaption>{_esc(label)} <b id=last-{key}>"
        f"{_esc(_num(_last(ov['series'][key])))}</b></figcaption>"
        f"{sparkline(ov['series'][key], key)}</figure>"
        for key, label in _CHARTS
    )
    return f"<div class=cards>{cards}</div><div class=charts>{charts}</div>"


def _last(values: list[Any]) -> Any:
    return values[-1] if values else None


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value)


def sparkline(values: list[float | None], key: str, width: int = 300, height: int = 60) -> str:
    """An SVG polyline of `values` (None: a gap), scaled to its own maximum."""
    points = [v for v in values if v is not None]
    top = max(points) if points else 0.0
    top = top if top > 0 else 1.0
    n = max(len(values) - 1, 1)
    coords = " ".join(
        f"{i * width / n:.1f},{height - (v / top) * (height - 4) - 2:.1f}"
        for i, v in enumerate(values)
        if v is not None
    )
    return (
        f"<svg id=chart-{key} viewBox='0 0 {width} {height}' preserveAspectRatio=none "
        f"width={width} height={height}><polyline fill=none points='{coords}'/></svg>"
    )


def render_job(job: dict[str, Any]) -> str:
    """A job (core/overview.py's `job`) as a definition list."""
    items = []
    for key in (
        "cookie",
        "state",
        "pipeline",
        "attempts",
        "max_attempts",
        "rc",
        "error",
        "accepted_at",
        "ended_at",
        "latency_s",
        "age_s",
        "worker_conn",
        "client_conn",
        "retained",
    ):
        if key in job and job[key] is not None:
            value = job[key]
            if key.endswith("_at"):
                value = datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
            elif key.endswith("_s"):
                value = duration(value)
            items.append(f"<dt>{_esc(key)}</dt><dd class=j-{key}>{_esc(value)}</dd>")
    if job.get("stacktrace"):
        trace = "".join(line if line.endswith("\n") else line + "\n" for line in job["stacktrace"])
        items.append(f"<dt>stacktrace</dt><dd><pre>{_esc(trace)}</pre></dd>")
    for key in ("variables", "result"):
        shown = job.get(key)
        if shown is not None:
            cut = " (truncated)" if shown["truncated"] else ""
            items.append(f"<dt>{key}{cut}</dt><dd><pre>{_esc(shown['text'])}</pre></dd>")
    return f"<dl class=job id=job-found>{''.join(items)}</dl>"


def _document(title: str, body: str, script: str) -> bytes:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><link rel=stylesheet href=/static/dashboard.css>"
        f"</head><body>{body}<script src={script}></script></body></html>"
    ).encode()


_PAGE: Final = (
    "<header><h1>reasonbroker</h1><span id=meta>{meta}</span>"
    "<span id=live class=muted></span></header>"
    "<section id=overview><h2>Overview</h2>{cards}</section>"
    "<section><h2>Workers</h2><table id=workers><thead><tr>"
    + _heads(_WORKER_COLUMNS)
    + "</tr></thead><tbody>{workers}</tbody></table></section>"
    "<section><h2>Pipelines</h2><table id=pipelines><thead><tr>"
    + _heads(_PIPELINE_COLUMNS)
    + "</tr></thead><tbody>{pipelines}</tbody></table></section>"
    "<section><h2>Jobs</h2><form id=lookup method=get action=/>"
    "<input name=cookie id=cookie placeholder='job cookie (UUID)' size=40 value='{cookie}'> "
    "<label><input type=checkbox name=payload value=1 id=payload{payload_checked}> "
    "payloads</label> <button>Look up</button></form><div id=job>{job}</div>"
    "<h3>Recent failures</h3><table id=failures><thead><tr>"
    + _heads(_FAILURE_COLUMNS)
    + "</tr></thead><tbody>{failures}</tbody></table></section>"
    "<section><h2>Clients</h2><table id=clients><thead><tr>"
    + _heads(_CLIENT_COLUMNS)
    + "</tr></thead><tbody>{clients}</tbody></table></section>"
)
