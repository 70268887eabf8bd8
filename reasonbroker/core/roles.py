"""Connection roles: the first packet, HELLO, authentication, admin.

Owns PROTOCOL.md section 5's Roles rules: a connection's first packet fixes
its role (HELLO says it, REGISTER makes a worker, anything else a client), a
listener takes only its roles, a listener with a token takes only a HELLO
carrying it (compared in constant time, never logged), an admin HELLO needs
the listener's admin token, and an admin's STATUS is answered with
`status_snapshot`. A refusal is handed back as data (`Refusal`); answering
and closing are the board's.
"""

from __future__ import annotations

import hmac
from typing import Any

from .._version import __version__
from .actions import Action, Log, Send
from .dispatch import Dispatcher
from .guard import check_hello
from .limits import Limits, ListenerRole
from .packets import BadPacket, Hello, Packet, Register, Result, ResultCode, Role
from .state import _Conn, _cookie_of, _State

FEATURES = (
    "started",
    "progress",
    "priority",
    "timeout",
    "attempts",
    "accepted",
    "ack",
    "attach",
    "drain",
)


class Refusal:
    """A connection refused: answer `result` (forced), close it for `why`,
    then append `log` if any."""

    __slots__ = ("log", "result", "why")

    def __init__(self, result: Result, why: str, log: Log | None = None) -> None:
        self.result = result
        self.why = why
        self.log = log


def assign_role(
    c: _Conn, packet: Packet, heartbeat_ms: int, out: list[Action], limits: Limits | None = None
) -> bool | Refusal:
    """The first packet fixes a connection's role (PROTOCOL.md section 5, Roles).

    True: handle the packet as usual; False: it is fully handled (a HELLO);
    a Refusal: the board answers and closes. A HELLO over `limits` (its name,
    its features) is refused BAD_PACKET before anything of it is kept.
    """
    admin_token, c.admin_token = c.admin_token, None
    if limits is not None and isinstance(packet, Hello):
        too_big = check_hello(packet, limits)
        if too_big is not None:
            c.hello = True  # answered in the extension form it asked for
            c.role = packet.role or Role.CLIENT
            return Refusal(
                Result(None, ResultCode.BAD_PACKET, too_big),
                f"bad HELLO: {too_big}",
                Log("bad_packet", c.id, {"packet_type": "HELLO", "why": too_big}),
            )
    if isinstance(packet, Hello) and packet.role is Role.ADMIN:
        return _assign_admin(c, packet, admin_token, heartbeat_ms, out)
    if isinstance(packet, Hello):
        role = packet.role or Role.CLIENT
    elif isinstance(packet, BadPacket) and packet.packet_type == "HELLO":
        # A malformed HELLO (a token that is not a string, say) still says the
        # peer speaks the extensions: it is answered as one, never as legacy.
        c.hello = True
        role = Role.CLIENT
    elif isinstance(packet, Register) or (
        isinstance(packet, BadPacket) and packet.packet_type == "REGISTER"
    ):
        role = Role.WORKER  # a malformed REGISTER still says "I am a worker"
    else:
        role = Role.CLIENT
    allowed = c.listener is ListenerRole.BOTH or (
        (c.listener is ListenerRole.WORKERS) == (role is Role.WORKER)
    )
    if isinstance(packet, Hello):
        c.hello = True
        c.features = frozenset(packet.features)
        c.name = packet.name
    c.role = role
    if c.token is not None:
        refusal = _authenticate(c, packet, out)
        if refusal is not None:
            return refusal
    if not allowed:
        why = f"{role.value}s are not accepted on this {c.listener.value} listener"
        return Refusal(
            Result(_cookie_of(packet), ResultCode.UNAUTHORIZED, why),
            why,
            Log("role_refused", c.id, {"role": role.value, "listener": c.listener.value}),
        )
    out.append(Log("peer_identified", c.id, {"role": role.value, "hello": c.hello, "name": c.name}))
    if isinstance(packet, Hello):
        out.append(Send(c.id, _hello(role, heartbeat_ms)))
        return False  # the HELLO is fully handled
    return True


