"""`reasonbroker submit` and `reasonbroker worker` as real processes against a real broker.

The broker runs in the test's event loop on free loopback ports; the CLI runs
in subprocesses (`python -m reasonbroker ...`), so each has its own loop and
its own signal handlers. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reasonbroker.cli import main
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk import cmdworker
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import Cancelled, ProcessorException
from reasonbroker.sdk.worker import Handler, Worker, progress
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    listeners = (
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
    )
    async with Broker(Config(listeners=listeners, limits=Limits(cancel_grace_ms=1000))) as b:
        yield b


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "reasonbroker",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=_env(),
    )


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        async with asyncio.timeout(WAIT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI to completion: (exit status, stdout, stderr)."""
    return await _finish(await _spawn(*args))


async def _wait_for(condition: Any, what: str) -> None:
    """Poll `condition()` until true; fail after WAIT_S."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():  # noqa: ASYNC110 - an outside process's state
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- submit


async def chatty(variables: Any) -> Any:
    await progress(1)
    await progress({"step": "two"})
    return "done"


async def boom(variables: Any) -> Any:
    raise ValueError(f"boom {variables}")


@pytest.fixture
async def served(broker: Broker) -> AsyncIterator[tuple[str, Gate]]:
    """A library worker serving echo, chatty, boom and gate; yields (client URL, gate)."""
    gate = Gate()
    handlers: dict[str, Handler] = {"echo": echo, "chatty": chatty, "boom": boom, "gate": gate}
    async with Worker(broker.address("worker"), handlers=handlers, capacity=4) as w:
        async with asyncio.timeout(WAIT_S):
            await w.registered.wait()
        await _wait_for(lambda: broker.board.workers(), "the worker to register")
        yield broker.address("client"), gate
        gate.release.set()


async def test_submit_prints_the_result_as_json(served: tuple[str, Gate], tmp_path: Path) -> None:
    url, _ = served
    rc, out, err = await cli("submit", "echo", "--broker", url, "--vars", '{"text": "hi"}')
    assert rc == 0, err
    assert json.loads(out) == {"text": "hi"}

    path = tmp_path / "vars.json"
    path.write_text('["from", "a", "file"]', encoding="utf-8")
    rc, out, err = await cli("submit", "echo", "--broker", url, "--vars", f"@{path}", "--json")
    assert rc == 0, err
    answer = json.loads(out)
    assert answer["rc"] == "OK"
    assert answer["result"] == ["from", "a", "file"]
    assert answer["error"] is None


async def test_submit_prints_progress_to_stderr(served: tuple[str, Gate]) -> None:
    url, _ = served
    rc, out, err = await cli("submit", "chatty", "--broker", url)
    assert rc == 0, err
    assert out == '"done"\n'
    assert err.splitlines() == ["1", '{"step": "two"}']


async def test_submit_processor_exception_exits_3(served: tuple[str, Gate]) -> None:
    url, _ = served
    rc, out, err = await cli("submit", "boom", "--broker", url, "--vars", "7")
    assert rc == 3
    assert out == ""
    assert "PROCESSOR_EXCEPTION: ValueError: boom 7" in err

    rc, out, _ = await cli("submit", "boom", "--broker", url, "--vars", "7", "--json")
    assert rc == 3
    answer = json.loads(out)
    assert answer["rc"] == "PROCESSOR_EXCEPTION"
    assert answer["result"] is None
    assert answer["error"] == "ValueError: boom 7"


async def test_submit_timeout_exits_4(served: tuple[str, Gate]) -> None:
    url, gate = served
    rc, _, err = await cli("submit", "gate", "--broker", url, "--timeout", "0.2")
    assert rc == 4, err
    assert "TIMEOUT" in err
    async with asyncio.timeout(WAIT_S):
        await gate.cancelled.wait()


async def test_submit_no_worker_exits_6(served: tuple[str, Gate]) -> None:
    url, _ = served
    rc, _, err = await cli("submit", "nobody-serves-this", "--broker", url)
    assert rc == 6
    assert "NO_CAPACITY" in err


async def test_submit_unreachable_broker_exits_9(tmp_path: Path) -> None:
    rc, _, err = await cli("submit", "echo", "--broker", f"unix://{tmp_path / 'none.sock'}")
    assert rc == 9
    assert "cannot connect" in err


async def test_submit_detach_returns_at_once(served: tuple[str, Gate]) -> None:
    url, gate = served
    # The job holds in the gate until released: exiting 0 means submit did not wait.
    rc, out, err = await cli("submit", "gate", "--broker", url, "--detach", "--vars", "1")
    assert rc == 0, err
    [line] = out.splitlines()  # exactly one line: the cookie
    assert out == line + "\n"
    cookie = uuid.UUID(line)
    async with asyncio.timeout(WAIT_S):
        await gate.entered.wait()  # the job reached the worker after the client left
    assert not gate.cancelled.is_set()
    async with Client(url) as client:
        assert (await client.job(cookie)).pipeline == "gate"


async def test_submit_detach_refused_exits_with_the_refusal(served: tuple[str, Gate]) -> None:
    # Issue 19 item 1: a refused detached job is not a success.
    url, _ = served
    rc, out, err = await cli("submit", "nobody-serves-this", "--broker", url, "--detach")
    assert rc == 6
    assert out == ""
    assert err.startswith("reasonbroker: NO_CAPACITY: ")
    assert len(err.splitlines()) == 1


async def test_submit_tries_each_broker_of_a_list(served: tuple[str, Gate], tmp_path: Path) -> None:
    url, _ = served
    urls = f"unix://{tmp_path / 'none.sock'},{url}"
    rc, out, err = await cli("submit", "echo", "--broker", urls, "--vars", '"x"')
    assert rc == 0, err
    assert out == '"x"\n'


# --------------------------------------------------------------------------- job


async def test_job_prints_the_state_then_waits_for_the_result(
    broker: Broker, served: tuple[str, Gate]
) -> None:
    url, gate = served
    rc, out, err = await cli("submit", "gate", "--broker", url, "--detach", "--vars", "1")
    assert rc == 0, err
    cookie = out.strip()
    async with asyncio.timeout(WAIT_S):
        await gate.entered.wait()
    rc, out, err = await cli("job", cookie, "--broker", url)
    assert rc == 0, err
    assert json.loads(out) == {
        "cookie": cookie,
        "state": "running",
        "pipeline": "gate",
        "attempts": 1,
        "rc": None,
        "error": None,
    }
    waiting = await _spawn("job", cookie, "--broker", url, "--wait")
    try:
        await _wait_for(lambda: broker.board.stats.attached == 1, "job --wait to attach")
        gate.release.set()
        rc, out, err = await _finish(waiting)
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()
    assert rc == 0, err
    assert out == "1\n"
    rc, out, err = await cli("job", cookie, "--broker", url)
    assert rc == 0, err
    assert json.loads(out)["state"] == "ended"
    assert json.loads(out)["rc"] == "OK"
    # The ended job's retained result, at once, in submit's --json form.
    rc, out, err = await cli("job", cookie, "--broker", url, "--wait", "--json")
    assert rc == 0, err
    assert json.loads(out) == {"rc": "OK", "result": 1, "error": None, "cookie": cookie}


async def test_job_wait_exits_with_the_jobs_status(served: tuple[str, Gate]) -> None:
    url, _ = served
    async with Client(url) as client:
        handle = await client.submit("boom", 5, detach=True)
    rc, out, err = await cli("job", str(handle.cookie), "--broker", url, "--wait")
    assert rc == 3
    assert out == ""
    assert "PROCESSOR_EXCEPTION: ValueError: boom 5" in err


async def test_job_unknown_cookie_exits_12(served: tuple[str, Gate]) -> None:
    url, _ = served
    cookie = str(uuid.uuid4())
    for extra in ((), ("--wait",)):
        rc, out, err = await cli("job", cookie, "--broker", url, *extra)
        assert rc == 12
        assert out == ""
        assert err == (
            f"reasonbroker: no job with cookie {cookie} (unknown, or its result has expired)\n"
        )
    rc, _, err = await cli("job", "not-a-cookie", "--broker", url)
    assert rc == 2
    assert err == "reasonbroker: job: not a job cookie (a UUID): 'not-a-cookie'\n"


async def test_submit_interrupted_cancels_the_job(served: tuple[str, Gate]) -> None:
    url, gate = served
    proc = await _spawn("submit", "gate", "--broker", url)
    try:
        async with asyncio.timeout(WAIT_S):
            await gate.entered.wait()
        proc.send_signal(signal.SIGINT)
        rc, _, err = await _finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 128 + signal.SIGINT, err
    async with asyncio.timeout(WAIT_S):
        await gate.cancelled.wait()


@pytest.mark.parametrize(
    ("vars_arg", "message"),
    [("[nope", "not valid JSON"), ("@MISSING", "cannot read"), ("@BAD", "not valid JSON")],
)
def test_submit_bad_vars_exits_2(tmp_path: Path, vars_arg: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    arg = vars_arg.replace("MISSING", str(tmp_path / "missing.json")).replace("BAD", str(bad))
    # Fails while parsing the arguments: no event loop, no connection, no logging set up.
    result = CliRunner().invoke(main, ["submit", "echo", "--vars", arg], env=_env())
    assert result.exit_code == 2
    assert "--vars" in result.stderr
    assert message in result.stderr


# --------------------------------------------------------------------------- worker


class CliWorker:
    """`reasonbroker worker` in a subprocess; stderr read line by line (JSON logs)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def wait_event(self, name: str) -> dict[str, Any]:
        assert self.proc.stderr is not None
        async with asyncio.timeout(WAIT_S):
            while True:
                line = await self.proc.stderr.readline()
                if not line:
                    pytest.fail(f"worker ended before logging {name}: {self.events}")
                if line.startswith(b"{"):
                    event: dict[str, Any] = json.loads(line)
                    self.events.append(event)
                    if event["event"] == name:
                        return event


