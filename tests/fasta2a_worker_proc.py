"""The example's fasta2a worker as a test PROCESS (to SIGKILL one mid-task).

    python -m tests.fasta2a_worker_proc --broker URL --storage PATH --name NAME [--delay S]

It runs examples/fasta2a_workers/agent.py's `main`, and also exits when its
stdin closes, so a test process that dies never leaves it behind: start it
with ``stdin=subprocess.PIPE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from examples.fasta2a_workers import agent
from tests.worker_proc import _exit_when_stdin_closes

ROOT = Path(__file__).resolve().parent.parent


def spawn(
    broker_url: str, storage: Path, name: str, *, delay: float = 0.01, capacity: int = 2
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tests.fasta2a_worker_proc", "--broker", broker_url]
    cmd += ["--storage", str(storage), "--name", name, "--delay", str(delay)]
    cmd += ["--capacity", str(capacity)]
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    _exit_when_stdin_closes()
    agent.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the stdin watcher holds stdin's lock: no normal finalization
