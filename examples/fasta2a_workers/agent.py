"""A fasta2a worker process: runs the "shout" agent's tasks that reasonbroker sends it.

    python -m examples.fasta2a_workers.agent --storage /tmp/a2a.sqlite3 --name w1

The agent upper-cases the text of the task's message, one word at a time
(`--delay` seconds per word, standing in for a model's work), and streams
each word as a chunk of its answer artifact. SIGTERM or SIGINT: no new
tasks, running ones finish, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fasta2a import Worker
from fasta2a.schema import Artifact, Message, Part, TaskIdParams, TaskSendParams

from reasonbroker.integrations.fasta2a import ReasonbrokerWorkerBroker

from .storage import SQLiteStorage

PIPELINE = "shout"


@dataclass
class ShoutWorker(Worker[Any]):
    """Upper-cases the message, streaming a word at a time."""

    name: str = "shout"
    delay: float = 0.2

    async def run_task(self, params: TaskSendParams) -> None:
        task_id, context_id = params["id"], params["context_id"]
        await self.storage.update_task(task_id, state="working")
        await self.publish_status(task_id, context_id, "working")
        text = " ".join(part["text"] for part in params["message"]["parts"] if "text" in part)
        delay = float((params.get("metadata") or {}).get("delay", self.delay))
        artifact_id = str(uuid.uuid4())
        words = text.split()
        for i, word in enumerate(words):
            await anyio.sleep(delay)  # the agent's work
            chunk = word.upper() + (" " if i < len(words) - 1 else "")
            await self.publish_artifact(
                task_id,
                context_id,
                Artifact(artifact_id=artifact_id, parts=[Part(text=chunk)]),
                append=True,
                last_chunk=False,
            )
        answer = Artifact(
            artifact_id=artifact_id,
            name="result",
            parts=[Part(text=" ".join(words).upper())],
            metadata={"worker": self.name},
        )
        await self.storage.update_task(task_id, state="completed", new_artifacts=[answer])
        await self.publish_artifact(task_id, context_id, answer)
        # The final status and the stream's end: fasta2a's Worker publishes them
        # from storage once this returns.

    async def cancel_task(self, params: TaskIdParams) -> None:
        # The broker has already stopped this task's run_task (serve() tears its
        # loop down): record the end, unless the task has one (a deadline's
        # CANCEL comes after the server marked the task failed).
        task = await self.storage.load_task(params["id"])
        if task is not None and task["status"]["state"] in ("submitted", "working"):
            await self.storage.update_task(params["id"], state="canceled")

    def build_message_history(self, history: list[Message]) -> list[Any]:
        return list(history)

    def build_artifacts(self, result: Any) -> list[Artifact]:
        return [Artifact(artifact_id=str(uuid.uuid4()), parts=[Part(text=str(result))])]


async def serve(broker_url: str, storage_path: str, name: str, capacity: int, delay: float) -> None:
    broker = ReasonbrokerWorkerBroker(broker_url, pipeline=PIPELINE, capacity=capacity, name=name)
    worker = ShoutWorker(broker=broker, storage=SQLiteStorage(storage_path), name=name, delay=delay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with broker.serve(worker):
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.fasta2a_workers.agent")
    parser.add_argument("--broker", default="tcp://127.0.0.1:51510", help="worker listener")
    parser.add_argument("--storage", required=True, help="the SQLite file the server uses")
    parser.add_argument("--name", default="shout-worker")
    parser.add_argument("--capacity", type=int, default=2, help="tasks at once")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per word")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.broker, args.storage, args.name, args.capacity, args.delay))


if __name__ == "__main__":
    main()
