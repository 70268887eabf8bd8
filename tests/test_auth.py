"""Tokens per listener (issue 5): a real Broker on loopback, the Client and
Worker libraries, and raw peers. Every wait is bounded (WAIT_S); nothing
sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from reasonbroker.core.actions import Close, Send
from reasonbroker.core.board import Switchboard
from reasonbroker.core.errors import ConfigError
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.core.protocol import (
    Hello,
    Ping,
    Pong,
    Register,
    Result,
    ResultCode,
    Role,
    Run,
    new_cookie,
)
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig, load_config
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import Unauthorized
from reasonbroker.sdk.worker import Worker
from tests.rawpeer import WAIT_S, RawPeer

CLIENT_TOKEN = "client-s3cret-7f1d"
WORKER_TOKEN = "worker-s3cret-a9c2"
WRONG_TOKEN = "wrong-s3cret-0b3e"
SECRETS = (CLIENT_TOKEN, WORKER_TOKEN, WRONG_TOKEN)
REFUSAL = "a valid token is required on this listener"


def _config(auth_timeout_ms: int = 5_000) -> Config:
    return Config(
        listeners=(
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.CLIENTS, token=CLIENT_TOKEN),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS, token=WORKER_TOKEN),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH),  # no token
        ),
        limits=Limits(auth_timeout_ms=auth_timeout_ms),
    )


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(_config()) as b:
        yield b


def _plain(b: Broker) -> str:
    return b.addresses[2][1]


async def until(cond: Callable[[], bool]) -> None:
    """Wait for broker state that no packet announces (bounded, polled)."""
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.002)


async def echo(variables: Any) -> Any:
    return variables


async def _refused(peer: RawPeer) -> Result:
    """The RESULT the broker refused with; asserts it then closed the connection."""
    assert await peer.closed_by_peer()
    results = [p for p in peer.inbox if isinstance(p, Result)]
    assert len(results) == 1, peer.inbox
    return results[0]


# --------------------------------------------------------------------------- libraries


async def test_right_tokens_let_client_and_worker_work(broker: Broker) -> None:
    worker = Worker(broker.address("worker"), handlers={"echo": echo}, token=WORKER_TOKEN)
    async with worker:
        async with asyncio.timeout(WAIT_S):
            await worker.registered.wait()
        async with Client(broker.address("client"), token=CLIENT_TOKEN) as client:
            assert await client.run("echo", {"x": 1}) == {"x": 1}


async def test_wrong_token_client_raises_unauthorized(broker: Broker) -> None:
    with pytest.raises(Unauthorized):
        await Client(broker.address("client"), token=WRONG_TOKEN).connect()
    await until(lambda: broker.connections == 0)


async def test_wrong_token_worker_raises_unauthorized_and_does_not_retry(broker: Broker) -> None:
    # reconnect stays on: a refused token is final, not a reason to retry.
    worker = Worker(broker.address("worker"), handlers={"echo": echo}, token=WRONG_TOKEN)
    with pytest.raises(Unauthorized):
        async with asyncio.timeout(WAIT_S):
            await worker.run()
    await until(lambda: broker.connections == 0)


async def test_a_client_token_does_not_open_the_worker_listener(broker: Broker) -> None:
    worker = Worker(
        broker.address("worker"), handlers={"echo": echo}, token=CLIENT_TOKEN, reconnect=False
    )
    with pytest.raises(Unauthorized):
        async with asyncio.timeout(WAIT_S):
            await worker.run()


# --------------------------------------------------------------------------- raw peers


async def test_wrong_token_gets_unauthorized_then_close(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("client"))
    peer.send(Hello(role=Role.CLIENT, token=WRONG_TOKEN))
    result = await _refused(peer)
    assert result == Result(None, ResultCode.UNAUTHORIZED, REFUSAL)


async def test_hello_without_token_gets_unauthorized_then_close(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("worker"))
    peer.send(Hello(role=Role.WORKER), Register(1))
    result = await _refused(peer)
    assert result.rc is ResultCode.UNAUTHORIZED
    assert broker.board.workers() == []  # the REGISTER after it was not acted on


async def test_legacy_client_cannot_authenticate(broker: Broker) -> None:
    # ReasonChip's client opens with RUN: refused in the form it understands.
    peer = await RawPeer.connect(broker.address("client"))
    cookie = new_cookie()
    peer.send(Run(cookie, "echo", {}))
    result = await _refused(peer)
    assert result.cookie == cookie
    assert result.rc is ResultCode.EXCEPTION  # a legacy peer never sees UNAUTHORIZED itself
    assert result.error == f"UNAUTHORIZED: {REFUSAL}"
    assert broker.board.stats.accepted == 0


async def test_legacy_worker_cannot_authenticate(broker: Broker) -> None:
    peer = await RawPeer.connect(broker.address("worker"))
    peer.send(Register(4))
    assert await peer.closed_by_peer()
    assert broker.board.workers() == []


async def test_silent_peer_is_closed_after_auth_timeout_while_plain_listener_serves() -> None:
    async with Broker(_config(auth_timeout_ms=100)) as b:
        with structlog.testing.capture_logs() as logs:
            authed = await RawPeer.connect(b.address("client"))
            authed.send(Hello(role=Role.CLIENT, token=CLIENT_TOKEN))
            await authed.recv_type(Hello)
            plain_silent = await RawPeer.connect(_plain(b))
            # Read before connecting: the broker may accept (and start the
            # peer's clock) a loop turn before connect() returns here.
            opened = asyncio.get_running_loop().time()
            silent = await RawPeer.connect(b.address("client"))
            await until(lambda: b.connections == 3)
            assert await silent.closed_by_peer()
            assert asyncio.get_running_loop().time() - opened >= 0.1
            assert silent.inbox == []
            # The token-less listener's peer, silent just as long, is still served,
            # and so is the peer that authenticated in time.
            plain_silent.send(Hello(role=Role.CLIENT))
            await plain_silent.recv_type(Hello)
            authed.send(Ping())
            await authed.recv_type(Pong)
            assert b.connections == 2
        assert [e["event"] for e in logs].count("auth_timeout") == 1
        for p in (authed, plain_silent, silent):
            await p.close()


async def test_token_less_listener_serves_legacy_peers(broker: Broker) -> None:
    worker = await RawPeer.connect(_plain(broker))
    worker.send(Register(1))
    await until(lambda: len(broker.board.workers()) == 1)
    client = await RawPeer.connect(_plain(broker))
    cookie = new_cookie()
    client.send(Run(cookie, "echo", {"n": 1}))
    run = await worker.recv_type(Run)
    worker.send(Result(run.cookie, ResultCode.OK, result={"n": 1}))
    assert await client.recv_type(Result) == Result(cookie, ResultCode.OK, result={"n": 1})
    await worker.close()
    await client.close()


# --------------------------------------------------------------------------- secrecy


async def test_tokens_never_appear_in_logs() -> None:
    with structlog.testing.capture_logs() as logs:
        cfg = _config()
        async with Broker(cfg) as b:
            worker = Worker(b.address("worker"), handlers={"echo": echo}, token=WORKER_TOKEN)
            async with worker:
                async with asyncio.timeout(WAIT_S):
                    await worker.registered.wait()
                async with Client(b.address("client"), token=CLIENT_TOKEN) as client:
                    await client.run("echo", 1)
                with pytest.raises(Unauthorized):
                    await Client(b.address("client"), token=WRONG_TOKEN).connect()
                peer = await RawPeer.connect(b.address("worker"))
                peer.send(Hello(role=Role.WORKER))
                await _refused(peer)
            await until(lambda: b.connections == 0)
    events = {e["event"] for e in logs}
    assert {"auth_failed", "peer_identified", "connection_closed"} <= events
    reasons = sorted(e["reason"] for e in logs if e["event"] == "auth_failed")
    assert reasons == ["missing", "wrong"]
    for event in logs:
        for secret in SECRETS:
            assert secret not in repr(event)
    for secret in SECRETS:
        assert secret not in repr(cfg)
        assert secret not in repr(Hello(role=Role.CLIENT, token=secret))


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    board = Switchboard(Limits())
    board.connect(1, ListenerRole.BOTH, b"s3cret")
    board.connect(2, ListenerRole.BOTH, b"s3cret")
    ok = board.receive(1, Hello(role=Role.CLIENT, token="s3cret"), 0.0)
    assert any(isinstance(a, Send) and isinstance(a.packet, Hello) for a in ok)
    bad = board.receive(2, Hello(role=Role.CLIENT, token="s3creT"), 0.0)
    assert any(isinstance(a, Close) for a in bad)
    assert calls == [(b"s3cret", b"s3cret"), (b"s3creT", b"s3cret")]


def test_no_token_listener_needs_no_hello() -> None:
    board = Switchboard(Limits())
    board.connect(1, ListenerRole.WORKERS)
    assert board.receive(1, Register(1), 0.0) != []
    assert board.workers() == [1]


# --------------------------------------------------------------------------- configuration


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _key(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_toml(tmp_path, text), env or {}, {})
    for secret in SECRETS:
        assert secret not in str(info.value)
    return info.value.key


async def test_token_file_works(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(CLIENT_TOKEN + "\n", encoding="utf-8")
    cfg = load_config(
        _toml(
            tmp_path,
            f'[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "both"\n'
            f'token_file = "{token_file}"\n',
        ),
        {},
        {},
    )
    (lc,) = cfg.listeners
    assert lc.required_token == CLIENT_TOKEN
    assert CLIENT_TOKEN not in repr(cfg)
    async with Broker(cfg) as b:
        async with Client(b.address("client"), token=CLIENT_TOKEN) as client:
            assert client.broker_hello.version
        with pytest.raises(Unauthorized):
            await Client(b.address("client")).connect()


def test_token_and_token_file_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("x", encoding="utf-8")
    text = (
        '[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "both"\n'
        f'token = "{CLIENT_TOKEN}"\ntoken_file = "{tmp_path / "token"}"\n'
    )
    assert _key(tmp_path, text) == "listeners[0].token_file"


def test_unreadable_or_empty_token_file_names_the_key(tmp_path: Path) -> None:
    head = '[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "clients"\n'
    missing = tmp_path / "no-such-token"
    assert _key(tmp_path, head + f'token_file = "{missing}"\n') == "listeners[0].token_file"
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    assert _key(tmp_path, head + f'token_file = "{empty}"\n') == "listeners[0].token_file"
    assert _key(tmp_path, head + 'token = ""\n') == "listeners[0].token"
    assert _key(tmp_path, head + "token = 12\n") == "listeners[0].token"


def test_mode_is_only_for_unix_listeners(tmp_path: Path) -> None:
    text = '[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "both"\nmode = 0o660\n'
    assert _key(tmp_path, text) == "listeners[0].mode"
    text = '[[listeners]]\nurl = "unix:///tmp/x.sock"\nrole = "both"\nmode = 0o7777\n'
    assert _key(tmp_path, text) == "listeners[0].mode"
    text = '[[listeners]]\nurl = "unix:///tmp/x.sock"\nrole = "both"\nmode = "660"\n'
    assert _key(tmp_path, text) == "listeners[0].mode"


def test_environment_tokens_set_every_listener_of_their_role(tmp_path: Path) -> None:
    env = {
        "REASONBROKER_CLIENT_TOKEN": CLIENT_TOKEN,
        "REASONBROKER_WORKER_TOKEN": WORKER_TOKEN,
        "REASONBROKER_BOTH": "tcp://127.0.0.1:0",  # replaces both default listeners
        "REASONBROKER_WORKER": "tcp://127.0.0.1:0",
    }
    # Applied after the flags too, so a listener given by a flag gets it.
    cfg = load_config(None, env, {"listeners.clients": ["tcp://127.0.0.1:0"] * 2})
    tokens = [(lc.role, lc.required_token) for lc in cfg.listeners]
    assert tokens == [
        (ListenerRole.BOTH, None),
        (ListenerRole.WORKERS, WORKER_TOKEN),
        (ListenerRole.CLIENTS, CLIENT_TOKEN),
        (ListenerRole.CLIENTS, CLIENT_TOKEN),
    ]
    both = load_config(None, {"REASONBROKER_BOTH_TOKEN": "b", "REASONBROKER_BOTH": "unix:///x"}, {})
    assert [lc.required_token for lc in both.listeners] == ["b"]  # the one listener
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REASONBROKER_CLIENT_TOKEN": ""}, {})
    assert info.value.key == "REASONBROKER_CLIENT_TOKEN"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REASONBROKER_CLIENTS_TOKEN": "x"}, {})
    assert info.value.key == "REASONBROKER_CLIENTS_TOKEN"


def test_auth_timeout_ms_is_a_limit() -> None:
    assert Limits().auth_timeout_ms == 5_000
    assert (
        load_config(None, {"REASONBROKER_AUTH_TIMEOUT_MS": "250"}, {}).limits.auth_timeout_ms == 250
    )
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REASONBROKER_AUTH_TIMEOUT_MS": "0"}, {})
    assert info.value.key == "REASONBROKER_AUTH_TIMEOUT_MS"


async def test_unix_listener_mode_for_reasonchip_peers() -> None:
    with tempfile.TemporaryDirectory(prefix="rb") as tmp:
        path = os.path.join(tmp, "rc.sock")
        cfg = Config(
            listeners=(
                ListenerConfig("tcp://127.0.0.1:0", ListenerRole.BOTH, token=CLIENT_TOKEN),
                ListenerConfig(f"unix://{path}", ListenerRole.BOTH, mode=0o600),
            )
        )
        async with Broker(cfg) as b:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            worker = await RawPeer.connect(f"unix://{path}")
            worker.send(Register(1))  # ReasonChip-style: no HELLO, no token
            await until(lambda: len(b.board.workers()) == 1)
            async with Client(b.addresses[0][1], token=CLIENT_TOKEN) as client:
                job = asyncio.ensure_future(client.run("echo", 7))
                run = await worker.recv_type(Run)
                worker.send(Result(run.cookie, ResultCode.OK, result=7))
                async with asyncio.timeout(WAIT_S):
                    assert await job == 7
            await worker.close()
