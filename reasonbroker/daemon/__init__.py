"""The daemon: the I/O around the core.

broker (the one module doing I/O: listeners, outboxes, timers, liveness,
drain), config (TOML, environment and flags into one frozen `Config`),
metrics (the Prometheus collector and endpoint) and log (structlog setup).

This file imports nothing: `reasonbroker._native.select` must decide between
the compiled broker and its source before it loads.
"""
