"""Peer-input limits, sans-IO: what a peer may make the broker hold, or log.

Owns the checks of the strings a peer names against `Limits` (a pipeline
name's length, pipelines per worker, a HELLO's `name` and `features`), each
answering why a packet is refused (None: it is fine), and `clip`: the one way
a value a peer controls goes into a log line (strings cut, lists cut, maps
walked), so no log line grows with what a peer sends. Answering and logging
are the board's and the broker's.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

from .limits import Limits
from .packets import Hello, Register

# A logged string keeps this many characters, a logged list this many items:
# enough to recognise a name, small enough that a flood of lines stays small.
LOG_TEXT_CHARS: Final = 200
LOG_ITEMS: Final = 16


def utf8_over(text: str, limit: int) -> bool:
    """Whether `text` takes more than `limit` bytes in UTF-8, without encoding
    it when its length alone decides (a character is 1 to 4 bytes)."""
    n = len(text)
    if n * 4 <= limit:
        return False
    if n > limit:
        return True
    return len(text.encode("utf-8", "surrogatepass")) > limit


def check_register(reg: Register, current: set[str] | None, limits: Limits) -> str | None:
    """Why a REGISTER's `pipelines` are refused, or None. Repeated names count
    once, and so do names the worker has already given."""
    if reg.pipelines is None:
        return None
    limit = limits.max_pipeline_name_bytes
    for name in reg.pipelines:
        if utf8_over(name, limit):
            return f"a pipeline name is longer than max_pipeline_name_bytes ({limit})"
    total = len(set(reg.pipelines) | current) if current else len(set(reg.pipelines))
    if total > limits.max_pipelines_per_worker:
        return (
            f"{total} pipelines is more than max_pipelines_per_worker "
            f"({limits.max_pipelines_per_worker})"
        )
    return None


def pipeline_too_long(limits: Limits) -> str:
    return (
        f"pipeline name is longer than max_pipeline_name_bytes ({limits.max_pipeline_name_bytes})"
    )


def registered_fields(
    capacity: int, before: set[str] | None, after: set[str] | None
) -> dict[str, Any]:
    """The worker_registered log line's fields: the pipelines this REGISTER
    added (not the whole cumulative set, which a repeated REGISTER would log
    again and again), clipped, and how many the worker serves in all."""
    if after is None:
        return {"capacity": capacity, "pipelines": None}
    added = after - before if before else after
    return {"capacity": capacity, "pipelines": clip(added), "pipelines_total": len(after)}


def check_hello(hello: Hello, limits: Limits) -> str | None:
    """Why a HELLO is refused for its size, or None: its `name` and `features`
    are kept for the connection's life."""
    if hello.name is not None and utf8_over(hello.name, limits.max_hello_name_bytes):
        return f"name is longer than max_hello_name_bytes ({limits.max_hello_name_bytes})"
    if len(hello.features) > limits.max_hello_features:
        return f"more than max_hello_features ({limits.max_hello_features}) features"
    limit = limits.max_hello_feature_bytes
    for feature in hello.features:
        if utf8_over(feature, limit):
            return f"a feature is longer than max_hello_feature_bytes ({limit})"
    return None


def clip(value: Any) -> Any:
    """`value` made fit for a log line: strings cut to LOG_TEXT_CHARS, lists,
    tuples and sets to their first LOG_ITEMS items, maps walked; each cut
    says how much was left out."""
    if isinstance(value, str):
        if len(value) <= LOG_TEXT_CHARS:
            return value
        return f"{value[:LOG_TEXT_CHARS]}... ({len(value) - LOG_TEXT_CHARS} more chars)"
    if isinstance(value, list | tuple | set | frozenset):
        # The first items only: a peer's list may be huge, never copied whole.
        first = list(itertools.islice(value, LOG_ITEMS))
        if isinstance(value, set | frozenset):
            first.sort(key=str)
        kept = [clip(v) for v in first]
        if len(value) > LOG_ITEMS:
            kept.append(f"... ({len(value) - LOG_ITEMS} more)")
        return kept
    if isinstance(value, dict):
        return clip_fields(value)
    return value


def clip_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A log line's fields, each clipped (the keys are ours, never a peer's)."""
    return {key: clip(v) for key, v in fields.items()}
