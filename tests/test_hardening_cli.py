"""Hardening, the command line (issue 19, item 15): `serve` refuses a
listener that anyone can reach and join. The refusal runs the real
`reasonbroker` command; it exits before binding anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reasonbroker.core.errors import ConfigError
from reasonbroker.daemon.config import check_exposure, is_loopback, load_config

ROOT = Path(__file__).resolve().parent.parent
REASONBROKER = str(Path(sys.executable).with_name("reasonbroker"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONBROKER_")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [REASONBROKER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env if env is not None else _env(),
        timeout=30,
        check=False,
    )
    # The notice a stale mypyc build prints while iterating is not the command's output.
    err = "".join(
        line
        for line in proc.stderr.splitlines(keepends=True)
        if not line.startswith("reasonbroker: the compiled modules are older")
    )
    return proc.returncode, proc.stdout, err


def test_serve_refuses_a_non_loopback_listener_without_a_token() -> None:
    status, out, err = run("serve", "--client", "tcp://0.0.0.0:0", "--worker", "tcp://127.0.0.1:0")
    assert status == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reasonbroker: config error: listeners: tcp://0.0.0.0:0 (clients")
    assert "allow_unauthenticated = true" in lines[0]


def test_a_bad_allow_unauthenticated_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "rb.toml"
    path.write_text(
        '[[listeners]]\nurl = "tcp://127.0.0.1:0"\nrole = "both"\nallow_unauthenticated = "yes"\n'
    )
    status, _, err = run("serve", "--config", str(path))
    assert status == 2
    assert err.startswith("reasonbroker: config error: listeners[0].allow_unauthenticated:"), err


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("tcp://127.0.0.1:51500", True),
        ("tcp://127.9.9.9:1", True),
        ("tcp://[::1]:1", True),
        ("tcp://localhost:1", True),
        ("unix:///tmp/rb.sock", True),
        ("tcp://0.0.0.0:1", False),
        ("tcp://[::]:1", False),
        ("tcp://10.1.2.3:1", False),
        ("tls://broker.example:1", False),
    ],
)
def test_is_loopback(url: str, local: bool) -> None:
    assert is_loopback(url) is local


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "rb.toml"
    path.write_text(body)
    return path


def test_exposure_is_allowed_with_a_token_or_allow_unauthenticated(tmp_path: Path) -> None:
    exposed = '[[listeners]]\nurl = "tcp://0.0.0.0:0"\nrole = "clients"\n'
    with pytest.raises(ConfigError) as info:
        check_exposure(load_config(_toml(tmp_path, exposed), {}, {}))
    assert info.value.key == "listeners" and "tcp://0.0.0.0:0" in info.value.message
    allowed = exposed + "allow_unauthenticated = true\n"
    check_exposure(load_config(_toml(tmp_path, allowed), {}, {}))
    with_token = exposed + 'token = "a-long-enough-token-value"\n'
    check_exposure(load_config(_toml(tmp_path, with_token), {}, {}))
    # A token from the environment counts too.
    env = {"REASONBROKER_CLIENT_TOKEN": "a-long-enough-token-value"}
    check_exposure(load_config(_toml(tmp_path, exposed), env, {}))
    # The built-in defaults are loopback.
    check_exposure(load_config(None, {}, {}))
