# Sourced by scripts/serve and scripts/test: make .venv with the project installed,
# then compile the hot modules with mypyc (scripts/build_native).
# Idempotent and quick when nothing changed: pip runs only when pyproject.toml
# is newer than the last install (or the venv is missing); the compile only
# when a compiled module's source changed. REASONBROKER_PURE=1 skips it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REASONBROKER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "reasonbroker needs Python >= 3.11 (tried: $PY)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.reasonbroker-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,cluster,fasta2a]"
    touch "$STAMP"
fi
if [ -z "${REASONBROKER_PURE:-}" ]; then
    "$VENV/bin/python" "$ROOT/scripts/build_native"
fi
