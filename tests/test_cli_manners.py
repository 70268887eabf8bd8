"""What a first-day user of the command line meets (issue 19, items 3-4, 7-11).

Each test runs the installed `reasonbroker` command in a subprocess and checks
its exit status and what it prints; where a broker is needed it runs in the
test's event loop on free loopback ports. Every wait is bounded (WAIT_S).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.cli import format_status
from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S

ROOT = Path(__file__).resolve().parent.parent
# The console script pip installed beside this Python: what a user runs.
REASONBROKER = str(Path(sys.executable).with_name("reasonbroker"))
ADMIN_TOKEN = "admin-s3cret-manners-19"
BAD_URLS = ["foo://x", "tcp://host", "tcp://127.0.0.1:notaport"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`reasonbroker ARGS` to completion: (exit status, stdout, stderr)."""
    proc = subprocess.run(
        [REASONBROKER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env if env is not None else _env(),
        timeout=WAIT_S,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        REASONBROKER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=_env(PYTHONUNBUFFERED="1"),
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        async with asyncio.timeout(WAIT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def arun(*args: str) -> tuple[int, str, str]:
    return await finish(await spawn(*args))


async def until(cond: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not cond():  # noqa: ASYNC110 - another process's doing
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    listeners = (
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS, admin_token=ADMIN_TOKEN),
        ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
    )
    async with Broker(Config(listeners=listeners)) as b:
        yield b


@pytest.fixture
async def served(broker: Broker) -> AsyncIterator[tuple[Broker, Gate]]:
    """A library worker serving echo and gate (capacity 1)."""
    gate = Gate()
    async with Worker(broker.address("worker"), handlers={"echo": echo, "gate": gate}) as w:
        await w.wait_registered(WAIT_S)
        await until(lambda: bool(broker.board.workers()), "the worker to register")
        yield broker, gate
        gate.release.set()


# --------------------------------------------------------------------------- 3: bad URL, Ctrl-C


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize(
    "command", [["submit", "echo"], ["status"], ["worker", "--pipeline", "x"]], ids=lambda c: c[0]
)
def test_bad_broker_url_is_one_line_and_exit_2(command: list[str], url: str) -> None:
    args = [*command, "--broker", url]
    if command[0] == "worker":
        args += ["--", "cat"]
    rc, out, err = run(*args)
    assert rc == 2, err
    line = one_line(err)
    assert line.startswith("reasonbroker: --broker: bad transport URL")
    assert repr(url) in line
    assert out == ""


async def test_ctrl_c_on_a_waiting_submit_cancels_with_one_line(
    served: tuple[Broker, Gate],
) -> None:
    broker, gate = served
    proc = await spawn("submit", "gate", "--broker", broker.address("client"), "--vars", "1")
    async with asyncio.timeout(WAIT_S):
        await gate.entered.wait()
    proc.send_signal(signal.SIGINT)
    rc, out, err = await finish(proc)
    assert rc == 128 + signal.SIGINT
    # No "Future exception was never retrieved", no traceback after it.
    assert one_line(err) == "reasonbroker: SIGINT: job cancelled"
    assert out == ""
    async with asyncio.timeout(WAIT_S):
        await gate.cancelled.wait()


# --------------------------------------------------------------------------- 4: serve --both


async def test_serve_both_url_alone_is_the_only_listener(tmp_path: Path) -> None:
    sock = tmp_path / "rb.sock"
    proc = await spawn(
        "serve", "--both", f"unix://{sock}", "--metrics", "127.0.0.1:0", "--log-format", "json"
    )
    assert proc.stderr is not None
    listening: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                line = await proc.stderr.readline()
                assert line, f"serve exited before serving: {listening}"
                event = json.loads(line)
                if event["event"] == "listening":
                    listening.append(event)
                if event["event"] == "metrics_listening":  # after every listener
                    break
        assert [(e["url"], e["role"]) for e in listening] == [(f"unix://{sock}", "both")]
        # And it serves: a client and a worker on that one socket.
        async with Worker(f"unix://{sock}", handlers={"echo": echo}) as w:
            await w.wait_registered(WAIT_S)
            async with Client(f"unix://{sock}") as client:
                assert await client.run("echo", "one socket", timeout=WAIT_S) == "one socket"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    rc, _, err = await finish(proc)
    assert rc == 0, err


# --------------------------------------------------------------------------- 7: config keys


@pytest.mark.parametrize(
    ("toml", "key", "flag"),
    [
        ('[log]\nlevel = "loud"\n', "log.level", "--log-level"),
        ('metrics_address = "nowhere"\n', "metrics_address", "--metrics"),
        ('[log]\nformat = "xml"\n', "log.format", "--log-format"),
    ],
)
def test_config_file_errors_name_the_toml_key(
    tmp_path: Path, toml: str, key: str, flag: str
) -> None:
    path = tmp_path / "rb.toml"
    path.write_text(toml, encoding="utf-8")
    rc, _, err = run("serve", "--config", str(path))
    assert rc == 2
    line = one_line(err)
    assert line.startswith(f"reasonbroker: config error: {key}: "), line
    assert flag not in line
    assert str(path) in line


def test_flag_errors_still_name_the_flag() -> None:
    rc, _, err = run("serve", "--metrics", "nowhere")
    assert rc == 2
    assert one_line(err).startswith("reasonbroker: config error: --metrics: ")


# --------------------------------------------------------------------------- 8: worker COMMAND


@pytest.mark.parametrize("kind", ["not-on-path", "no-such-file", "not-executable", "directory"])
def test_worker_command_is_checked_at_startup(tmp_path: Path, kind: str) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n", encoding="utf-8")
    program, message = {
        "not-on-path": ("nosuchcommand-19", "command not found: 'nosuchcommand-19' (not on PATH)"),
        "no-such-file": (str(tmp_path / "nope"), "command not found"),
        "not-executable": (str(plain), "command not executable"),
        "directory": (str(tmp_path), "command not executable"),
    }[kind]
    # The broker URL is unreachable: the check comes before any connection.
    rc, out, err = run("worker", "--pipeline", "x", "--broker", "tcp://127.0.0.1:1", "--", program)
    assert rc == 2
    line = one_line(err)
    assert line.startswith("reasonbroker: worker: command not ")
    assert message in line
    assert out == ""


# --------------------------------------------------------------------------- 9: docs and help


def test_help_summaries_are_whole_sentences() -> None:
    rc, out, _ = run("--help")
    assert rc == 0
    commands = out.split("Commands:", 1)[1].strip().splitlines()
    assert [line.split()[0] for line in commands] == ["job", "serve", "status", "submit", "worker"]
    for line in commands:
        assert not line.rstrip().endswith("..."), line  # click's cut
        assert line.rstrip().endswith("."), line


def test_unquoted_string_vars_says_how_to_quote() -> None:
    rc, _, err = run("submit", "echo", "--vars", "hello")
    assert rc == 2
    assert "not valid JSON" in err
    assert """--vars '"hello"'""" in err


async def test_no_vars_sends_null(served: tuple[Broker, Gate]) -> None:
    broker, _ = served
    rc, out, err = await arun("submit", "echo", "--broker", broker.address("client"))
    assert rc == 0, err
    assert out == "null\n"


def test_readme_first_screen_says_how_to_get_the_command() -> None:
    first_screen = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:25]
    text = "\n".join(first_screen)
    assert ".venv/bin/reasonbroker" in text
    assert "source .venv/bin/activate" in text


@pytest.mark.parametrize(
    ("uptime", "shown"),
    [(12.300000001, "12.3 s"), (0.04, "0.0 s"), (303.2, "5 min 3 s"), (7530.9, "2 h 5 min")],
)
def test_status_uptime_has_no_float_noise(uptime: float, shown: str) -> None:
    assert format_status({"uptime_s": uptime}).splitlines()[0].startswith(f"uptime {shown},")


# --------------------------------------------------------------------------- 10: one cause, once


@pytest.mark.parametrize("command", [["submit", "echo"], ["status", "--token", "x"]])
def test_connection_refused_says_its_cause_once(command: list[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        rc, _, err = run(*command, "--broker", url)
    assert rc == 9
    line = one_line(err)
    assert line == f"reasonbroker: cannot connect to {url}: Connection refused"


def test_port_in_use_says_its_cause_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        rc, _, err = run("serve", "--both", url, "--log-format", "json")
    assert rc == 1
    said = [line for line in err.splitlines() if not line.startswith("{")]
    assert said == [f"reasonbroker: cannot listen on {url}: Address already in use"]


# --------------------------------------------------------------------------- 11: status


async def test_status_tells_workers_and_clients_apart(served: tuple[Broker, Gate]) -> None:
    broker, gate = served
    named = await spawn(
        "worker", "--broker", broker.address("worker"), "--name", "w-one",
        "--pipeline", "upper", "--capacity", "2", "--", "cat",
    )  # fmt: skip
    unnamed = await spawn(
        "worker", "--broker", broker.address("worker"), "--pipeline", "lower", "--", "cat"
    )
    try:
        await until(lambda: len(broker.board.workers()) == 3, "both CLI workers to register")
        async with Client(broker.address("client"), name="c1") as client:
            jobs = [await client.submit("gate", i) for i in range(2)]  # one runs, one waits
            await until(lambda: broker.board.queue_depth == 1, "the second job to queue")
            env = _env(REASONBROKER_ADMIN_TOKEN=ADMIN_TOKEN)
            rc, out, err = await asyncio.to_thread(
                run, "status", "--broker", broker.address("client"), env=env
            )
            assert rc == 0, err
            rows = {line.split()[1]: line.split() for line in out.splitlines() if "  " in line}
            # workers: conn name address pipelines capacity busy
            assert rows["w-one"][3:] == ["upper", "2", "0"]
            assert rows["w-one"][2].startswith("127.0.0.1:")
            assert rows[f"{socket.gethostname()}:{unnamed.pid}"][3:] == ["lower", "1", "0"]
            # clients: conn name address in_flight
            assert "in_flight" in out
            assert rows["c1"][3:] == ["2"]
            rc, out, err = await asyncio.to_thread(
                run, "status", "--broker", broker.address("client"), "--json", env=env
            )
            assert rc == 0, err
            uptime = json.loads(out)["uptime_s"]
            assert round(uptime, 3) == uptime
            gate.release.set()
            async with asyncio.timeout(WAIT_S):
                assert [await job for job in jobs] == [0, 1]
    finally:
        for proc in (named, unnamed):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rc, _, err = await finish(proc)
            assert rc == 0, err
