"""The broker's limits and listener roles: frozen, validated, pure data.

`Limits` holds every limit the broker enforces, named with its unit, and
checks them when made (`ConfigError` names the bad one); `ListenerRole` says
which peers a listener takes. Loading them from TOML, the environment and
flags is the daemon's (daemon/config.py); the switchboard and the SDK read
them from here. config.example.toml mirrors every field with its default.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields

from .errors import ConfigError

MiB = 1024 * 1024


class ListenerRole(enum.StrEnum):
    CLIENTS = "clients"
    WORKERS = "workers"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit the broker enforces, named with its unit."""

    # PROTOCOL.md section 1; large enough for real payloads, small enough that
    # a hostile length header cannot make us buffer much.
    max_frame_bytes: int = 8 * MiB
    # Jobs waiting for a free slot, across all pipelines. 0 = ReasonChip's
    # behaviour (NO_CAPACITY at once when no slot is free).
    queue_limit: int = 100_000
    # How long a cancelled running job may take to answer before the broker
    # answers the client CANCELLED itself.
    cancel_grace_ms: int = 5_000
    # Attempts per job when a RUN does not say (1 = never re-run after a worker loss).
    default_max_attempts: int = 1
    # Upper bound on a RUN's max_attempts, so a client cannot make a job of
    # death kill workers forever.
    max_attempts_limit: int = 10
    # Upper bound on one worker's total slots, so a bogus REGISTER cannot
    # make dispatch believe in millions of slots.
    max_worker_capacity: int = 65_536
    # Bytes queued for one peer that has stopped reading before it is cut off
    # as a slow consumer; must hold at least one maximal frame.
    outbox_high_water_bytes: int = 32 * MiB
    # On SIGTERM: how long running jobs get to finish before they are answered
    # BROKER_WENT_AWAY.
    drain_timeout_s: float = 30.0
    # Open connections across all listeners; more are accepted and closed at once.
    max_connections: int = 20_000
    # Jobs one client may have accepted and not yet ended; more get NO_CAPACITY.
    max_inflight_per_client: int = 100_000
    # Liveness for peers that said HELLO: one silent for a beat is sent PING,
    # one silent for 3 beats is gone (its jobs handled as on disconnect).
    heartbeat_ms: int = 5_000
    # A slot that a JSON-codec worker without HELLO frees with a RESULT is
    # reused only after this rest: ReasonChip's worker (JSON, no HELLO) drops
    # the finished task from its own table a few loop turns after sending the
    # RESULT, and shuts down if a new RUN arrives first. msgpack workers never
    # rest. 0 reuses slots at once.
    legacy_slot_reuse_ms: int = 50
    # A connection that has not sent one whole packet this long after it
    # opened is closed: it holds a file descriptor and says nothing.
    idle_timeout_ms: int = 30_000
    # On a listener with a token: a connection that has not authenticated
    # (sent HELLO with the right token) this long after it opened is closed,
    # so unauthenticated peers cannot hold file descriptors for idle_timeout_ms.
    auth_timeout_ms: int = 5_000
    # Batch affinity: RUNs that arrive together (one event-loop turn) stay on
    # the worker the last of them went to while its load (busy/capacity) is at
    # most this much above the least-loaded worker's, so a burst reaches a
    # worker as one write, not one per worker. 0 = strictly least-loaded.
    # Slots are never exceeded; at 0.25 a worker of capacity under 4 is
    # balanced exactly as least-loaded (ties aside).
    dispatch_batch_slack: float = 0.25
    # How long an ended job's RESULT is kept for ATTACH / `reasonbroker job`
    # (with a journal every job's, without one detached jobs' only): an hour
    # covers a client that restarts or a batch collected later, and bounds
    # the journal under steady load. Set as [journal] result_ttl_s.
    result_ttl_s: float = 3_600.0
    # ... and at most this many of them (the oldest go first), so a burst of
    # short jobs cannot grow memory and the journal without bound.
    result_max: int = 100_000
    # ... and at most this many bytes of retained payload (result, error,
    # stack trace) in memory, so large results cannot either.
    result_max_bytes: int = 256 * MiB
    # Journal operations recorded but not yet committed above which the broker
    # stops reading from clients until the disk catches up: memory stays
    # bounded when the journal is slower than the clients.
    journal_backlog_max: int = 50_000
    # Peer-named strings the broker keeps and logs (issue 19): a pipeline name
    # (RUN or REGISTER), the pipelines one worker may name in all, a HELLO's
    # name, its features and each feature's length. Over them: BAD_PACKET.
    # Generous for real use; small enough that no peer makes the broker hold
    # (or log) megabytes of names.
    max_pipeline_name_bytes: int = 1_024
    max_pipelines_per_worker: int = 10_000
    max_hello_name_bytes: int = 256
    max_hello_features: int = 64
    max_hello_feature_bytes: int = 64
    # Peer-caused log events (protocol errors, bad packets, auth failures,
    # idle timeouts, ...): at most this many lines per event per second, the
    # rest counted in one "log_suppressed" line. 0 = no limit.
    peer_log_lines_per_s: int = 20
    # Failed authentication, per source address (host), counted over
    # auth_block_s: from the auth_failures_before_delay-th failure on, the
    # UNAUTHORIZED answer is held auth_failure_delay_ms before it is sent; the
    # auth_failures_before_block-th blocks the address: its connections to
    # listeners with a token are closed at once for auth_block_s. A token
    # guesser then gets about 10 guesses a minute.
    auth_failures_before_delay: int = 3
    auth_failure_delay_ms: int = 1_000
    auth_failures_before_block: int = 10
    auth_block_s: float = 60.0
    # A frame once begun (its first bytes in) must be whole within this, or
    # the connection is closed (frame_timeout): no other timeout covers a peer
    # that has spoken and then sends half a frame forever. 8 MiB in 30 s is
    # about 2.2 Mbit/s.
    frame_timeout_ms: int = 30_000
    # Unfinished frames buffered across all connections; the connection whose
    # read goes past it is closed (input_cap_reached). Without it the bound is
    # max_connections x max_frame_bytes. Must hold one maximal frame.
    max_buffered_input_bytes: int = 256 * MiB
    # The bytes of queued and running jobs' variables, for one client and in
    # all: the queue limits count jobs, and 60 queued 8 MiB RUNs are 480 MiB.
    # Over either: NO_CAPACITY, with the budget named. Each must hold one
    # maximal frame.
    max_payload_bytes_per_client: int = 256 * MiB
    max_payload_bytes_total: int = 1024 * MiB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # bool is an int to Python, never a limit; a float count is a mistake.
            wanted = int if f.type == "int" else int | float
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "an integer" if f.type == "int" else "a number"
                raise ConfigError(f.name, f"must be {kind}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"must be finite, got {value!r}")
        may_be_zero = (
            "queue_limit",
            "legacy_slot_reuse_ms",
            "dispatch_batch_slack",
            "peer_log_lines_per_s",
        )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in may_be_zero:
                if value < 0:
                    raise ConfigError(f.name, f"must be >= 0, got {value!r}")
            elif value <= 0:
                raise ConfigError(f.name, f"must be > 0, got {value!r}")
        if self.max_frame_bytes > 0xFFFFFFFF:
            raise ConfigError("max_frame_bytes", "must fit the 4-byte length header")
        if self.outbox_high_water_bytes < self.max_frame_bytes:
            raise ConfigError(
                "outbox_high_water_bytes", "must be >= max_frame_bytes (one frame must fit)"
            )
        if self.max_buffered_input_bytes < self.max_frame_bytes:
            raise ConfigError(
                "max_buffered_input_bytes", "must be >= max_frame_bytes (one frame must fit)"
            )
        if self.max_payload_bytes_per_client < self.max_frame_bytes:
            raise ConfigError(
                "max_payload_bytes_per_client", "must be >= max_frame_bytes (one job must fit)"
            )
        if self.max_payload_bytes_total < self.max_payload_bytes_per_client:
            raise ConfigError("max_payload_bytes_total", "must be >= max_payload_bytes_per_client")
        if self.dispatch_batch_slack > 1:
            raise ConfigError("dispatch_batch_slack", "must be <= 1 (a fraction of capacity)")
        if self.auth_failures_before_delay > self.auth_failures_before_block:
            raise ConfigError("auth_failures_before_delay", "must be <= auth_failures_before_block")
        if self.default_max_attempts > self.max_attempts_limit:
            raise ConfigError("default_max_attempts", "must be <= max_attempts_limit")
