"""The CLI: version, exit statuses, error messages, and `serve`'s lifecycle against a fake broker.

The real broker is never started here: `serve` imports `reasonbroker.daemon.broker`
lazily, and these tests put a fake module in its place. The end-to-end test of
`serve` with real signals to a real process lives elsewhere.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import types
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result

import reasonbroker
from reasonbroker.cli import main
from reasonbroker.core.errors import ConfigError
from reasonbroker.daemon import log
from reasonbroker.daemon.config import Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No REASONBROKER_* from the outer shell; structlog back to its defaults afterwards."""
    for name in list(os.environ):
        if name.startswith("REASONBROKER_"):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()
    log._configured = None


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


# --------------------------------------------------------------------------- version, errors


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    build = " (compiled)" if reasonbroker.COMPILED else ""
    assert result.stdout == f"reasonbroker {reasonbroker.__version__}{build}\n"
    assert reasonbroker.__version__ == "0.1.0"


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reasonbroker", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # The child's build may differ from ours: clean_environment drops REASONBROKER_PURE.
    assert done.stdout in ("reasonbroker 0.1.0\n", "reasonbroker 0.1.0 (compiled)\n")


def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[limits]\nqueue_limit = "ten"\n', encoding="utf-8")
    result = invoke("serve", "--config", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith("reasonbroker: config error: limits.queue_limit: ")
    assert "'ten'" in result.stderr


def test_config_file_from_environment_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[listeners]]\nurl = 'tcp://127.0.0.1:1'\nrole = 'client'\n", encoding="utf-8")
    result = invoke("serve", env={"REASONBROKER_CONFIG": str(path)})
    assert result.exit_code == 2
    assert "reasonbroker: config error: listeners[0].role: " in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = invoke("serve", "--config", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"reasonbroker: config error: {path}: cannot read")


def test_unknown_environment_variable_exits_2() -> None:
    result = invoke("serve", env={"REASONBROKER_QUEUE_LIMT": "10"})
    assert result.exit_code == 2
    assert result.stderr == (
        "reasonbroker: config error: REASONBROKER_QUEUE_LIMT: unknown environment variable\n"
    )


def test_bad_environment_value_exits_2() -> None:
    result = invoke("serve", env={"REASONBROKER_QUEUE_LIMIT": "many"})
    assert result.exit_code == 2
    assert "reasonbroker: config error: REASONBROKER_QUEUE_LIMIT: " in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flag_exits_2(args: list[str], named: str) -> None:
    result = invoke("serve", *args)
    assert result.exit_code == 2
    assert named in result.stderr


def test_bad_listener_flag_exits_2_naming_the_flag() -> None:
    result = invoke("serve", "--client", "tcp://127.0.0.1:0", "--worker", "127.0.0.1:51510")
    assert result.exit_code == 2
    assert result.stderr.startswith("reasonbroker: config error: --worker: ")


# --------------------------------------------------------------- serve, with a fake broker


class FakeBroker:
    """The Broker API `serve` codes against; it raises its own signals to drive the CLI."""

    instances: list[FakeBroker] = []
    enter_error: BaseException | None = None

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shutdowns: list[bool] = []
        self.closed = False
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()
        FakeBroker.instances.append(self)

    async def __aenter__(self) -> FakeBroker:
        if FakeBroker.enter_error is not None:
            raise FakeBroker.enter_error
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    @property
    def addresses(self) -> list[tuple[str, str]]:
        return [(lc.role.value, lc.url.replace(":0", ":4321")) for lc in self.config.listeners]

    async def serve(self, until: Awaitable[object] | None = None) -> None:
        # Without the CLI's handlers a SIGTERM would end pytest itself: check first.
        for sig in (signal.SIGTERM, signal.SIGINT):
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler)
        # Bounded waits: a missing handler fails the test instead of hanging it.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(self.requested.wait(), 10)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(self.forced.wait(), 10)

    def shutdown(self, force: bool = False) -> None:
        self.shutdowns.append(force)
        (self.forced if force else self.requested).set()


@pytest.fixture
def fake_broker(monkeypatch: pytest.MonkeyPatch) -> type[FakeBroker]:
    module = types.ModuleType("reasonbroker.daemon.broker")
    module.Broker = FakeBroker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reasonbroker.daemon.broker", module)
    monkeypatch.setattr(FakeBroker, "instances", [])
    monkeypatch.setattr(FakeBroker, "enter_error", None)
    return FakeBroker


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("uvloop", [True, False])
def test_serve_drains_on_first_signal_and_forces_on_second(
    fake_broker: type[FakeBroker], uvloop: bool
) -> None:
    args = ["serve", "--log-format", "json", "--client", "tcp://127.0.0.1:0"]
    result = invoke(*args, *([] if uvloop else ["--no-uvloop"]))
    assert result.exit_code == 0, result.stderr
    (broker,) = fake_broker.instances
    assert broker.shutdowns == [False, True]
    assert broker.closed
    assert broker.config.listeners[0].url == "tcp://127.0.0.1:0"
    logged = events(result.stderr)
    assert [e["event"] for e in logged] == [
        "starting",
        "shutdown_requested",
        "shutdown_forced",
        "stopped",
    ]
    assert logged[0]["loop"] == ("uvloop" if uvloop else "asyncio")
    assert logged[1]["signal"] == "SIGTERM"
    assert logged[2]["signal"] == "SIGINT"
    assert all(e["level"] in ("info", "warning") and "timestamp" in e for e in logged)
    # The handlers are gone again: SIGINT is Python's own once more.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_serve_log_level_filters(fake_broker: type[FakeBroker]) -> None:
    result = invoke("serve", "--log-format", "json", "--log-level", "warning", "--no-uvloop")
    assert result.exit_code == 0, result.stderr
    assert [e["event"] for e in events(result.stderr)] == ["shutdown_forced"]


def test_bind_failure_exits_1(fake_broker: type[FakeBroker]) -> None:
    fake_broker.enter_error = OSError(errno.EADDRINUSE, "Address already in use")
    result = invoke("serve", "--log-format", "json", "--no-uvloop")
    assert result.exit_code == 1
    message = "reasonbroker: cannot listen: Address already in use"
    assert message in result.stderr
    assert "listen_failed" in [e["event"] for e in events(result.stderr)]


def test_config_error_from_the_broker_exits_2(fake_broker: type[FakeBroker]) -> None:
    fake_broker.enter_error = ConfigError("listeners[0].url", "unsupported scheme 'udp'")
    result = invoke("serve", "--log-format", "json", "--no-uvloop")
    assert result.exit_code == 2
    assert "reasonbroker: config error: listeners[0].url: unsupported scheme 'udp'" in result.stderr
