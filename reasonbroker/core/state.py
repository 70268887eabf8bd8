"""The switchboard's shared state records: connections, jobs, counters.

`_Conn` is one peer as the switchboard sees it (role, codec, a client's live
jobs, a worker's slots and running jobs), `_Job` one accepted RUN through its
attempts; `Stats` and `Latency` are what the broker exports. The modules of
the switchboard (board, roles, dispatch, deadlines) all work on these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .limits import ListenerRole
from .packets import Codec, Packet, Role, Run


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3


class _Conn:
    __slots__ = (
        "admin_token",
        "busy",
        "capacity",
        "closing",
        "codec",
        "done",
        "draining",
        "failed",
        "features",
        "hello",
        "id",
        "jobs",
        "last_used",
        "listener",
        "name",
        "payload_bytes",
        "pipelines",
        "resting",
        "role",
        "running",
        "token",
    )

    def __init__(
        self,
        conn_id: int,
        listener: ListenerRole,
        token: bytes | None = None,
        admin_token: bytes | None = None,
    ) -> None:
        self.id = conn_id
        self.listener = listener
        # The token this peer's first packet (a HELLO) must carry; None = no
        # authentication on its listener. Cleared once it has authenticated.
        self.token = token
        # The token a HELLO with role admin must carry; None = no admin on
        # this listener. Cleared once the first packet is handled.
        self.admin_token = admin_token
        self.role: Role | None = None
        self.hello = False
        self.features: frozenset[str] = frozenset()
        self.name: str | None = None
        self.codec = Codec.MSGPACK
        self.closing = False
        # client side: the client's live cookies
        self.jobs: dict[bytes, _Job] = {}
        # The payload bytes of its live jobs (Limits.max_payload_bytes_per_client).
        self.payload_bytes = 0
        # worker side
        self.capacity = 0
        self.busy = 0
        self.pipelines: set[str] | None = None
        self.running: dict[bytes, _Job] = {}
        self.last_used = 0
        # RESULTs this worker sent: OK, and any other code (the dashboard's counts).
        self.done = 0
        self.failed = 0
        # Said DRAIN (or returned a RUN): sent no more RUNs, its jobs run on.
        self.draining = False
        # Slots a legacy worker freed with a RESULT but may not have let go of
        # yet (see Limits.legacy_slot_reuse_ms); not usable until they rest.
        self.resting = 0

    def serves(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline in self.pipelines


class _Job:
    __slots__ = (
        "abandoned",
        "accepted_at",
        "attached",
        "attempts",
        "cancel_requested",
        "client",
        "cookie",
        "crashes",
        "deadline",
        "deadlines",
        "max_attempts",
        "owed",
        "payer",
        "payload_bytes",
        "run",
        "seq",
        "state",
        "wcookie",
        "worker",
    )

    def __init__(self, seq: int, client: _Conn | None, run: Run, max_attempts: int) -> None:
        self.seq = seq
        # The connection that sent the RUN; None once it left, and for a job
        # recovered from the journal (it has clients only once they ATTACH).
        self.client: _Conn | None = client
        self.cookie = run.cookie
        self.run = run
        self.max_attempts = max_attempts
        self.attempts = 0
        self.state = _State.QUEUED
        self.worker: _Conn | None = None
        self.wcookie: bytes | None = None
        # The client is still owed its one terminal RESULT (not detached,
        # connected, not yet answered).
        self.owed = client is not None and not run.detach
        # Other connections that ATTACHed (PROTOCOL.md section 7): each is
        # owed one terminal RESULT too. None until the first one.
        self.attached: list[_Conn] | None = None
        # Broker stops (crashes) that caught this job running (journal only).
        self.crashes = 0
        # Over for the broker (timed out, cancel grace passed, client gone):
        # never re-run; if running it only holds its slot until the worker
        # answers or leaves.
        self.abandoned = False
        self.cancel_requested = False
        self.deadline: float | None = None
        self.accepted_at = 0.0  # set by _run: latency runs from acceptance to the terminal RESULT
        # Entries in the switchboard's deadline heap that name this job.
        self.deadlines = 0
        # The bytes of its variables charged to the payload budgets, and the
        # client they are charged to (kept after the client has gone);
        # released once, when the job ends (Deadlines.set_done).
        self.payload_bytes = 0
        self.payer: _Conn | None = None


class _Ends:
    """Jobs of one pipeline that ended: OK, and with any other code (the dashboard's)."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0


@dataclass(slots=True)
class Stats:
    """Counters the broker exposes; tests and chaos runs check them."""

    accepted: int = 0
    # By result code. Plain dicts, not Counters: Counter defines __delitem__
    # in Python, which routes every `counter[key] += 1` through a slow slot,
    # and a job's completion counts one.
    rejected: dict[str, int] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)
    dispatched: int = 0
    requeued: int = 0
    cancels: int = 0
    results_dropped: int = 0  # late or duplicate RESULTs from workers
    abandoned_results: int = 0  # worker answers for jobs already ended (timeout, cancel)
    dropped: int = 0  # non-detached jobs ended because their client left
    bad_packets: int = 0
    attached: int = 0  # ATTACHes to a live job
    collected: int = 0  # ATTACHes answered with a retained RESULT
    recovered: int = 0  # jobs brought back from the journal at start
    reruns: int = 0  # of those, ones that were running when the broker stopped


# Job latency bucket bounds in seconds: from a millisecond echo to a ten-minute
# reasoning job; past the last one a job lands in the +Inf bucket only.
LATENCY_BOUNDS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


@dataclass(slots=True)
class Latency:
    """A fixed-bucket histogram of job latency, acceptance to terminal RESULT.

    `counts[i]` holds the observations in (bounds[i-1], bounds[i]]; the last
    entry, one past the bounds, those above every bound (Prometheus' +Inf).
    Not cumulative: the exporter sums them at scrape time.
    """

    bounds: tuple[float, ...] = LATENCY_BOUNDS_S
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("bounds must be strictly increasing")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        # The first bound >= seconds (bisect_left: a value equal to a bound is
        # in that bound's bucket, le), found from the low end: most jobs land
        # in the first buckets, and a scan there is cheaper than calling bisect.
        i = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class _Deadline(enum.Enum):
    TIMEOUT = 1  # target: the job
    CANCEL_GRACE = 2  # target: the job
    SLOT_REUSE = 3  # target: the worker whose slot rests


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _cookie_of(packet: Packet) -> bytes | None:
    return getattr(packet, "cookie", None)
