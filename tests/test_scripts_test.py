"""`scripts/test ARGS` gives ARGS to both pytest passes (issue 19, item 10).

Runs the real script in a copy of the repository's layout whose .venv holds
stand-ins for python, ruff, mypy and lint-imports that record how they were called.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = [
    "tests/test_protocol.py",
    "tests/test_json_codec.py",
    "tests/test_switchboard.py",
    "tests/test_properties.py",
    "tests/test_native.py",
    "tests/test_hardening.py",
    "tests/test_dispatch_index.py",
    "tests/test_framing_direct.py",
]
_RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") PURE=${REASONBROKER_PURE:-} $*" >> "$CALLS"
"""


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    for name in ("test", "_bootstrap.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    (tmp_path / "reasonbroker").mkdir()
    (tmp_path / "reasonbroker" / ".native-build.json").write_text("{}", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    for name in [*SANS_IO, "tests/test_cli.py"]:
        (tmp_path / name).write_text("", encoding="utf-8")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "ruff", "mypy", "lint-imports"):
        (bin_dir / tool).write_text(_RECORDER, encoding="utf-8")
        (bin_dir / tool).chmod(0o755)
    stamp = tmp_path / ".venv" / ".reasonbroker-installed"
    stamp.write_text("", encoding="utf-8")
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml: no pip install
    return tmp_path


def _pytest_calls(root: Path, *args: str) -> tuple[list[str], str]:
    calls = root / "calls.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REASONBROKER_", "RB_"))}
    env["CALLS"] = str(calls)
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "test"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if " -m pytest" in line], proc.stdout


def test_options_go_to_both_passes(fake_root: Path) -> None:
    calls, _ = _pytest_calls(fake_root, "-x", "-k", "cancel")
    assert calls == [
        "python PURE= -m pytest -x -k cancel",
        "python PURE=1 -m pytest -q -p no:cacheprovider -x -k cancel " + " ".join(SANS_IO),
    ]


def test_no_args_runs_everything_then_the_sans_io_suites(fake_root: Path) -> None:
    calls, _ = _pytest_calls(fake_root)
    assert calls == [
        "python PURE= -m pytest",
        "python PURE=1 -m pytest -q -p no:cacheprovider " + " ".join(SANS_IO),
    ]


def test_paths_pick_the_second_pass_or_skip_it(fake_root: Path) -> None:
    calls, _ = _pytest_calls(fake_root, "tests/test_protocol.py::test_one", "tests/test_cli.py")
    assert calls == [
        "python PURE= -m pytest tests/test_protocol.py::test_one tests/test_cli.py",
        "python PURE=1 -m pytest -q -p no:cacheprovider tests/test_protocol.py::test_one",
    ]
    calls, out = _pytest_calls(fake_root, "tests/test_cli.py", "-q")
    assert calls[-1] == "python PURE= -m pytest tests/test_cli.py -q"
    assert "no second pass" in out
