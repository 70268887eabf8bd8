"""Serve a pipeline by running a command once per job (`reasonbroker worker -- CMD ...`).

Like `gearman -w -f NAME -- cmd`: each job's variables go to the command's
stdin, its stdout comes back as the result.

- stdin: a `str` as UTF-8 text, `bytes` raw, anything else as JSON text
  (`None` is `null`).
- result: stdout decoded as UTF-8 (undecodable bytes become U+FFFD), with one
  trailing newline removed; never parsed as JSON. `print(x)` returns `x`.
- a non-zero exit status (or death by a signal) raises `CommandFailed`, which
  the worker answers as PROCESSOR_EXCEPTION; its message carries the status
  and the tail of stderr.
- environment: the worker's own, plus REASONBROKER_PIPELINE (the job's
  pipeline) and REASONBROKER_COOKIE (the cookie the broker gave this attempt,
  as a UUID).
- each command runs in a new session, so in its own process group. When the
  job is cancelled (the broker's CANCEL, a stopping worker) or runs past
  `timeout`, the whole group gets SIGTERM, then SIGKILL after `kill_grace`
  seconds, and the command is reaped before the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any, Final

from . import worker as _worker
from .peer import library_logger

__all__ = [
    "CommandFailed",
    "CommandHandler",
    "CommandTimeout",
    "decode_stdout",
    "encode_stdin",
]

DEFAULT_KILL_GRACE_S: Final = 2.0
# How much of stderr a failure's message carries (the end of it, where errors are).
STDERR_TAIL_CHARS: Final = 2000
# After SIGKILL, how long to wait for the command's pipes to close: a process
# that left the group (setsid) may hold them open forever.
_REAP_S: Final = 5.0


class CommandFailed(Exception):
    """The command exited with a non-zero status or was killed by a signal."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        if returncode < 0:
            try:
                status = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                status = f"killed by signal {-returncode}"
        else:
            status = f"exit status {returncode}"
        tail = stderr[-STDERR_TAIL_CHARS:].strip()
        super().__init__(f"command failed with {status}" + (f": {tail}" if tail else ""))


class CommandTimeout(Exception):
    """The command ran longer than the worker's --timeout and was killed."""


def encode_stdin(variables: Any) -> bytes:
    """The command's stdin for a job's variables: bytes raw, str as UTF-8, else JSON."""
    if isinstance(variables, bytes | bytearray | memoryview):
        return bytes(variables)
    if isinstance(variables, str):
        return variables.encode("utf-8")
    return json.dumps(variables, ensure_ascii=False).encode("utf-8")


def decode_stdout(data: bytes) -> str:
    """The job's result for the command's stdout: UTF-8 text, one trailing newline removed."""
    text = data.decode("utf-8", errors="replace")
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


class CommandHandler:
    """A `Worker` handler that runs `command` for each job of `pipeline`."""

    def __init__(
        self,
        command: Sequence[str],
        pipeline: str,
        *,
        timeout: float | None = None,
        kill_grace: float = DEFAULT_KILL_GRACE_S,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not command:
            raise ValueError("a command is needed")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.command = list(command)
        self.pipeline = pipeline
        self.timeout = timeout
        self.kill_grace = kill_grace
        self._env = dict(os.environ if env is None else env)
        self._log = library_logger("reasonbroker.cmdworker").bind(pipeline=pipeline)

    def environment(self) -> dict[str, str]:
        env = dict(self._env)
        env["REASONBROKER_PIPELINE"] = self.pipeline
        cookie = _worker.current_cookie()
        if cookie is not None:
            env["REASONBROKER_COOKIE"] = str(cookie)
        return env

    async def __call__(self, variables: Any) -> str:
        stdin = encode_stdin(variables)
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(),
            start_new_session=True,  # its own process group, killed as one
        )
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    stdout, stderr = await proc.communicate(stdin)
            except TimeoutError:
                raise CommandTimeout(f"command timed out after {self.timeout} s") from None
        except BaseException:
            # Cancelled (CANCEL from the broker, the worker stopping) or timed out.
            await self._kill_group(proc)
            raise
        if proc.returncode != 0:
            assert proc.returncode is not None
            raise CommandFailed(proc.returncode, stderr.decode("utf-8", errors="replace"))
        return decode_stdout(stdout)

    async def _kill_group(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the command's process group, SIGKILL it after the grace, and reap."""
        self._log.info("command_killing", pid=proc.pid)
        _killpg(proc.pid, signal.SIGTERM)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kill_grace):
                    await proc.wait()
        finally:
            # Whatever ignored SIGTERM, or is left in the group once its leader
            # exited; also when cancelled again while waiting.
            _killpg(proc.pid, signal.SIGKILL)
        try:
            async with asyncio.timeout(_REAP_S):
                await proc.wait()
        except TimeoutError:
            self._log.warning("command_pipes_held_open", pid=proc.pid)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
