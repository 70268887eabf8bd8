"""Which build of the hot modules runs (reasonbroker/_native.py): the compiled
one only when it was built from the source on disk, else the source itself."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import reasonbroker
from reasonbroker import _native
from reasonbroker.daemon import broker

PACKAGE = Path(reasonbroker.__file__).resolve().parent
HOT = tuple(importlib.import_module(f"reasonbroker.{name}") for name in _native.NATIVE_MODULES)

REPORT = (
    "import importlib, json, reasonbroker\n"
    "from reasonbroker import _native\n"
    "hot = [importlib.import_module('reasonbroker.' + n) for n in _native.NATIVE_MODULES]\n"
    "print(json.dumps({'compiled': reasonbroker.COMPILED,"
    " 'files': [m.__file__ for m in hot]}))\n"
)


def _run(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    return subprocess.run(
        [sys.executable, "-c", REPORT],
        cwd=root,
        env={**base, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _report(root: Path, **env: str) -> tuple[bool, list[str], str]:
    proc = _run(root, **env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    files = [str(f) for f in report["files"]]
    assert all(f.startswith(str(root)) for f in files), files  # the copy, not this checkout
    return report["compiled"], files, proc.stderr


def test_this_run_uses_the_build_it_was_asked_for() -> None:
    compiled = [not str(m.__file__).endswith(".py") for m in HOT]
    if os.environ.get("REASONBROKER_PURE"):
        assert compiled == [False] * len(HOT)
        assert reasonbroker.COMPILED is False
    elif os.environ.get("RB_TEST_EXPECT_COMPILED"):
        # scripts/test sets this when scripts/build_native succeeded.
        assert compiled == [True] * len(HOT)
        assert reasonbroker.COMPILED is True
        assert broker.COMPILED is True
    else:
        pytest.skip("neither REASONBROKER_PURE nor RB_TEST_EXPECT_COMPILED is set")


def _copy_with_fake_build(tmp_path: Path) -> Path:
    """The package's sources, with stand-ins for every compiled module (never loadable)."""
    root = tmp_path / "site"
    shutil.copytree(
        PACKAGE,
        root / "reasonbroker",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", _native.BUILD_STAMP),
    )
    shutil.copytree(
        PACKAGE.parent / "transports",
        root / "transports",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    for name in _native.NATIVE_MODULES:
        source = _native.source_path(name, root / "reasonbroker")
        source.with_name(source.stem + EXTENSION_SUFFIXES[0]).write_bytes(b"not ELF")
    return root


def test_a_build_older_than_its_source_is_not_run(tmp_path: Path) -> None:
    root = _copy_with_fake_build(tmp_path)
    stamp = {"sources": _native.source_digests(root / "reasonbroker")}
    (root / "reasonbroker" / _native.BUILD_STAMP).write_text(json.dumps(stamp))
    with (root / "reasonbroker" / "core" / "board.py").open("a") as f:
        f.write("# edited after the build\n")
    compiled, files, stderr = _report(root)
    assert compiled is False
    assert all(f.endswith(".py") for f in files)
    assert "older than their source" in stderr


def test_a_build_without_a_stamp_is_not_run(tmp_path: Path) -> None:
    root = _copy_with_fake_build(tmp_path)
    compiled, files, _ = _report(root)
    assert compiled is False
    assert all(f.endswith(".py") for f in files)


def test_pure_env_runs_the_source_even_beside_a_fresh_build(tmp_path: Path) -> None:
    root = _copy_with_fake_build(tmp_path)
    stamp = {"sources": _native.source_digests(root / "reasonbroker")}
    (root / "reasonbroker" / _native.BUILD_STAMP).write_text(json.dumps(stamp))
    compiled, files, stderr = _report(root, REASONBROKER_PURE="1")
    assert compiled is False
    assert all(f.endswith(".py") for f in files)
    assert stderr == ""


def test_a_fresh_stamp_makes_the_compiled_modules_load(tmp_path: Path) -> None:
    # The stand-ins are not loadable, so trying them is a failure: that is
    # the proof that a fresh build is preferred to the source.
    root = _copy_with_fake_build(tmp_path)
    stamp = {"sources": _native.source_digests(root / "reasonbroker")}
    (root / "reasonbroker" / _native.BUILD_STAMP).write_text(json.dumps(stamp))
    proc = _run(root)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert f"{root}/reasonbroker/" in proc.stderr  # a stand-in was tried
