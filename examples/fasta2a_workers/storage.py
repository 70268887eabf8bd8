"""A fasta2a Storage in one SQLite file, shared by the A2A server and its workers.

reasonbroker carries a task's operations and events between processes, not
the task itself: fasta2a's server and workers each read and write the task in
their `Storage`, so they must all use the same one. This one is a file on a
disk they share (the workers of this example run on the server's machine);
workers on other machines need a database server instead, behind the same
five methods. Each call opens its own connection in a thread, and each
read-modify-write is one `BEGIN IMMEDIATE` transaction, so concurrent
processes never lose each other's updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fasta2a.schema import Artifact, Message, Task, TaskState, TaskStatus
from fasta2a.storage import Storage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (id TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


class SQLiteStorage(Storage[Any]):
    """Tasks and contexts as JSON rows in the SQLite file at `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # Autocommit; each method begins its own transaction. `timeout`: how long
        # a writer waits for another process's transaction.
        return sqlite3.connect(self.path, timeout=30.0, isolation_level=None)

    async def load_task(self, task_id: str, history_length: int | None = None) -> Task | None:
        task = await asyncio.to_thread(self._load, "tasks", task_id)
        if task is not None and history_length and "history" in task:
            task["history"] = task["history"][-history_length:]
        return task

    async def submit_task(self, context_id: str, message: Message) -> Task:
        task_id = str(uuid.uuid4())
        message["task_id"] = task_id
        message["context_id"] = context_id
        status = TaskStatus(state="submitted", timestamp=datetime.now().isoformat())
        task = Task(id=task_id, context_id=context_id, status=status, history=[message])
        await asyncio.to_thread(self._store, "tasks", task_id, task)
        return task

    async def update_task(
        self,
        task_id: str,
        state: TaskState,
        new_artifacts: list[Artifact] | None = None,
        new_messages: list[Message] | None = None,
    ) -> Task:
        return await asyncio.to_thread(self._update, task_id, state, new_artifacts, new_messages)

    async def load_context(self, context_id: str) -> Any | None:
        return await asyncio.to_thread(self._load, "contexts", context_id)

    async def update_context(self, context_id: str, context: Any) -> None:
        await asyncio.to_thread(self._store, "contexts", context_id, context)

    # -- in a thread -----------------------------------------------------------------

    def _load(self, table: str, key: str) -> Any | None:
        with contextlib.closing(self._connect()) as db:
            row = db.execute(f"SELECT body FROM {table} WHERE id = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _store(self, table: str, key: str, value: Any) -> None:
        with contextlib.closing(self._connect()) as db:
            db.execute(
                f"INSERT OR REPLACE INTO {table} (id, body) VALUES (?, ?)", (key, json.dumps(value))
            )

    def _update(
        self,
        task_id: str,
        state: TaskState,
        new_artifacts: list[Artifact] | None,
        new_messages: list[Message] | None,
    ) -> Task:
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if row is None:
                    raise KeyError(f"no task {task_id!r}")
                task: Task = json.loads(row[0])
                task["status"] = TaskStatus(state=state, timestamp=datetime.now().isoformat())
                if new_artifacts:
                    task.setdefault("artifacts", []).extend(new_artifacts)
                for message in new_messages or ():
                    message["task_id"] = task_id
                    message["context_id"] = task["context_id"]
                    task.setdefault("history", []).append(message)
                db.execute("UPDATE tasks SET body = ? WHERE id = ?", (json.dumps(task), task_id))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return task
