"""reasonbroker: a socket switchboard that routes jobs from clients to workers.

The parts, by who uses them: `reasonbroker.sdk` (the client and worker
libraries a user imports), `reasonbroker.core` (the sans-IO wire protocol and
switchboard), `reasonbroker.daemon` (the broker process around the core) and
`reasonbroker.cli`. docs/architecture.md draws them.

Importing the package configures nothing (no logging, no event loop policy);
the CLI does that.
"""

from __future__ import annotations

from . import _native

# First, before anything imports them: compiled hot modules, or their source.
COMPILED: bool = _native.select(__name__)

from ._version import __version__  # noqa: E402

__all__ = ["COMPILED", "__version__"]
