"""Suite-wide settings.

`reasonbroker serve` keeps a journal at a default path in the user's state
directory (docs/durability.md). The tests that start it as a subprocess must
not share one file (a second broker is refused its lock) nor see each other's
jobs, so the suite runs them without a journal unless a test asks for one
(passing `--journal PATH` or setting the variable itself).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

os.environ.setdefault("REASONBROKER_JOURNAL_PATH", "none")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]] | None:
    """A test module with ``BOTH_LOOPS = True`` runs on asyncio's loop and on
    uvloop's (the daemon's), each test once per loop; the others on asyncio's only."""
    if not getattr(item.module, "BOTH_LOOPS", False):
        return None
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