@pytest.fixture
async def cli_worker(broker: Broker) -> AsyncIterator[Any]:
    started: list[CliWorker] = []

    async def start(
        *command: str, pipelines: tuple[str, ...] = ("upper",), urls: str | None = None
    ) -> CliWorker:
        url = broker.address("worker") if urls is None else urls
        args = ["worker", "--broker", url, "--capacity", "2"]
        args += ["--log-format", "json"]
        for name in pipelines:
            args += ["--pipeline", name]
        w = CliWorker(await _spawn(*args, "--", *command))
        started.append(w)
        await w.wait_event("worker_registered")
        await _wait_for(lambda: broker.board.workers(), "the worker to register")
        return w

    yield start
    for w in started:
        if w.proc.returncode is None:
            w.proc.kill()
            await w.proc.wait()


async def test_worker_runs_the_command_per_job(broker: Broker, cli_worker: Any) -> None:
    await cli_worker(PY, "-c", "import sys; print(sys.stdin.read().upper())")
    async with Client(broker.address("client")) as client:
        assert await client.run("upper", "hello", timeout=WAIT_S) == "HELLO"
        # Not a str: the command reads JSON text.
        assert await client.run("upper", {"a": [1]}, timeout=WAIT_S) == '{"A": [1]}'
        jobs = [await client.submit("upper", f"job {i}") for i in range(6)]
        assert await asyncio.gather(*jobs) == [f"JOB {i}" for i in range(6)]


