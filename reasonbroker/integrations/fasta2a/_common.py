"""What the server and worker sides agree on: the task id's cookie, and how a
fasta2a event bus call travels as a PROGRESS packet's `result`."""

from __future__ import annotations

import uuid
from typing import Any, Final

# Task ids that are not UUIDs map into this namespace (uuid5), so one id is
# always the same cookie, whichever server process submits or cancels it.
TASK_NAMESPACE: Final = uuid.UUID("6f0f3a4e-5f2d-4d53-9a38-2f0d9c1b7a11")

# PROGRESS `result` maps: {"a2a": "event", "event": StreamResponse} for
# EventBus.emit, {"a2a": "close"} for EventBus.close.
KIND: Final = "a2a"
EVENT: Final = "event"
CLOSE: Final = "close"


def task_cookie(task_id: str) -> uuid.UUID:
    """The reasonbroker cookie of a fasta2a task: the task id itself when it is
    a UUID (fasta2a's storages draw uuid4 ids), else uuid5 of it."""
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return uuid.uuid5(TASK_NAMESPACE, task_id)


def event_packet(event: Any) -> dict[str, Any]:
    return {KIND: EVENT, EVENT: event}


def close_packet() -> dict[str, Any]:
    return {KIND: CLOSE}
