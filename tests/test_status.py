"""`reasonbroker status` (issue 5): admin connections and the STATUS packet.

A real Broker on loopback with the Client and Worker libraries, the CLI as a
subprocess, raw peers, and the switchboard's snapshot on its own. Every wait
is bounded (WAIT_S).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.actions import Close, Log, Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.errors import ConfigError
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Cancel,
    Codec,
    Hello,
    Ping,
    Pong,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    Status,
    decode_body,
    encode,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig, load_config
from reasonbroker.sdk.client import Client, JobHandle
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S, RawPeer

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-s3cret-5e7a"
CLIENT_TOKEN = "client-s3cret-91bd"


def _config() -> Config:
    return Config(
        listeners=(
            # The client listener has its own token and also takes admin connections.
            ListenerConfig(
                "tcp://127.0.0.1:0",
                ListenerRole.CLIENTS,
                token=CLIENT_TOKEN,
                admin_token=ADMIN_TOKEN,
            ),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),  # no admin here
        )
    )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(_config()) as b:
        yield b


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env.update(extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m reasonbroker ARGS` to completion: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reasonbroker",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env if env is not None else _env(),
    )
    try:
        async with asyncio.timeout(WAIT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def busy(broker: Broker) -> AsyncIterator[tuple[Broker, Gate]]:
    """A worker "wa" (capacity 3, echo and slow) with 3 slow jobs running and 1 queued."""
    gate = Gate()
    worker = Worker(
        broker.address("worker"), handlers={"echo": echo, "slow": gate}, capacity=3, name="wa"
    )
    async with worker:
        async with asyncio.timeout(WAIT_S):
            await worker.registered.wait()
        async with Client(broker.address("client"), token=CLIENT_TOKEN, name="c1") as client:
            handles: list[JobHandle] = [await client.submit("slow", i) for i in range(4)]
            await until(lambda: broker.board.running == 3 and broker.board.queue_depth == 1)
            yield broker, gate
            gate.release.set()
            async with asyncio.timeout(WAIT_S):
                assert [await h for h in handles] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- the command


async def test_status_json_shows_workers_clients_queue_and_uptime(
    busy: tuple[Broker, Gate],
) -> None:
    broker, _ = busy
    url = broker.address("client")
    rc, out, err = await cli("status", "--broker", url, "--token", ADMIN_TOKEN, "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["uptime_s"] > 0
    assert (status["running"], status["queued"]) == (3, 1)
    assert status["queue"] == {"slow": 1}
    [worker] = status["workers"]
    assert worker["name"] == "wa"
    assert worker["pipelines"] == ["echo", "slow"]
    assert (worker["capacity"], worker["busy"]) == (3, 3)
    assert worker["address"].startswith("127.0.0.1:")
    [client] = status["clients"]  # the admin connection itself is not listed
    assert (client["name"], client["jobs"]) == ("c1", 4)
    assert client["address"].startswith("127.0.0.1:")
    assert ADMIN_TOKEN not in out + err


async def test_status_table_names_the_worker_and_its_pipelines(busy: tuple[Broker, Gate]) -> None:
    broker, _ = busy
    # The token from the environment this time.
    env = _env(REASONBROKER_ADMIN_TOKEN=ADMIN_TOKEN)
    rc, out, err = await cli("status", "--broker", broker.address("client"), env=env)
    assert rc == 0, err
    assert "running 3, queued 1" in out
    assert "wa" in out
    assert "echo,slow" in out
    assert "c1" in out
    lines = out.splitlines()
    queue_at = lines.index("queue (1)")
    assert lines[queue_at + 2].split() == ["slow", "1"]


@pytest.mark.parametrize("token", [["--token", "wrong-s3cret"], []], ids=["wrong", "missing"])
async def test_wrong_or_missing_token_exits_11_and_the_broker_keeps_serving(
    broker: Broker, token: list[str]
) -> None:
    rc, out, err = await cli("status", "--broker", broker.address("client"), *token)
    assert rc == 11
    assert "unauthorized" in err
    assert "wrong-s3cret" not in out + err
    await until(lambda: broker.connections == 0)
    async with Worker(broker.address("worker"), handlers={"echo": echo}) as worker:
        async with asyncio.timeout(WAIT_S):
            await worker.registered.wait()
        async with Client(broker.address("client"), token=CLIENT_TOKEN) as client:
            assert await client.run("echo", "still here") == "still here"


async def test_unreachable_broker_exits_9() -> None:
    rc, _, err = await cli("status", "--broker", "tcp://127.0.0.1:1", "--token", ADMIN_TOKEN)
    assert rc == 9
    assert "cannot connect" in err


# --------------------------------------------------------------------------- raw peers


async def _refused(peer: RawPeer) -> Result:
    assert await peer.closed_by_peer()
    results = [p for p in peer.inbox if isinstance(p, Result)]
    assert len(results) == 1, peer.inbox
    return results[0]


async def test_admin_hello_on_a_listener_without_admin_token_is_refused(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("worker"))
    try:
        peer.send(Hello(role=Role.ADMIN, token=ADMIN_TOKEN))
        res = await _refused(peer)
        assert res.rc is ResultCode.UNAUTHORIZED
    finally:
        await peer.close()
    await until(lambda: broker.connections == 0)


async def test_the_listener_token_is_not_an_admin_token(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("client"))
    try:
        peer.send(Hello(role=Role.ADMIN, token=CLIENT_TOKEN))
        assert (await _refused(peer)).rc is ResultCode.UNAUTHORIZED
    finally:
        await peer.close()


async def test_admin_may_only_ask_for_status(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("client"))
    try:
        peer.send(Hello(role=Role.ADMIN, token=ADMIN_TOKEN, name="ops"))
        assert (await peer.recv_type(Hello)).role is Role.ADMIN
        assert broker.connections_by_role()["admin"] == 1
        peer.send(Run(new_cookie(), "echo"))
        assert (await peer.recv_type(Result)).rc is ResultCode.BAD_PACKET
        peer.send(Register(1))
        assert (await peer.recv_type(Result)).rc is ResultCode.BAD_PACKET
        peer.send(Ping())
        await peer.recv_type(Pong)
        peer.send(Status())  # still open, still served
        status = (await peer.recv_type(Status)).status
        assert status is not None
        assert status["workers"] == [] and status["clients"] == []
        assert status["queue"] == {}
    finally:
        await peer.close()


async def test_status_from_a_client_is_a_bad_packet(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("client"))
    try:
        peer.send(Hello(role=Role.CLIENT, token=CLIENT_TOKEN))
        await peer.recv_type(Hello)
        peer.send(Status())
        assert (await peer.recv_type(Result)).rc is ResultCode.BAD_PACKET
    finally:
        await peer.close()


# --------------------------------------------------------------------------- switchboard (pure)


def _send_packets(actions: list[Any]) -> list[Any]:
    return [a.packet for a in actions if isinstance(a, Send)]


def test_snapshot_lists_workers_clients_and_live_queue_by_pipeline() -> None:
    board = Switchboard(Limits())
    board.connect(1, ListenerRole.BOTH)
    board.receive(1, Hello(role=Role.WORKER, name="w1"), 0.0)
    board.receive(1, Register(2, ("a", "b")), 0.0)
    board.connect(2, ListenerRole.BOTH)
    board.receive(2, Hello(role=Role.CLIENT, name="c"), 0.0)
    cookies = [new_cookie() for _ in range(5)]
    for cookie, pipeline in zip(cookies, ["a", "a", "a", "b", "b"], strict=True):
        board.receive(2, Run(cookie, pipeline), 0.0)
    board.receive(2, Cancel(cookies[3]), 0.0)  # a queued job ended: not counted
    snap = board.status_snapshot()
    assert snap == {
        "workers": [{"conn": 1, "name": "w1", "pipelines": ["a", "b"], "capacity": 2, "busy": 2}],
        "clients": [{"conn": 2, "name": "c", "jobs": 4}],
        "queue": {"a": 1, "b": 1},
        "running": 2,
        "queued": 2,
        "retained": 0,
        "journal": {"durable": False, "trouble": None},
    }


def test_admin_hello_gets_hello_and_status_with_the_admin_token() -> None:
    board = Switchboard(Limits())
    board.connect(7, ListenerRole.WORKERS, None, ADMIN_TOKEN.encode())
    [hello] = _send_packets(board.receive(7, Hello(role=Role.ADMIN, token=ADMIN_TOKEN), 0.0))
    assert isinstance(hello, Hello) and hello.role is Role.ADMIN
    [status] = _send_packets(board.receive(7, Status(), 0.0))
    assert isinstance(status, Status) and status.status is not None
    assert status.status["workers"] == []


@pytest.mark.parametrize(
    ("admin_token", "sent", "reason"),
    [
        (None, ADMIN_TOKEN, "no admin on this listener"),
        (ADMIN_TOKEN, None, "missing"),
        (ADMIN_TOKEN, "nope", "wrong"),
    ],
)
def test_admin_refusals_are_logged_without_the_token(
    admin_token: str | None, sent: str | None, reason: str
) -> None:
    board = Switchboard(Limits())
    board.connect(
        3, ListenerRole.CLIENTS, None, None if admin_token is None else admin_token.encode()
    )
    actions = board.receive(3, Hello(role=Role.ADMIN, token=sent), 0.0)
    [res] = _send_packets(actions)
    assert isinstance(res, Result) and res.rc is ResultCode.UNAUTHORIZED
    assert any(isinstance(a, Close) for a in actions)
    logs = [a for a in actions if isinstance(a, Log)]
    assert [(a.event, a.fields["reason"]) for a in logs] == [("auth_failed", reason)]
    assert ADMIN_TOKEN not in repr(actions)


# --------------------------------------------------------------------------- protocol, config


@pytest.mark.parametrize("packet", [Status(), Status({"workers": [], "queue": {"a": 1}})])
def test_status_round_trips(packet: Status) -> None:
    frame = encode(packet)
    assert decode_body(frame[4:], Codec.MSGPACK) == packet


def test_status_that_is_not_a_map_is_a_bad_packet() -> None:
    import msgpack

    packet = decode_body(msgpack.packb({"packet_type": "STATUS", "status": [1]}), Codec.MSGPACK)
    assert type(packet).__name__ == "BadPacket"


def test_admin_token_config(tmp_path: Path) -> None:
    token_file = tmp_path / "admin"
    token_file.write_text(ADMIN_TOKEN + "\n", encoding="utf-8")
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "clients"\n'
        f'admin_token_file = "{token_file}"\n',
        encoding="utf-8",
    )
    # REASONBROKER_ADMIN_TOKEN belongs to `status`: the broker ignores it.
    config = load_config(toml, {"REASONBROKER_ADMIN_TOKEN": "x"}, {})
    [lc] = config.listeners
    assert lc.required_admin_token == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(lc)
    lc2 = ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS, admin_token=ADMIN_TOKEN)
    assert lc2.required_admin_token == ADMIN_TOKEN and ADMIN_TOKEN not in repr(lc2)
    with pytest.raises(ConfigError) as info:
        ListenerConfig("tcp://x:1", ListenerRole.CLIENTS, admin_token="a", admin_token_file="b")
    assert info.value.key == "listeners.admin_token_file"
    with pytest.raises(ConfigError) as info:
        ListenerConfig("tcp://x:1", ListenerRole.CLIENTS, admin_token="")
    assert info.value.key == "listeners.admin_token"