async def test_worker_given_several_urls_serves_through_the_one_that_answers(
    broker: Broker, cli_worker: Any, tmp_path: Path
) -> None:
    # A cluster's nodes, the first of them down: the worker tries them in turn.
    nobody = f"unix://{tmp_path / 'nobody.sock'}"
    w = await cli_worker(
        PY,
        "-c",
        "import sys; print(sys.stdin.read()[::-1])",
        urls=f"{nobody},{broker.address('worker')}",
    )
    assert any(e["event"] == "worker_registered" for e in w.events)
    async with Client(broker.address("client")) as client:
        assert await client.run("upper", "abc", timeout=WAIT_S) == "cba"


def test_worker_bad_url_in_the_list_exits_2() -> None:
    result = CliRunner().invoke(
        main,
        ["worker", "--pipeline", "x", "--broker", "tcp://127.0.0.1:51510,nope://x", "--", PY],
        env=_env(),
    )
    assert result.exit_code == 2
    assert "--broker" in result.stderr
    assert "nope://x" in result.stderr


async def test_worker_passes_pipeline_and_cookie(broker: Broker, cli_worker: Any) -> None:
    script = (
        "import os; print(os.environ['REASONBROKER_PIPELINE'], os.environ['REASONBROKER_COOKIE'])"
    )
    await cli_worker(PY, "-c", script, pipelines=("one", "two"))
    async with Client(broker.address("client")) as client:
        for name in ("one", "two"):
            pipeline, cookie = (await client.run(name, None, timeout=WAIT_S)).split()
            assert pipeline == name
            assert len(cookie) == 36  # a UUID


