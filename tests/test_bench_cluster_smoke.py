"""A tiny run of `scripts/bench --cluster-baseline --smoke`, so the JetStream baseline cannot
rot: real nats-servers (1, then 3), every cell ran jobs, the report has its shape. Never
asserts timings. Skipped, with the reason, without nats-py or a nats-server >= 2.10.23.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.natscluster import ServerNotFound, find_server

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
CELLS = {"pattern", "pattern -inpr", "publish+ack", "kv create", "fetch+ack"}


def _smoke(mode: str, out: Path) -> tuple[str, dict[str, Any]]:
    """`scripts/bench MODE --smoke`: its stdout and its JSON report (skipped without NATS)."""
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[cluster]'")
    try:
        find_server()
    except ServerNotFound as e:
        pytest.skip(str(e))
    proc = subprocess.run(
        [sys.executable, str(BENCH), mode, "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return proc.stdout, report


@pytest.mark.timeout(240)
def test_cluster_baseline_smoke_run_writes_the_report(tmp_path: Path) -> None:
    stdout, report = _smoke("--cluster-baseline", tmp_path / "cluster.json")
    assert "jobs/s" in stdout
    assert report["meta"]["mode"] == "cluster-baseline"
    rows = report["rows"]
    assert {r["topology"] for r in rows} == {"1 server, R1", "3 servers, R3"}
    for topology in ("1 server, R1", "3 servers, R3"):
        assert {r["cell"] for r in rows if r["topology"] == topology} == CELLS
    for r in rows:
        assert r["jobs"] > 0 and r["jobs_per_s"] > 0, r
        assert r.get("errors", 0) == 0, r
        assert r["server_cpu_us_per_job"] is not None, r


@pytest.mark.timeout(240)
def test_cluster_bench_smoke_run_puts_nodes_beside_the_pattern(tmp_path: Path) -> None:
    stdout, report = _smoke("--cluster", tmp_path / "nodes.json")
    assert "/pattern" in stdout
    assert report["meta"]["mode"] == "cluster"
    rows = report["rows"]
    assert {r["cell"] for r in rows} == {"jetstream pattern", "rb 1 node", "rb 2 nodes"}
    for r in rows:
        assert r.get("error") is None and r.get("errors", 0) == 0, r
        assert r["jobs_per_s"] > 0, r  # jobs crossed nodes within the window
