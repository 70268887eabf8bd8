"""The dashboard's views of the switchboard, sans-IO: plain data from the board's state.

Owns what the read-only dashboard (daemon/dashboard.py) shows of the board:
workers, clients, pipelines, the most recent failures and one job by its
cookie, each as JSON-ready dicts and lists. It only reads: nothing here
changes a job, a queue or a counter. Time is passed in (`now`, board time)
and so is `epoch` (wall clock minus board time), so that every time it
returns is a Unix time. Lists are cut at `max_rows` (the daemon bounds its
responses); the per-pipeline counts are a scan of the queues and running
jobs, which is why the daemon builds a view at most a few times a second
instead of counting on the hot path.

It is not compiled (not in _native.NATIVE_MODULES): it reads the compiled
board's records from Python, off the hot path.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .board import Switchboard
from .packets import Raw, RawJson, Role
from .retention import Ended
from .state import _Job, _State

# Pipeline names listed per worker; the rest are counted, not named.
PIPELINES_SHOWN: Final = 32
# A payload shown on request is cut to this many characters of its JSON text,
# and one bigger than PAYLOAD_DECODE_MAX_BYTES is not decoded at all (that
# would hold the event loop): its first bytes are shown in hex instead.
PAYLOAD_SHOW_CHARS: Final = 4096
PAYLOAD_DECODE_MAX_BYTES: Final = 1024 * 1024
# A stack trace is shown as at most this many lines, each cut as an error is.
TRACE_LINES_SHOWN: Final = 64
TEXT_SHOWN_CHARS: Final = 4096


def workers(board: Switchboard, max_rows: int) -> tuple[list[dict[str, Any]], int]:
    """The registered (and registering) workers, by connection id; and how many there are."""
    rows: list[dict[str, Any]] = []
    total = 0
    for c in board.connections():
        if c.role is not Role.WORKER or c.closing:
            continue
        total += 1
        if len(rows) >= max_rows:
            continue
        pipelines = None if c.pipelines is None else sorted(c.pipelines)
        rows.append(
            {
                "conn": c.id,
                "name": _text(c.name),
                "pipelines": None if pipelines is None else pipelines[:PIPELINES_SHOWN],
                "pipelines_count": None if pipelines is None else len(pipelines),
                "capacity": c.capacity,
                "busy": c.busy,
                "done": c.done,
                "failed": c.failed,
                "draining": c.draining,
                "said_hello": c.hello,
                "codec": c.codec.value,
            }
        )
    return rows, total


def clients(board: Switchboard, max_rows: int) -> tuple[list[dict[str, Any]], int]:
    """Client connections with their in-flight jobs (queued or running, theirs or
    ATTACHed); and how many there are."""
    rows: list[dict[str, Any]] = []
    total = 0
    for c in board.connections():
        if c.role is not Role.CLIENT or c.closing:
            continue
        total += 1
        if len(rows) >= max_rows:
            continue
        rows.append(
            {
                "conn": c.id,
                "name": _text(c.name),
                "in_flight": len(c.jobs),
                "payload_bytes": c.payload_bytes,
                "said_hello": c.hello,
                "codec": c.codec.value,
            }
        )
    return rows, total


def pipelines(board: Switchboard, now: float, max_rows: int) -> tuple[list[dict[str, Any]], int]:
    """Per pipeline: queued, running, done, failed, workers serving it by name,
    and the age of its oldest queued job (seconds; None when none waits)."""
    table: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        entry = table.get(name)
        if entry is None:
            entry = table[name] = {
                "pipeline": name,
                "queued": 0,
                "running": 0,
                "done": 0,
                "failed": 0,
                "workers": 0,
                "oldest_queued_s": None,
            }
        return entry

    for name, heap in board.dispatcher.queues.items():
        oldest: float | None = None
        live = 0
        for _, _, job in heap:
            if job.state is _State.QUEUED:
                live += 1
                if oldest is None or job.accepted_at < oldest:
                    oldest = job.accepted_at
        if live:
            entry = row(name)
            entry["queued"] = live
            entry["oldest_queued_s"] = None if oldest is None else max(now - oldest, 0.0)
    all_pipelines = 0
    for c in board.connections():
        if c.role is not Role.WORKER or c.closing:
            continue
        for job in c.running.values():
            row(job.run.pipeline)["running"] += 1
        if c.pipelines is None:
            all_pipelines += 1
        else:
            for name in c.pipelines:
                row(name)["workers"] += 1
    for key, ends in board.pipeline_ends.items():
        entry = row("(others)" if key is None else key)
        entry["done"] += ends.done
        entry["failed"] += ends.failed
    if all_pipelines:
        for entry in table.values():
            entry["workers"] += all_pipelines
    ordered = [table[name] for name in sorted(table)]
    return ordered[:max_rows], len(ordered)


def failures(board: Switchboard, epoch: float) -> list[dict[str, Any]]:
    """The most recent jobs that did not end OK, newest first (bounded by the board)."""
    return [_ended(ended, epoch, None) for ended in reversed(board.failures)]


def job(
    board: Switchboard, cookie: bytes, now: float, epoch: float, payload: bool
) -> dict[str, Any] | None:
    """One job by its cookie: live (queued or running), retained (ended; with a
    journal every ended job is kept until result_ttl_s), or among the recent
    failures; None if the board no longer knows it. `payload`: include its
    variables (and a retained result's value), cut to PAYLOAD_SHOW_CHARS."""
    live = board.jobs.get(cookie)
    if live is not None:
        return _live(live, now, epoch, payload)
    ended = board.retained.get(cookie, now)
    if ended is not None:
        return _ended(ended, epoch, payload)
    for failed in board.failures:
        if failed.result.cookie == cookie:
            entry = _ended(failed, epoch, None)
            entry["retained"] = False
            return entry
    return None


def _live(j: _Job, now: float, epoch: float, payload: bool) -> dict[str, Any]:
    run = j.run
    entry: dict[str, Any] = {
        "cookie": _uuid(j.cookie),
        "state": "queued" if j.state is _State.QUEUED else "running",
        "pipeline": run.pipeline,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "priority": run.priority,
        "timeout_ms": run.timeout_ms,
        "detach": run.detach,
        "accepted_at": epoch + j.accepted_at,
        "age_s": max(now - j.accepted_at, 0.0),
        "deadline_at": None if j.deadline is None else epoch + j.deadline,
        "worker_conn": None if j.worker is None else j.worker.id,
        "client_conn": None if j.client is None else j.client.id,
        "cancel_requested": j.cancel_requested,
        "ended_at": None,
        "rc": None,
        "error": None,
        "stacktrace": None,
        "retained": False,
    }
    if payload:
        entry["variables"] = show_payload(run.variables)
    return entry


def _ended(ended: Ended, epoch: float, payload: bool | None) -> dict[str, Any]:
    result = ended.result
    trace = result.stacktrace
    entry: dict[str, Any] = {
        "cookie": None if result.cookie is None else _uuid(result.cookie),
        "state": "ended",
        "pipeline": ended.pipeline,
        "attempts": ended.attempts,
        "accepted_at": epoch + ended.accepted_at,
        "ended_at": epoch + ended.ended_at,
        "latency_s": max(ended.ended_at - ended.accepted_at, 0.0),
        "rc": result.rc.value,
        "error": _text(result.error),
        "stacktrace": None
        if trace is None
        else [_text(line) for line in trace[-TRACE_LINES_SHOWN:]],
        "retained": True,
    }
    if payload:
        entry["result"] = show_payload(result.result)
    return entry


def show_payload(value: Any) -> dict[str, Any]:
    """A payload as text to show: {"text", "bytes" (its size, when known), "truncated"}."""
    size: int | None = None
    if isinstance(value, Raw):
        size = len(value.data)
        if size > PAYLOAD_DECODE_MAX_BYTES:
            head = value.data[: PAYLOAD_SHOW_CHARS // 2].hex()
            return {"text": f"(msgpack, not decoded) {head}", "bytes": size, "truncated": True}
        value = value.value()
    elif isinstance(value, RawJson):
        value = value.value()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        size = len(value)
        raw = bytes(value[: PAYLOAD_SHOW_CHARS // 2])
        return {"text": f"(bytes) {raw.hex()}", "bytes": size, "truncated": size > len(raw)}
    try:
        text = json.dumps(value, ensure_ascii=False, default=_unjson)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    cut = len(text) > PAYLOAD_SHOW_CHARS
    return {"text": text[:PAYLOAD_SHOW_CHARS], "bytes": size, "truncated": cut}


def _unjson(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"(bytes) {bytes(value[:64]).hex()}"
    return repr(value)[:200]


def _text(value: str | None) -> str | None:
    if value is None or len(value) <= TEXT_SHOWN_CHARS:
        return value
    return value[:TEXT_SHOWN_CHARS] + "..."


def _uuid(cookie: bytes) -> str:
    """A 16-byte cookie as its UUID text (what the SDK and the CLI print); other lengths in hex."""
    h = cookie.hex()
    if len(cookie) != 16:
        return h
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
