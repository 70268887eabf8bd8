"""The README's example is real code: run it against a broker on free ports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import structlog

from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## A worker and a client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its example"
    return match.group(1)


async def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _example()
    assert code.rstrip().endswith("asyncio.run(main())")
    assert len(code.strip().splitlines()) <= 25  # the issue asks for a ~20-line example
    cfg = Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
        )
    )
    # The broker's log lines are captured, so stdout is the example's alone.
    with structlog.testing.capture_logs() as logs:
        await _run(code, cfg)
    assert any(e["event"] == "worker_registered" for e in logs)
    out = capsys.readouterr().out.splitlines()
    assert out == ["{'text': 'HELLO'}", "100 results on one connection"]


async def _run(code: str, cfg: Config) -> None:
    async with Broker(cfg) as broker:
        code = code.replace("tcp://127.0.0.1:51500", broker.address("client"))
        code = code.replace("tcp://127.0.0.1:51510", broker.address("worker"))
        namespace: dict[str, Any] = {}
        # Everything but the last line defines main(); we await it on this loop.
        exec(code.rstrip().rsplit("\n", 1)[0], namespace)
        await namespace["main"]()
