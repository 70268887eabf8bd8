"""Which build of the hot modules runs: mypyc-compiled, or the Python source.

`scripts/build_native` compiles `NATIVE_MODULES` with mypyc into extension
modules beside their sources and records each source's SHA-256 in
`BUILD_STAMP`. Python imports an extension module in preference to a `.py`
file of the same name, so a source edited after the build would silently run
stale code. `select()` guards against that: unless every compiled module was
built from the source now on disk (and REASONBROKER_PURE is unset), it loads
all of them from source, before anything else imports them.

This module is plain Python and imports nothing of the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Final

NATIVE_MODULES: Final = ("protocol", "switchboard", "broker")
BUILD_STAMP: Final = ".native-build.json"
_HERE: Final = Path(__file__).resolve().parent


def source_digests(package_dir: Path = _HERE) -> dict[str, str]:
    return {
        f"{name}.py": hashlib.sha256((package_dir / f"{name}.py").read_bytes()).hexdigest()
        for name in NATIVE_MODULES
    }


def _built_modules(package_dir: Path) -> set[str]:
    """Names in NATIVE_MODULES that have an extension module beside their source."""
    found = set()
    for path in package_dir.iterdir():
        stem, _, suffix = path.name.partition(".")
        if stem in NATIVE_MODULES and suffix.endswith(("so", "pyd")):
            found.add(stem)
    return found


def _fresh(package_dir: Path) -> bool:
    try:
        stamp = json.loads((package_dir / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("sources") == source_digests(package_dir)


def select(package: str = __package__ or "reasonbroker") -> bool:
    """Decide once, at package import; returns whether the compiled modules run."""
    built = _built_modules(_HERE)
    if not built:
        return False
    if built == set(NATIVE_MODULES) and not os.environ.get("REASONBROKER_PURE"):
        if _fresh(_HERE):
            return True
        print(
            "reasonbroker: the compiled modules are older than their source; "
            "running the source (scripts/build_native rebuilds them)",
            file=sys.stderr,
        )
    for name in NATIVE_MODULES:  # in dependency order
        qualified = f"{package}.{name}"
        spec = importlib.util.spec_from_file_location(qualified, _HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[package], name, module)
    return False
