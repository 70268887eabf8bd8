"""Logging: structlog, configured once, by the CLI, never on import.

Library modules call `get_logger(conn=..., peer=..., role=...)` and log
snake_case events with the data in fields:
`log.info("connection_opened", conn=3, peer="127.0.0.1:4444", role="client")`.
`configure` decides where that goes: stderr, filtered by level, rendered as
JSON (production) or for a human (a terminal). The client and worker
libraries log through the stdlib `logging` tree instead (`peer.library_logger`,
silent unless the application configures logging); `configure` renders those
records the same way, on the same stream.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from .config import LogFormat

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# The arguments of the configuration in force, so that a repeated call is a no-op.
_configured: tuple[str, LogFormat] | None = None
# The handler configure() put on the "reasonbroker" stdlib logger, replaced on reconfiguring.
_stdlib_handler: logging.Handler | None = None


def configure(level: str, fmt: LogFormat) -> None:
    """Send structlog events of `level` and above to stderr, rendered as `fmt`.

    Calling it again with the same arguments does nothing. With other
    arguments it reconfigures, but loggers already used keep the old settings
    (they are cached on first use, which keeps logging cheap): call it once,
    before anything logs.
    """
    global _configured, _stdlib_handler
    key = (level.lower(), LogFormat(fmt))
    if key == _configured:
        return
    if key[0] not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    stream = sys.stderr
    tty = _isatty(stream)
    resolved = key[1]
    if resolved is LogFormat.AUTO:
        resolved = LogFormat.CONSOLE if tty else LogFormat.JSON
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderers: list[Processor]
    if resolved is LogFormat.JSON:
        # One line per event; a traceback becomes a string field, not extra lines.
        renderers = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=tty)]
    # The libraries' stdlib records ("reasonbroker.*"), rendered as the events below.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                *processors,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *renderers,
            ]
        )
    )
    library = logging.getLogger("reasonbroker")
    if _stdlib_handler is not None:
        library.removeHandler(_stdlib_handler)
    library.addHandler(handler)
    library.setLevel(_LEVELS[key[0]])
    library.propagate = False  # the CLI owns the process: not twice via the root logger
    _stdlib_handler = handler
    processors += renderers
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[key[0]]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    _configured = key


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger carrying `bound` in every event (e.g. conn, peer, role)."""
    logger: FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
