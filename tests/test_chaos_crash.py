"""A short `scripts/chaos --crash` in the suite: a journaled broker SIGKILLed under load.

A `reasonbroker serve` process with an SQLite journal, 3 resuming SDK clients
and 2 worker processes; the broker is SIGKILLed twice while jobs run and is
restarted on the same journal. The engine is scripts/chaoskit/crash.py; each
test asserts one group of what it checks. The report is printed (lost 0).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def report() -> Iterator[Any]:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    from chaoskit import crash  # type: ignore[import-not-found]  # scripts/, not a package

    settings = crash.CrashSettings(
        jobs=500, clients=3, workers=2, capacity=8, crashes=2, seconds=100, seed=7
    )
    result = asyncio.run(crash.run_crash(settings))
    print("\n" + result.render())
    yield result


def _check(report: Any, prefix: str) -> tuple[bool, str]:
    (found,) = [(ok, detail) for name, ok, detail in report.checks if name.startswith(prefix)]
    return found


def test_the_broker_was_killed_and_restarted(report: Any) -> None:
    assert report.figures["crashes"] == 2
    # Each restart recovered the jobs the journal held (some queued or running).
    assert all(n > 0 for n in report.figures["recovered_per_restart"])


def test_no_accepted_job_is_lost(report: Any) -> None:
    assert report.figures["accepted"] > 0
    assert report.figures["accepted_detached"] > 0
    assert report.figures["lost"] == 0
    ok, detail = _check(report, "every accepted job ended")
    assert ok, detail


def test_no_result_is_delivered_twice(report: Any) -> None:
    ok, detail = _check(report, "no RESULT delivered twice")
    assert ok, detail


def test_results_are_each_jobs_own(report: Any) -> None:
    ok, detail = _check(report, "each result its own")
    assert ok, detail
    ok, detail = _check(report, "every OK job ran")
    assert ok, detail


def test_detached_results_are_read_back_through_the_cli(report: Any) -> None:
    ok, detail = _check(report, "detached jobs ENDED")
    assert ok, detail
    assert report.figures["cli_checked"] > 0


def test_the_broker_stops_cleanly_with_nothing_unended(report: Any) -> None:
    ok, detail = _check(report, "clean stop")
    assert ok, detail
    assert report.ok, report.render()
