"""The pure core, sans-IO: wire protocol, limits and the switchboard.

Nothing here awaits, reads a socket, logs or reads the clock; it imports only
the standard library, msgpack, mypy_extensions and other core modules.
packets, codecs and framing are the wire protocol (protocol re-exports it);
errors and limits the failures and the frozen limits; actions, state, roles,
dispatch, deadlines and board the switchboard.

This file imports nothing: `reasonbroker._native.select` must decide between
the compiled modules and their source before any of them loads.
"""
