"""Which build of the hot modules runs: mypyc-compiled, or the Python source.

`scripts/build_native` compiles `NATIVE_MODULES` (dotted paths under the
package: the core's per-job modules and daemon/broker.py) with mypyc into extension
modules beside their sources and records each source's SHA-256 in
`BUILD_STAMP`. Python imports an extension module in preference to a `.py`
file of the same name, so a source edited after the build would silently run
stale code. `select()` guards against that: unless every compiled module was
built from the source now on disk (and REASONBROKER_PURE is unset), it loads
all of them from source, before anything else imports them.

This module is plain Python and imports nothing of the package; the
subpackages `core` and `daemon` import nothing in their `__init__`, so
importing them here loads no compiled module early.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Final

# Dotted paths under the package, in dependency order (each imports only
# those before it, or modules that are never compiled): the core's per-job
# modules and the one daemon module of the hot path.
NATIVE_MODULES: Final = (
    "core.packets",
    "core.codecs",
    "core.framing",
    "core.actions",
    "core.state",
    "core.deadlines",
    "core.dispatch",
    "core.roles",
    "core.retention",
    "core.board",
    "daemon.broker",
)
BUILD_STAMP: Final = ".native-build.json"
_HERE: Final = Path(__file__).resolve().parent


def source_path(name: str, package_dir: Path = _HERE) -> Path:
    """The source file of a dotted name in NATIVE_MODULES."""
    return package_dir.joinpath(*name.split(".")).with_suffix(".py")


def source_digests(package_dir: Path = _HERE) -> dict[str, str]:
    return {
        source_path(name, package_dir).relative_to(package_dir).as_posix(): hashlib.sha256(
            source_path(name, package_dir).read_bytes()
        ).hexdigest()
        for name in NATIVE_MODULES
    }


def _built_modules(package_dir: Path) -> set[str]:
    """Names in NATIVE_MODULES that have an extension module beside their source."""
    found = set()
    for name in NATIVE_MODULES:
        source = source_path(name, package_dir)
        if not source.parent.is_dir():
            continue
        for path in source.parent.iterdir():
            stem, _, suffix = path.name.partition(".")
            if stem == source.stem and suffix.endswith(("so", "pyd")):
                found.add(name)
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
        parent_name, _, attr = qualified.rpartition(".")
        # The subpackage (its __init__ imports nothing compiled) before its module.
        parent = importlib.import_module(parent_name)
        spec = importlib.util.spec_from_file_location(qualified, source_path(name))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        setattr(parent, attr, module)
    return False
