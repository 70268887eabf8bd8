"""A short chaos run (scripts/chaos) in the suite: nothing lost, stuck or delivered twice.

About 2,000 jobs from 4 raw-protocol clients through an in-process broker to 3
worker PROCESSES, with 4 SIGKILLs of workers (each replaced), 3 abrupt client
disconnects mid-flight, cancels, deadlines, detached jobs and 1..3 attempts.
The run happens once per module; each test asserts one group of the
invariants the script checks. The engine lives in scripts/chaos itself,
loaded here as a module.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos"


def load_chaos() -> ModuleType:
    """scripts/chaos (no .py suffix) as an importable module."""
    name = "reasonbroker_chaos_script"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, str(SCRIPT))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> Iterator[Any]:
    chaos = load_chaos()
    settings = chaos.Settings(
        jobs=2000,
        clients=4,
        workers=3,
        capacity=8,
        kills=4,
        disconnects=3,
        window=32,
        seconds=25.0,
        settle_s=15.0,
        seed=20240611,
    )
    result = asyncio.run(chaos.run_chaos(settings))
    print()
    print(result.render())
    yield result


def _check(report: Any, name: str) -> None:
    check = report.checks[name]
    assert check.ok, f"{name}: {check.detail}"


def test_the_chaos_really_happened(report: Any) -> None:
    f = report.figures
    assert not f.get("job_phase_timed_out"), "the job phase hit its time bound"
    assert f["submitted"] == 2000
    assert 3 <= f["kills"] <= 5
    assert f["workers_spawned"] == 3 + f["kills"]
    assert f["disconnects"] == 3 and f["excluded_jobs"] > 0
    assert f["cancels_sent"] > 0 and f["detached"] > 0
    assert f["requeued"] > 0  # killed workers had jobs to hand on
    assert report.codes["OK"] > 1000


def test_every_run_gets_exactly_one_terminal_result(report: Any) -> None:
    for name in (
        "exactly one terminal RESULT per RUN",
        "no RESULT delivered twice (any connection)",
        "detached jobs never answered",
        "results routed to their own job",
        "result codes as planned",
        "no client connection lost",
    ):
        _check(report, name)


def test_nothing_stuck_and_no_slot_leaked(report: Any) -> None:
    for name in ("no slot leaked", "broker idle", "broker accounting balances"):
        _check(report, name)
    _check(report, "no protocol errors")
    assert report.events["internal_error"] == 0


def test_route_tables_are_empty_afterwards(report: Any) -> None:
    _check(report, "route tables empty")


def test_no_finished_job_is_retained(report: Any) -> None:
    _check(report, "no finished job retained")


def test_memory_returns_to_baseline(report: Any) -> None:
    _check(report, "memory returned to baseline")
