"""A worker PROCESS for tests that need to SIGKILL or SIGSTOP a real worker.

    python -m tests.worker_proc URL [--capacity N] [--pipelines echo,sleep] [--name NAME]

Run from the repository root. It serves these pipelines with the Worker
library (only those named by --pipelines, default all):

- ``echo``: returns its variables;
- ``sleep``: sleeps `variables` seconds, then returns them;
- ``death``: sleeps `variables` seconds (if any), then the process kills itself
  with SIGKILL (a job of death);
- ``fail``: raises, so the job ends PROCESSOR_EXCEPTION.

It does not reconnect: when its connection ends, the process exits. It also
exits when its stdin closes, so a test process that dies (or forgets to kill
it) never leaves it behind: start it with ``stdin=subprocess.PIPE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

from reasonbroker.sdk.errors import BrokerConnectionError
from reasonbroker.sdk.worker import Handler, Worker

ROOT = Path(__file__).resolve().parent.parent


async def echo(variables: Any) -> Any:
    return variables


async def sleep(variables: Any) -> Any:
    await asyncio.sleep(float(variables))
    return variables


async def death(variables: Any) -> Any:
    await asyncio.sleep(float(variables or 0))
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(3600)  # never reached
    return None


async def fail(variables: Any) -> Any:
    raise RuntimeError(f"planned failure: {variables!r}")


HANDLERS: dict[str, Handler] = {"echo": echo, "sleep": sleep, "death": death, "fail": fail}


def spawn(
    url: str, *, capacity: int = 1, pipelines: tuple[str, ...] = (), name: str = "proc"
) -> subprocess.Popen[bytes]:
    """Start a worker process (the caller must kill it, e.g. with `kill_all`)."""
    cmd = [sys.executable, "-m", "tests.worker_proc", url, "--capacity", str(capacity)]
    if pipelines:
        cmd += ["--pipelines", ",".join(pipelines)]
    cmd += ["--name", name]
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL (after SIGCONT, in case one is stopped) and reap every process."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


def _exit_when_stdin_closes() -> None:
    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.worker_proc")
    parser.add_argument("url")
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--pipelines", default=",".join(HANDLERS))
    parser.add_argument("--name", default="proc")
    args = parser.parse_args(argv)
    _exit_when_stdin_closes()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40),  # errors only
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    handlers = {name: HANDLERS[name] for name in args.pipelines.split(",") if name}

    async def serve() -> None:
        worker = Worker(
            args.url, handlers=handlers, capacity=args.capacity, name=args.name, reconnect=False
        )
        with contextlib.suppress(BrokerConnectionError):
            await worker.run()

    asyncio.run(serve())
    # Not a normal interpreter shutdown: the stdin watcher thread is blocked
    # in read() holding stdin's lock, which makes finalization abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
