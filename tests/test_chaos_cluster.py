"""A short `scripts/chaos --cluster` in the suite: a cluster node and a nats-server
SIGKILLed under load.

3 nats-servers (replicas 3) and 3 `reasonbroker serve --cluster` processes, 3
resuming SDK clients (each given every node, starting on its own) and 3 worker
processes (one per node); one node is SIGKILLed while its workers run jobs and
restarted, then the job stream's leader among the nats-servers is SIGKILLed and
restarted. The engine is scripts/chaoskit/cluster.py; each test asserts one group
of what it checks. The report is printed (lost 0). Skipped, saying why, without
nats-py or a usable nats-server (the cluster extra).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.natscluster import ServerNotFound, find_server

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def report() -> Iterator[Any]:
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[cluster]'")
    try:
        find_server()
    except ServerNotFound as e:
        print(f"SKIP: {e}", file=sys.stderr)
        pytest.skip(str(e))
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    from chaoskit import cluster  # type: ignore[import-not-found]  # scripts/, not a package

    settings = cluster.ClusterSettings(
        jobs=400, clients=3, workers=3, capacity=8, node_kills=1, nats_kills=1, seconds=60, seed=7
    )
    result = asyncio.run(cluster.run_cluster(settings))
    print("\n" + result.render())
    yield result


def _check(report: Any, prefix: str) -> tuple[bool, str]:
    (found,) = [(ok, detail) for name, ok, detail in report.checks if name.startswith(prefix)]
    return found


def test_a_node_and_a_nats_server_were_killed_and_restarted(report: Any) -> None:
    assert report.figures["node_kills"] == 1
    assert report.figures["nats_kills"] == 1


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


def test_detached_results_are_read_back_on_other_nodes(report: Any) -> None:
    ok, detail = _check(report, "detached jobs ENDED")
    assert ok, detail
    assert report.figures["cli_checked"] > 0


def test_the_stream_drains_and_the_nodes_stop_cleanly(report: Any) -> None:
    ok, detail = _check(report, "the job stream drained")
    assert ok, detail
    ok, detail = _check(report, "clean stops")
    assert ok, detail
    assert report.ok, report.render()
