"""reasonbroker: a socket switchboard that routes jobs from clients to workers.

Importing the package configures nothing (no logging, no event loop policy);
the CLI does that.
"""

from __future__ import annotations

from ._version import __version__
from .config import Config, Limits, load_config

__all__ = ["Config", "Limits", "__version__", "load_config"]
