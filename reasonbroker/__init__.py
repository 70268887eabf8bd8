"""reasonbroker: a socket switchboard that routes jobs from clients to workers.

Importing the package configures nothing (no logging, no event loop policy);
the CLI does that.
"""

from __future__ import annotations

from . import _native

# First, before anything imports them: compiled hot modules, or their source.
COMPILED: bool = _native.select(__name__)

from ._version import __version__  # noqa: E402
from .config import Config, Limits, load_config  # noqa: E402

__all__ = ["COMPILED", "Config", "Limits", "__version__", "load_config"]
