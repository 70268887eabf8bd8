"""What every part of the bench shares: the systems' names, the loopback host and the
pipeline, where the launcher and the project are, progress logging (stderr), the payload,
and the event loop runner (uvloop when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

SCRIPT: Final = Path(__file__).resolve().parent.parent / "bench"  # the launcher; workers run it
ROOT: Final = SCRIPT.parent.parent

try:
    import uvloop as uvloop  # re-exported: report.meta names its version
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

HOST: Final = "127.0.0.1"
PIPELINE: Final = "echo"  # reasonbroker pipeline, Gearman function, NATS subject
RB_NATIVE: Final = "reasonbroker"
RB_JSON: Final = "reasonbroker-json"
GEARMAND: Final = "gearmand"
NATS: Final = "nats"
SYSTEMS: Final = (RB_NATIVE, RB_JSON, GEARMAND, NATS)
REASONBROKERS: Final = (RB_NATIVE, RB_JSON)
SMALL_PAYLOAD: Final = 100
perf = time.perf_counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_payload(size: int) -> bytes:
    """Printable ASCII, so the same bytes travel as a JSON string, a Gearman blob, a NATS body."""
    pattern = b"reasonbroker-bench-payload-0123456789abcdefghijklmnopqrstuvwxyz."
    return (pattern * (size // len(pattern) + 1))[:size]


def run_async(coro_fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro_fn()

    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
