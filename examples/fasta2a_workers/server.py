"""The A2A server: fasta2a over HTTP, its tasks sent to reasonbroker.

    python -m examples.fasta2a_workers.server --storage /tmp/a2a.sqlite3 --port 8000

Needs uvicorn. The broker (`reasonbroker serve`) and the workers
(`examples.fasta2a_workers.agent`) run beside it; see README.md.
"""

from __future__ import annotations

import argparse

from fasta2a import FastA2A

from reasonbroker.integrations.fasta2a import ReasonbrokerBroker

from .agent import PIPELINE
from .storage import SQLiteStorage


def make_app(
    broker_url: str,
    storage_path: str,
    *,
    max_attempts: int = 2,
    timeout: float | None = None,
    url: str = "http://127.0.0.1:8000",
) -> FastA2A:
    """The A2A app: its storage is the file the workers use too."""
    storage = SQLiteStorage(storage_path)
    broker = ReasonbrokerBroker(
        broker_url,
        pipeline=PIPELINE,
        storage=storage,
        max_attempts=max_attempts,  # a task survives one worker's death
        timeout=timeout,
    )
    return FastA2A(storage=storage, broker=broker, name=PIPELINE, url=url)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m examples.fasta2a_workers.server")
    parser.add_argument("--broker", default="tcp://127.0.0.1:51500", help="client listener")
    parser.add_argument("--storage", required=True, help="the SQLite file the workers use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per task")
    args = parser.parse_args(argv)
    app = make_app(
        args.broker,
        args.storage,
        timeout=args.timeout,
        url=f"http://{args.host}:{args.port}",
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