def _hello(role: Role, heartbeat_ms: int) -> Hello:
    return Hello(role=role, features=FEATURES, version=__version__, heartbeat_ms=heartbeat_ms)


def _assign_admin(
    c: _Conn, packet: Hello, admin_token: bytes | None, heartbeat_ms: int, out: list[Action]
) -> bool | Refusal:
    """A HELLO with role admin: accepted only with this listener's admin token.

    Refused (no admin token here, or a wrong or missing one): RESULT
    UNAUTHORIZED, then close; logged as auth_failed, never with the token.
    """
    c.hello = True
    c.features = frozenset(packet.features)
    c.name = packet.name
    c.role = Role.ADMIN
    c.token = None  # the admin token stands in for the listener's own
    if admin_token is None:
        reason = "no admin on this listener"
    elif packet.token is None:
        reason = "missing"
    elif hmac.compare_digest(packet.token.encode("utf-8", "surrogatepass"), admin_token):
        out.append(Log("peer_identified", c.id, {"role": "admin", "hello": True, "name": c.name}))
        out.append(Send(c.id, _hello(Role.ADMIN, heartbeat_ms)))
        return False  # the HELLO is fully handled
    else:
        reason = "wrong"
    out.append(Log("auth_failed", c.id, {"reason": reason, "role": "admin"}))
    why = "a valid admin token is required for an admin connection"
    return Refusal(Result(None, ResultCode.UNAUTHORIZED, why), f"unauthorized admin ({reason})")


def _authenticate(c: _Conn, packet: Packet, out: list[Action]) -> Refusal | None:
    """On a listener with a token, the first packet must be HELLO carrying it.

    Refused: RESULT UNAUTHORIZED, then close. The token is compared in
    constant time and never appears in an answer or a log line.
    """
    assert c.token is not None
    if isinstance(packet, BadPacket) and packet.packet_type == "HELLO":
        reason = "malformed HELLO"
    elif not isinstance(packet, Hello):
        reason = "not HELLO"  # legacy peers cannot authenticate
    elif packet.token is None:
        reason = "missing"
    elif hmac.compare_digest(packet.token.encode("utf-8", "surrogatepass"), c.token):
        c.token = None  # authenticated; keep no copy of the secret
        return None
    else:
        reason = "wrong"
    out.append(Log("auth_failed", c.id, {"reason": reason}))
    why = "a valid token is required on this listener"
    return Refusal(
        Result(_cookie_of(packet), ResultCode.UNAUTHORIZED, why), f"unauthorized ({reason})"
    )


def status_snapshot(conns: dict[int, _Conn], dispatcher: Dispatcher) -> dict[str, Any]:
    """Workers, clients and queue depth by pipeline, as plain data (for STATUS).

    Connections are listed by id; the broker adds each one's address and
    its own uptime before the answer is encoded.
    """
    workers: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    for c in conns.values():
        if c.closing:
            continue
        if c.role is Role.WORKER:
            workers.append(
                {
                    "conn": c.id,
                    "name": c.name,
                    "pipelines": None if c.pipelines is None else sorted(c.pipelines),
                    "capacity": c.capacity,
                    "busy": c.busy,
                }
            )
        elif c.role is Role.CLIENT:
            clients.append({"conn": c.id, "name": c.name, "jobs": len(c.jobs)})
    queue: dict[str, int] = {}
    for pipeline, heap in sorted(dispatcher.queues.items()):
        live = sum(1 for entry in heap if entry[2].state is _State.QUEUED)
        if live:
            queue[pipeline] = live
    return {
        "workers": workers,
        "clients": clients,
        "queue": queue,
        "running": dispatcher.running,
        "queued": dispatcher.queued,
    }
