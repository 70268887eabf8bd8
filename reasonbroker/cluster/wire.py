"""What the nodes of a cluster say to each other through NATS: names and messages.

Names (all under the configured prefix, "rb" by default):

    stream   RB_JOBS              work-queue stream of every accepted job, file storage
    subject  rb.jobs.<token>.<band>  per pipeline and priority band (high, normal, low);
                                  <token> is the pipeline name in unpadded url-safe
                                  base64 (pipeline names may hold dots and other bytes
                                  a subject token may not)
    consumer rb_<hash>_<band>     durable pull consumer per pipeline and band, shared
                                  by the nodes
    bucket   rb_results           KV: the terminal RESULT of each job, by cookie (hex);
                                  created first-writer-wins, kept `result_ttl_s`
    bucket   rb_pipelines         KV: the pipelines the cluster has seen, so that a
                                  worker serving every pipeline knows what to fetch
    subject  rb.node.<node>       core NATS: STARTED / PROGRESS / RESULT for jobs
                                  accepted on <node> (the fast path to their clients)
    subject  rb.cancel            core NATS: a job was cancelled or ended by its node;
                                  whoever runs it stops it
    subject  rb.pipelines         core NATS: a pipeline new to a node (its name), so
                                  that the nodes whose workers serve every pipeline
                                  fetch its jobs at once (rb_pipelines is read by
                                  nodes that start later, and polled as a backstop)
    subject  rb.who               core NATS request: which node has this job (a JOB
                                  question on a node that does not know it)
    subject  rb.nodes             core NATS survey: every node answers with its
                                  summary (workers, slots, busy, running, pipelines)

Messages are msgpack maps with short keys; payloads (variables, result) are kept
as the msgpack bytes of their value, never decoded on the way.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Final

import msgpack

_packer = msgpack.Packer(use_bin_type=True)


def _pack(value: Any) -> bytes:
    data: bytes = _packer.pack(value)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


pack = _pack  # a survey answer (a plain map)
unpack = _unpack


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    @property
    def stream(self) -> str:
        return f"{self.prefix.upper()}_JOBS"

    @property
    def results(self) -> str:
        return f"{self.prefix}_results"

    @property
    def pipelines(self) -> str:
        return f"{self.prefix}_pipelines"

    @property
    def jobs_wildcard(self) -> str:
        return f"{self.prefix}.jobs.*.*"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}.cancel"

    @property
    def new_pipelines(self) -> str:
        return f"{self.prefix}.pipelines"

    @property
    def who(self) -> str:
        return f"{self.prefix}.who"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}.nodes"

    def token(self, pipeline: str) -> str:
        return base64.urlsafe_b64encode(pipeline.encode()).decode().rstrip("=") or "_"

    def jobs(self, pipeline: str, band: str = "normal") -> str:
        return f"{self.prefix}.jobs.{self.token(pipeline)}.{band}"

    def consumer(self, pipeline: str, band: str = "normal") -> str:
        digest = hashlib.sha256(pipeline.encode()).hexdigest()[:32]
        return f"{self.prefix}_{digest}_{band}"

    def node(self, node: str) -> str:
        return f"{self.prefix}.node.{node}"

    def result(self, cookie: bytes) -> str:
        """The subject of the job's key in the results bucket (what a KV put writes)."""
        return f"$KV.{self.results}.{key(cookie)}"


def create_headers() -> dict[str, str]:
    """A KV create: the write is refused (err_code 10071) if the key has a value."""
    return {"Nats-Expected-Last-Subject-Sequence": "0"}


# The same, as the header block on the wire (the hot path sends it as it is).
CREATE_HEADER_BLOCK: Final = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\n\r\n"


def msg_id_block(cookie: bytes) -> bytes:
    """The header block of a job's publish: `Nats-Msg-Id` = its key (the server drops a
    resend of it within the stream's duplicate window)."""
    return b"NATS/1.0\r\nNats-Msg-Id: %b\r\n\r\n" % cookie.hex().encode()


# Priority across nodes: the stream is first in, first out per subject, so a job goes to
# its pipeline's subject for its band, and a node fetches the higher bands first. Within
# a band the order is arrival; a node's worker side orders what it holds by priority.
BANDS: Final = ("high", "normal", "low")


def band_of(priority: int) -> str:
    """high: priority > 0; normal: 0; low: < 0."""
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


def key(cookie: bytes) -> str:
    """A job's key in the results bucket, and its Nats-Msg-Id."""
    return cookie.hex()


@dataclass(frozen=True, slots=True)
class JobMessage:
    """An accepted job as the stream keeps it."""

    cookie: bytes
    pipeline: str
    variables: bytes | None  # msgpack bytes of the value
    priority: int
    deadline: float | None  # wall clock, absolute
    timeout_ms: int | None
    max_attempts: int
    origin: str  # the node whose client it is
    accepted_at: float

    def encode(self) -> bytes:
        return _pack(
            {
                "c": self.cookie,
                "p": self.pipeline,
                "v": self.variables,
                "pr": self.priority,
                "d": self.deadline,
                "t": self.timeout_ms,
                "m": self.max_attempts,
                "o": self.origin,
                "a": self.accepted_at,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> JobMessage:
        d = _unpack(data)
        return cls(
            cookie=bytes(d["c"]),
            pipeline=str(d["p"]),
            variables=None if d["v"] is None else bytes(d["v"]),
            priority=int(d["pr"]),
            deadline=None if d["d"] is None else float(d["d"]),
            timeout_ms=None if d["t"] is None else int(d["t"]),
            max_attempts=int(d["m"]),
            origin=str(d["o"]),
            accepted_at=float(d["a"]),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's terminal RESULT, as the results bucket keeps it (first writer wins)."""

    cookie: bytes
    rc: str
    error: str | None
    stacktrace: tuple[str, ...] | None
    result: bytes | None  # msgpack bytes of the value
    node: str  # the node that wrote it
    attempts: int
    ended_at: float
    pipeline: str = ""

    def encode(self) -> bytes:
        return _pack(
            {
                "c": self.cookie,
                "p": self.pipeline,
                "rc": self.rc,
                "e": self.error,
                "s": None if self.stacktrace is None else list(self.stacktrace),
                "r": self.result,
                "n": self.node,
                "at": self.attempts,
                "t": self.ended_at,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Outcome:
        d = _unpack(data)
        stack = d.get("s")
        return cls(
            cookie=bytes(d["c"]),
            rc=str(d["rc"]),
            error=d.get("e"),
            stacktrace=None if stack is None else tuple(str(x) for x in stack),
            result=None if d.get("r") is None else bytes(d["r"]),
            node=str(d.get("n", "")),
            attempts=int(d.get("at", 0)),
            ended_at=float(d.get("t", 0.0)),
            pipeline=str(d.get("p", "")),
        )


# The events on a node's subject: one byte of kind, then the body.
EVENT_RESULT: Final = b"R"  # an Outcome
EVENT_STARTED: Final = b"S"  # the cookie
EVENT_PROGRESS: Final = b"P"  # msgpack [cookie, value bytes]


def progress_event(cookie: bytes, value: bytes | None) -> bytes:
    return EVENT_PROGRESS + _pack([cookie, value])


def decode_progress(body: bytes) -> tuple[bytes, bytes | None]:
    cookie, value = _unpack(body)
    return bytes(cookie), None if value is None else bytes(value)


def pack_value(value: Any) -> bytes | None:
    """A decoded payload back to msgpack bytes (None stays None)."""
    return None if value is None else _pack(value)
