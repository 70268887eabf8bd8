"""INTEROP TEST: ReasonChip 0.0.6's own client and worker, with reasonbroker as their broker.

This is the drop-in check of issue 6. It runs ReasonChip's real code, not a
re-implementation: `reasonchip worker` as a subprocess against our workers'
listener, and ReasonChip's client (`Multiplexor` + `Api`, and the
`reasonchip run` CLI) against our clients' listener. The broker runs
in-process on port-0 TCP listeners.

ReasonChip 0.0.6 needs Python >= 3.13 (ours is 3.11), so the test builds its
own virtualenv with a Python 3.13 interpreter, `reasonchip==0.0.6` and
`greenlet` (its CLI needs it), and caches it between runs:

- where: `$REASONBROKER_INTEROP_VENV`, else
  `$XDG_CACHE_HOME/reasonbroker/reasonchip-0.0.6-py3.13` (`~/.cache/...`);
- a stamp file is written only after a successful install and import check,
  so a half-built venv is removed and rebuilt on the next run;
- a lock file beside it keeps two test runs from building it at once.

Python 3.13 is looked for as `$REASONBROKER_INTEROP_PYTHON`, then
`python3.13` on PATH, then pyenv (`$PYENV_ROOT` or `~/.pyenv`,
`versions/3.13*/bin/python3.13`). When there is none, or the install fails
(bounded by a timeout), the tests are skipped with the reason; set
`REASONBROKER_INTEROP_REQUIRED=1` to make that a failure instead.

The first run installs (20-60 s, depending on the pip cache); later runs take a
few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import Cancel, Codec, Result, ResultCode, Run
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from tests.rawpeer import RawPeer

# Cold runs install ~70 packages; the default 120 s pytest timeout is for loopback tests.
pytestmark = pytest.mark.timeout(900)

RC_VERSION = "0.0.6"
RC_PACKAGES = (f"reasonchip=={RC_VERSION}", "greenlet")
PIP_TIMEOUT_S = 600  # the whole install; pip's own --timeout bounds each connection
STARTUP_S = 60.0  # a worker importing ReasonChip on a loaded machine
JOB_S = 30.0
SLOW_S = 120  # the slow pipeline's sleep: it is always killed or cancelled first


# -- the cached Python 3.13 virtualenv ------------------------------------------------


class _Unavailable(Exception):
    """ReasonChip cannot be run here; the message says why."""


def _python_version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _find_python313() -> str:
    candidates: list[str] = []
    if explicit := os.environ.get("REASONBROKER_INTEROP_PYTHON"):
        candidates.append(explicit)
    if on_path := shutil.which("python3.13"):
        candidates.append(on_path)
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
    for root in dict.fromkeys(r for r in roots if r):
        candidates += sorted(
            glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python3.13"))
        )
    for exe in dict.fromkeys(candidates):
        # A pyenv shim on PATH may exist and still refuse to run 3.13: ask each one.
        if _python_version(exe) == (3, 13):
            return exe
    raise _Unavailable(
        "no Python 3.13 found (ReasonChip 0.0.6 needs it); tried "
        + (", ".join(candidates) or "python3.13 on PATH and pyenv")
        + "; set REASONBROKER_INTEROP_PYTHON"
    )


def _cache_dir() -> Path:
    if explicit := os.environ.get("REASONBROKER_INTEROP_VENV"):
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "reasonbroker" / f"reasonchip-{RC_VERSION}-py3.13"


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Unavailable(f"{path} is held by another run") from None
                time.sleep(0.5)  # another test run is installing: nothing to await here
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_venv() -> Path:
    """The venv's directory, installed and checked; reused when its stamp matches."""
    venv = _cache_dir()
    stamp = venv / "reasonbroker-interop.stamp"
    wanted = json.dumps({"packages": list(RC_PACKAGES), "python": "3.13"})
    with _locked(venv.with_name(venv.name + ".lock"), PIP_TIMEOUT_S + 60):
        python = venv / "bin" / "python"
        if (
            stamp.is_file()
            and stamp.read_text() == wanted
            and python.exists()  # follows the symlink: the interpreter is still there
            and (venv / "bin" / "reasonchip").is_file()
        ):
            return venv
        # Missing, half-built (no stamp) or stale: start again from nothing.
        shutil.rmtree(venv, ignore_errors=True)
        py313 = _find_python313()
        log = venv.with_name(venv.name + ".install.log")
        steps = [
            [py313, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check",
             "--no-input", "--timeout", "60", "--retries", "2", *RC_PACKAGES],
            [str(python), "-c", "import greenlet, reasonchip.net.client, reasonchip.cli"],
        ]  # fmt: skip
        deadline = time.monotonic() + PIP_TIMEOUT_S
        with open(log, "w") as out:
            for cmd in steps:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                try:
                    rc = subprocess.run(
                        cmd,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=max(1.0, deadline - time.monotonic()),
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = None
                if rc != 0:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    why = "timed out" if rc is None else f"exited {rc}"
                    raise _Unavailable(
                        f"building the ReasonChip venv at {venv} failed: {cmd[:4]} {why}; "
                        f"log {log}:\n" + "\n".join(tail)
                    )
        stamp.write_text(wanted)
        return venv


@pytest.fixture(scope="module")
def rc_venv() -> Path:
    try:
        return _ensure_venv()
    except _Unavailable as exc:
        reason = f"ReasonChip interop not run: {exc}"
        print(reason, file=sys.stderr)
        if os.environ.get("REASONBROKER_INTEROP_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


# -- what the test writes at run time: pipelines, logging config, client script ---------

PIPELINES = {
    # Returns something made from its variables.
    "echo.yml": """\
- return:
    greeting: "hello {{ name }}"
    n: "{{ n }}"
""",
    # An assert that fails: ReasonChip answers PROCESSOR_EXCEPTION with a stack.
    "fail.yml": """\
- assert: "n < 0"
""",
    # Sleeps without blocking the worker's event loop (its own sleep chip
    # calls time.sleep), so the worker still reads the broker while it runs.
    "slow.yml": """\
- code: "__import__('asyncio').ensure_future(__import__('asyncio').sleep(seconds))"
  store_result_as: sleeper
- chip: reasonchip.chipsets.reasonchip.async.wait_for
  params:
    task: "{{ sleeper }}"
- return: "slept"
""",
}

# ReasonChip reads ~/.reasonchip/logging.conf and requires a handler named
# "syslog"; this one writes to stderr, where the test reads the worker's log.
LOGGING_CONF = """\
[loggers]
keys=root

[logger_root]
level=INFO
handlers=syslog

[handlers]
keys=syslog

[handler_syslog]
class=StreamHandler
level=NOTSET
formatter=plain
args=(sys.stderr,)

[formatters]
keys=plain

[formatter_plain]
format=%(levelname)s %(name)s: %(message)s
"""

# Runs jobs concurrently through ReasonChip's own client library and prints
# one JSON list of outcomes: {"ok": true, "result": ...} or the remote error.
CLIENT_SCRIPT = """\
import asyncio, json, sys
from reasonchip.net.client import Api, Multiplexor
from reasonchip.net.client import exceptions as clex
from reasonchip.net.transports import client_to_broker


async def one(api, pipeline, variables):
    try:
        return {"ok": True, "result": await api.run_pipeline(pipeline, variables=variables)}
    except clex.RemoteException as ex:
        return {"ok": False, "rc": str(ex.rc), "error": ex.error,
                "stacktrace": ex.stacktrace, "cookie": str(ex.cookie)}


async def main():
    mux = Multiplexor(client_to_broker(sys.argv[1]))
    await mux.start()
    jobs = json.loads(sys.argv[2])
    results = await asyncio.gather(*(one(Api(mux), p, v) for p, v in jobs))
    print(json.dumps(results), flush=True)
    await mux.stop()


asyncio.run(main())
"""


class _Scene:
    """One test's ReasonChip side: its files, its environment, its processes."""

    def __init__(self, venv: Path, root: Path) -> None:
        self.venv = venv
        self.python = str(venv / "bin" / "python")
        self.cli = str(venv / "bin" / "reasonchip")
        self.collection = root / "collection"
        self.collection.mkdir()
        for name, text in PIPELINES.items():
            (self.collection / name).write_text(text)
        home = root / "home"
        (home / ".reasonchip").mkdir(parents=True)
        (home / ".reasonchip" / "logging.conf").write_text(LOGGING_CONF)
        self.client_script = root / "rc_client.py"
        self.client_script.write_text(CLIENT_SCRIPT)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        self.env.update(HOME=str(home), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
        self.procs: list[_Proc] = []

    async def spawn(self, name: str, *argv: str) -> _Proc:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        p = _Proc(name, proc)
        self.procs.append(p)
        return p

    async def worker(self, broker: Broker, tasks: int) -> _Proc:
        """Start `reasonchip worker` and return once reasonbroker has its REGISTER."""
        before = set(broker.board.workers())
        url = broker.address("worker") + "/"
        w = await self.spawn(
            "reasonchip worker",
            self.cli, "worker", "--broker", url,
            "--collection", str(self.collection), "--tasks", str(tasks),
        )  # fmt: skip
        # A legacy REGISTER has no reply: poll the switchboard, bounded, and
        # fail at once (with the worker's log) if the worker dies instead.
        try:
            async with asyncio.timeout(STARTUP_S):
                while not set(broker.board.workers()) - before:
                    if w.eof:
                        await w.proc.wait()
                        raise AssertionError(f"the worker exited before registering:\n{w.log}")
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"no REGISTER in {STARTUP_S} s:\n{w.log}") from None
        return w

    async def run_client(self, url: str, jobs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Run jobs concurrently through ReasonChip's client library; their outcomes."""
        c = await self.spawn(
            "client", self.python, str(self.client_script), url + "/", json.dumps(jobs)
        )
        return json.loads(await c.output_then_exit_0())  # type: ignore[no-any-return]

    @property
    def logs(self) -> str:
        """Every process's recent output, for assertion messages."""
        return "\n".join(p.log for p in self.procs)

    async def cleanup(self) -> None:
        for p in self.procs:
            await p.kill()


class _Proc:
    """A subprocess whose merged stdout/stderr is read line by line as it comes."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.eof = False
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self.eof = True
        self._changed.set()

    @property
    def log(self) -> str:
        return "\n".join(f"  [{self.name}] {line}" for line in self.lines[-40:])

    async def wait_for_line(self, matches: Callable[[str], bool], within_s: float = JOB_S) -> str:
        seen = 0
        try:
            async with asyncio.timeout(within_s):
                while True:
                    for line in self.lines[seen:]:
                        if matches(line):
                            return line
                    seen = len(self.lines)
                    if self.eof:
                        raise AssertionError(f"{self.name} exited first:\n{self.log}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no such line in {within_s} s:\n{self.log}"
            ) from None

    async def exited(self, within_s: float = JOB_S) -> int:
        try:
            async with asyncio.timeout(within_s):
                await self._reader
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit in {within_s} s:\n{self.log}") from None

    async def output_then_exit_0(self, within_s: float = JOB_S) -> str:
        code = await self.exited(within_s)
        assert code == 0, f"{self.name} exited {code}:\n{self.log}"
        out = [line for line in self.lines if line.startswith(("[", "{"))]
        assert out, f"{self.name} printed no JSON:\n{self.log}"
        return out[-1]

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(JOB_S):
                await self.proc.wait()
                await self._reader


def _config(**limits: int | float) -> Config:
    return Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
        ),
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


@pytest.fixture
async def scene(rc_venv: Path, tmp_path: Path) -> AsyncIterator[_Scene]:
    s = _Scene(rc_venv, tmp_path)
    try:
        yield s
    finally:
        await s.cleanup()


def _running(pipeline: str) -> Callable[[str], bool]:
    """The worker's log line for a job it has started: 'Running engine: [cookie] [name]'."""
    return lambda line: "Running engine:" in line and line.endswith(f"[{pipeline}]")


# -- the tests ------------------------------------------------------------------------


async def test_reasonchip_client_and_worker_run_jobs_through_reasonbroker(scene: _Scene) -> None:
    async with Broker(_config()) as broker:
        await scene.worker(broker, tasks=10)
        client_url = broker.address("client")
        # Ten concurrent jobs, one slot each (see the test below for
        # more jobs than slots).
        jobs: list[tuple[str, Any]] = [("echo", {"name": f"job{i}", "n": i}) for i in range(8)]
        jobs += [("fail", {"n": 3}), ("no_such_pipeline", None)]
        out = await scene.run_client(client_url, jobs)
        for i in range(8):
            want = {"ok": True, "result": {"greeting": f"hello job{i}", "n": i}}
            assert out[i] == want, scene.logs
        fail, missing = out[8], out[9]
        assert (fail["ok"], fail["rc"], fail["error"]) == (False, "PROCESSOR_EXCEPTION", "n < 0")
        assert fail["stacktrace"] and any("fail" in line for line in fail["stacktrace"])
        assert (missing["ok"], missing["rc"]) == (False, "PROCESSOR_EXCEPTION")
        assert broker.board.stats.completed["OK"] == 8
        assert broker.board.stats.completed["PROCESSOR_EXCEPTION"] == 2

        # ReasonChip's CLI, exactly as its users type it.
        run = await scene.spawn(
            "reasonchip run",
            scene.cli, "run", "echo", "--broker", client_url + "/",
            "--set", "name=cli", "--set", "n=7",
        )  # fmt: skip
        assert json.loads(await run.output_then_exit_0()) == {"greeting": "hello cli", "n": "7"}
        assert broker.board.slots(broker.board.workers()[0]) == (10, 0)


async def test_reasonchip_worker_killed_mid_job_then_a_new_worker_serves(scene: _Scene) -> None:
    async with Broker(_config()) as broker:
        first = await scene.worker(broker, tasks=2)
        client_url = broker.address("client")
        slow = await scene.spawn(
            "client",
            scene.python, str(scene.client_script), client_url + "/",
            json.dumps([["slow", {"seconds": SLOW_S}]]),
        )  # fmt: skip
        await first.wait_for_line(_running("slow"))
        first.proc.send_signal(signal.SIGKILL)
        (outcome,) = json.loads(await slow.output_then_exit_0())
        assert (outcome["ok"], outcome["rc"]) == (False, "WORKER_WENT_AWAY"), outcome
        assert await first.exited() == -signal.SIGKILL
        assert broker.board.workers() == [] and broker.board.live_jobs == 0

        # With no worker, ReasonChip's client gets one of its own codes.
        (refused,) = await scene.run_client(client_url, [("echo", {"name": "x", "n": 0})])
        assert (refused["ok"], refused["rc"]) == (False, "NO_CAPACITY")

        await scene.worker(broker, tasks=2)
        out = await scene.run_client(
            client_url, [("echo", {"name": "again", "n": 1}), ("echo", {"name": "more", "n": 2})]
        )
        assert out == [
            {"ok": True, "result": {"greeting": "hello again", "n": 1}},
            {"ok": True, "result": {"greeting": "hello more", "n": 2}},
        ]


async def test_cancel_makes_reasonchip_worker_exit_and_the_job_ends_cancelled(
    scene: _Scene,
) -> None:
    # ReasonChip's client has no cancel call, so a raw JSON client (without
    # HELLO, like ReasonChip's) sends the CANCEL. A long grace: the answer
    # must come from the worker leaving, not from the grace timer.
    async with Broker(_config(cancel_grace_ms=60_000)) as broker:
        worker = await scene.worker(broker, tasks=2)
        client = await RawPeer.connect(broker.address("client"), codec=Codec.JSON)
        cookie = uuid.uuid4().bytes
        client.send(Run(cookie, "slow", json.dumps({"seconds": SLOW_S})))
        await worker.wait_for_line(_running("slow"))
        client.send(Cancel(cookie))
        res = await client.recv_type(Result)
        assert (res.cookie, res.rc) == (cookie, ResultCode.EXCEPTION)
        assert res.error == "CANCELLED: cancelled by client"
        await worker.exited()  # ReasonChip 0.0.6's worker exits on CANCEL
        assert broker.board.workers() == [] and broker.board.live_jobs == 0
        assert broker.board.stats.requeued == 0

        # The broker serves the next worker and the same client connection.
        await scene.worker(broker, tasks=1)
        again = uuid.uuid4().bytes
        client.send(Run(again, "echo", json.dumps({"name": "after", "n": 5})))
        res = await client.recv_type(Result)
        assert (res.cookie, res.rc) == (again, ResultCode.OK)
        assert json.loads(res.result) == {"greeting": "hello after", "n": 5}


async def test_reasonchip_worker_survives_more_jobs_than_its_tasks(scene: _Scene) -> None:
    async with Broker(_config()) as broker:
        worker = await scene.worker(broker, tasks=2)
        jobs: list[tuple[str, Any]] = [("echo", {"name": f"q{i}", "n": i}) for i in range(40)]
        out = await scene.run_client(broker.address("client"), jobs)
        failed = [o for o in out if not o["ok"]]
        assert not failed, f"{len(failed)} of 40 failed, first {failed[0]}:\n{scene.logs}"
        assert not worker.eof, f"the worker exited:\n{worker.log}"
        assert broker.board.stats.completed["OK"] == 40


# Reads each body (hex, one a line) as ReasonChip's SocketPacket and writes it back.
ROUND_TRIP_SCRIPT = """\
import sys
from reasonchip.net.protocol import SocketPacket
for line in sys.stdin.read().split():
    packet = SocketPacket.model_validate_json(bytes.fromhex(line).decode("utf-8"))
    print(packet.model_dump_json().encode("utf-8").hex())
"""


@pytest.mark.parametrize("backend", ["orjson", "stdlib"])
def test_reasonchip_writes_back_our_json_frames_byte_for_byte(
    rc_venv: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our JSON frames, with either backend, are exactly what ReasonChip's own
    # SocketPacket writes for the packets it reads from them.
    from reasonbroker.core import codecs
    from reasonbroker.core.protocol import encode
    from tests.test_json_codec import GOLDEN

    if backend == "stdlib":
        monkeypatch.setattr(codecs, "_orjson", None)
    elif codecs._orjson is None:
        pytest.skip("orjson is not installed")
    bodies = [encode(packet, Codec.JSON)[4:] for packet, _ in GOLDEN]
    assert bodies == [golden for _, golden in GOLDEN]
    out = subprocess.run(
        [str(rc_venv / "bin" / "python"), "-c", ROUND_TRIP_SCRIPT],
        input="\n".join(b.hex() for b in bodies),
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        check=True,
    ).stdout.split()
    assert [bytes.fromhex(h) for h in out] == bodies