async def test_worker_nonzero_exit_is_processor_exception(broker: Broker, cli_worker: Any) -> None:
    await cli_worker(PY, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)")
    async with Client(broker.address("client")) as client:
        with pytest.raises(ProcessorException) as info:
            await client.run("upper", "x", timeout=WAIT_S)
    assert info.value.error is not None
    assert "exit status 3" in info.value.error
    assert "boom" in info.value.error


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for a reaper that is not us counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_cancel_kills_the_process_group(
    broker: Broker, cli_worker: Any, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    # The shell and a background child in its process group; both must die.
    script = f'sleep 30 & echo "$$ $!" > {pids}.tmp; mv {pids}.tmp {pids}; wait'
    await cli_worker("sh", "-c", script)
    async with Client(broker.address("client")) as client:
        handle = await client.submit("upper", None, timeout=WAIT_S * 3)
        await _wait_for(pids.exists, "the command to start")
        shell, child = (int(pid) for pid in pids.read_text().split())
        assert not _gone(shell) and not _gone(child)
        await handle.cancel()
        with pytest.raises(Cancelled):
            async with asyncio.timeout(WAIT_S):
                await handle
    await _wait_for(lambda: _gone(shell) and _gone(child), "the process group to die")
    with pytest.raises(ProcessLookupError):
        os.kill(shell, 0)  # reaped by the worker


async def test_sigterm_lets_running_jobs_finish_then_exits_0(
    broker: Broker, cli_worker: Any, tmp_path: Path
) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    script = (
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "deadline = time.monotonic() + 30\n"
        f"while not pathlib.Path({str(release)!r}).exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print('finished')\n"
    )
    w = await cli_worker(PY, "-c", script)
    async with Client(broker.address("client")) as client:
        handle = await client.submit("upper", None, timeout=WAIT_S * 3)
        await _wait_for(started.exists, "the command to start")
        w.proc.send_signal(signal.SIGTERM)
        await w.wait_event("stop_requested")
        release.touch()
        async with asyncio.timeout(WAIT_S):
            assert await handle == "finished"
    async with asyncio.timeout(WAIT_S):
        assert await w.proc.wait() == 0


# --------------------------------------------------------------------------- cmdworker


@pytest.mark.parametrize(
    ("variables", "stdin"),
    [("text ü", "text ü".encode()), (b"\x00raw", b"\x00raw"), ({"a": 1}, b'{"a": 1}')],
)
def test_encode_stdin(variables: Any, stdin: bytes) -> None:
    assert cmdworker.encode_stdin(variables) == stdin


def test_decode_stdout_strips_one_newline() -> None:
    assert cmdworker.decode_stdout(b"a\n\n") == "a\n"
    assert cmdworker.decode_stdout(b"a\r\n") == "a"
    assert cmdworker.decode_stdout(b"\xff") == "\ufffd"


async def test_command_timeout_kills_and_raises() -> None:
    handler = cmdworker.CommandHandler(["sleep", "30"], "p", timeout=0.1, kill_grace=0.5)
    with pytest.raises(cmdworker.CommandTimeout):
        async with asyncio.timeout(WAIT_S):
            await handler(None)
