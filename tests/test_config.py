"""load_config: the layers (defaults, TOML, environment, flags) and every error naming its key."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.errors import ConfigError
from reasonbroker.core.limits import Limits, ListenerRole
from reasonbroker.daemon.config import (
    DEFAULT_LISTENERS,
    Config,
    ListenerConfig,
    LogFormat,
    default_journal_path,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
# What `load_config` gives with nothing set: a Config made in code has no
# journal, `serve` keeps one at the default path.
DEFAULT_CONFIG = Config(journal_path=default_journal_path({}))

CLIENTS, WORKERS, BOTH = ListenerRole.CLIENTS, ListenerRole.WORKERS, ListenerRole.BOTH


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reasonbroker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def key_of(
    tmp_path: Path,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    path = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {}, overrides or {})
    return info.value.key


# --------------------------------------------------------------------------- defaults, example


def test_defaults_without_file_env_or_flags() -> None:
    config = load_config(None, {}, {})
    assert config == DEFAULT_CONFIG
    assert config.listeners == DEFAULT_LISTENERS
    assert config.limits.max_frame_bytes == 8 * 1024 * 1024


def test_example_file_loads_to_exactly_the_defaults() -> None:
    assert load_config(EXAMPLE, {}, {}) == DEFAULT_CONFIG


def test_example_file_names_every_key() -> None:
    # Equality with the defaults would also hold for an empty file: check each key is written out.
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert set(doc) == {"uvloop", "log", "limits", "listeners", "journal"}
    assert set(doc["log"]) == {"level", "format"}
    journal_limits = {"result_ttl_s", "result_max", "result_max_bytes"}
    assert set(doc["limits"]) == {f.name for f in fields(Limits)} - journal_limits
    assert set(doc["journal"]) == {"sync"} | journal_limits


def test_environment_without_our_prefix_is_ignored() -> None:
    env = {"PATH": "/bin", "REASONBROKERX": "1", "reasonbroker_queue_limit": "x"}
    assert load_config(None, env, {}) == DEFAULT_CONFIG


def test_environment_read_elsewhere_is_not_config() -> None:
    # REASONBROKER_PURE is read at import (which build runs), the admin token by `status`.
    env = {"REASONBROKER_PURE": "1", "REASONBROKER_ADMIN_TOKEN": "t"}
    assert load_config(None, env, {}) == DEFAULT_CONFIG
    with pytest.raises(ConfigError, match="REASONBROKER_PURES"):
        load_config(None, {"REASONBROKER_PURES": "1"}, {})


# --------------------------------------------------------------------------- TOML


def test_toml_values_are_applied(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
uvloop = false
[log]
level = "DEBUG"
format = "json"
[limits]
queue_limit = 0
drain_timeout_s = 5
max_frame_bytes = 1024
[[listeners]]
url = "tcp://127.0.0.1:0"
role = "both"
[[listeners]]
url = "unix:///tmp/rb.sock"
role = "workers"
""",
    )
    config = load_config(path, {}, {})
    assert config.uvloop is False
    assert config.log_level == "debug"
    assert config.log_format is LogFormat.JSON
    assert config.limits == Limits(queue_limit=0, drain_timeout_s=5.0, max_frame_bytes=1024)
    assert isinstance(config.limits.drain_timeout_s, float)
    assert config.listeners == (
        ListenerConfig("tcp://127.0.0.1:0", BOTH),
        ListenerConfig("unix:///tmp/rb.sock", WORKERS),
    )


def test_toml_without_listeners_keeps_the_default_listeners(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[limits]\nqueue_limit = 7\n"), {}, {})
    assert config.listeners == DEFAULT_LISTENERS
    assert config.limits.queue_limit == 7


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nqueue_limit = 7\n")
    assert load_config(None, {"REASONBROKER_CONFIG": str(path)}, {}).limits.queue_limit == 7


def test_explicit_path_wins_over_environment_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nqueue_limit = 7\n")
    env = {"REASONBROKER_CONFIG": str(tmp_path / "missing.toml")}
    assert load_config(path, env, {}).limits.queue_limit == 7


# --------------------------------------------------------------------------- environment


def test_environment_overrides_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\nqueue_limit = 10\n[log]\nlevel = "error"\n')
    env = {"REASONBROKER_QUEUE_LIMIT": "20", "REASONBROKER_LOG_LEVEL": "warning"}
    config = load_config(path, env, {})
    assert config.limits.queue_limit == 20
    assert config.log_level == "warning"


@pytest.mark.parametrize("field", [f.name for f in fields(Limits)])
def test_every_limit_is_settable_from_each_layer(tmp_path: Path, field: str) -> None:
    # A value valid for every field: above the default, so cross-field rules still hold.
    default = getattr(Limits(), field)
    value = default * 2 if field != "default_max_attempts" else 2
    # The limits on retained results are set in [journal] (they bound what it keeps).
    section = "journal" if field.startswith("result_") else "limits"
    env_name = f"REASONBROKER_{'JOURNAL_' if section == 'journal' else ''}{field.upper()}"
    path = write(tmp_path, f"[{section}]\n{field} = {value!r}\n")
    from_toml = load_config(path, {}, {}).limits
    from_env = load_config(None, {env_name: str(value)}, {}).limits
    from_flag = load_config(None, {}, {f"{section}.{field}": value}).limits
    assert getattr(from_toml, field) == value
    assert from_toml == from_env == from_flag


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("TRUE", True),
        ("false", False),
        ("0", False),
        (" False ", False),
    ],
)
def test_environment_bool(tmp_path: Path, text: str, expected: bool) -> None:
    # The file says the opposite, so the variable must win for the assertion to hold.
    path = write(tmp_path, f"uvloop = {str(not expected).lower()}\n")
    assert load_config(path, {"REASONBROKER_UVLOOP": text}, {}).uvloop is expected


def test_environment_float_and_format() -> None:
    env = {"REASONBROKER_DRAIN_TIMEOUT_S": "2.5", "REASONBROKER_LOG_FORMAT": "console"}
    config = load_config(None, env, {})
    assert config.limits.drain_timeout_s == 2.5
    assert config.log_format is LogFormat.CONSOLE


def test_environment_client_replaces_only_client_listeners() -> None:
    env = {"REASONBROKER_CLIENT": "tcp://127.0.0.1:1, tcp://127.0.0.1:2"}
    assert load_config(None, env, {}).listeners == (
        ListenerConfig("tcp://127.0.0.1:1", CLIENTS),
        ListenerConfig("tcp://127.0.0.1:2", CLIENTS),
        ListenerConfig("tcp://127.0.0.1:51510", WORKERS),
    )


def test_environment_worker_and_both() -> None:
    env = {"REASONBROKER_WORKER": "tcp://127.0.0.1:3", "REASONBROKER_BOTH": "unix:///tmp/s"}
    # The both listener stands in for the default client listener too (issue 19, item 4).
    assert load_config(None, env, {}).listeners == (
        ListenerConfig("unix:///tmp/s", BOTH),
        ListenerConfig("tcp://127.0.0.1:3", WORKERS),
    )


def test_empty_environment_role_removes_that_role() -> None:
    config = load_config(None, {"REASONBROKER_CLIENT": ""}, {})
    assert config.listeners == (ListenerConfig("tcp://127.0.0.1:51510", WORKERS),)


# --------------------------------------------------------------------------- flags


def test_flags_override_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "uvloop = true\n[limits]\nqueue_limit = 10\n")
    env = {"REASONBROKER_QUEUE_LIMIT": "20", "REASONBROKER_LOG_LEVEL": "warning"}
    overrides = {"limits.queue_limit": 30, "log.level": "debug", "uvloop": False}
    config = load_config(path, env, overrides)
    assert config.limits.queue_limit == 30
    assert config.log_level == "debug"
    assert config.uvloop is False


def test_client_flag_replaces_only_client_listeners(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[listeners]]
url = "tcp://127.0.0.1:1"
role = "clients"
[[listeners]]
url = "tcp://127.0.0.1:2"
role = "workers"
[[listeners]]
url = "tcp://127.0.0.1:3"
role = "clients"
[[listeners]]
url = "tcp://127.0.0.1:4"
role = "both"
""",
    )
    config = load_config(path, {}, {"listeners.clients": ["tcp://127.0.0.1:9"]})
    assert config.listeners == (
        ListenerConfig("tcp://127.0.0.1:9", CLIENTS),
        ListenerConfig("tcp://127.0.0.1:2", WORKERS),
        ListenerConfig("tcp://127.0.0.1:4", BOTH),
    )


def test_flag_role_replaces_environment_role_and_keeps_the_others() -> None:
    env = {"REASONBROKER_CLIENT": "tcp://127.0.0.1:1", "REASONBROKER_WORKER": "tcp://127.0.0.1:2"}
    overrides = {"listeners.workers": ["tcp://127.0.0.1:7", "tcp://127.0.0.1:8"]}
    assert load_config(None, env, overrides).listeners == (
        ListenerConfig("tcp://127.0.0.1:1", CLIENTS),
        ListenerConfig("tcp://127.0.0.1:7", WORKERS),
        ListenerConfig("tcp://127.0.0.1:8", WORKERS),
    )


def test_flag_for_a_role_without_listeners_appends() -> None:
    env = {"REASONBROKER_CLIENT": "tcp://127.0.0.1:1", "REASONBROKER_WORKER": "tcp://127.0.0.1:2"}
    config = load_config(None, env, {"listeners.both": ["tcp://127.0.0.1:0"]})
    assert config.listeners == (
        ListenerConfig("tcp://127.0.0.1:1", CLIENTS),
        ListenerConfig("tcp://127.0.0.1:2", WORKERS),
        ListenerConfig("tcp://127.0.0.1:0", BOTH),
    )


# --------------------------------------------------------------------------- errors: TOML


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("bogus = 1", "bogus"),
        ("log = 1", "log"),
        ("limits = 1", "limits"),
        ('[log]\nlevle = "info"', "log.levle"),
        ('[log]\nlevel = "loud"', "log.level"),
        ("[log]\nlevel = 10", "log.level"),
        ('[log]\nformat = "xml"', "log.format"),
        ("[limits]\nqueue_limt = 1", "limits.queue_limt"),
        ('[limits]\nqueue_limit = "10"', "limits.queue_limit"),
        ("[limits]\nqueue_limit = true", "limits.queue_limit"),
        ("[limits]\nmax_frame_bytes = 1.5", "limits.max_frame_bytes"),
        ("[limits]\ndrain_timeout_s = true", "limits.drain_timeout_s"),
        ("[limits]\ndrain_timeout_s = inf", "limits.drain_timeout_s"),
        ("[limits]\ndrain_timeout_s = nan", "limits.drain_timeout_s"),
        ('uvloop = "yes"', "uvloop"),
        ("uvloop = 1", "uvloop"),
        # Limits' own validation, named as in the file.
        ("[limits]\nqueue_limit = -1", "limits.queue_limit"),
        ("[limits]\nheartbeat_ms = 0", "limits.heartbeat_ms"),
        ("[limits]\nmax_frame_bytes = 4294967296", "limits.max_frame_bytes"),
        ("[limits]\noutbox_high_water_bytes = 1024", "limits.outbox_high_water_bytes"),
        ("[limits]\ndefault_max_attempts = 11", "limits.default_max_attempts"),
        # Listeners.
        ('[listeners]\nurl = "tcp://127.0.0.1:1"\nrole = "clients"', "listeners"),
        ("listeners = []", "listeners"),
        ('listeners = ["tcp://127.0.0.1:1"]', "listeners[0]"),
        (
            '[[listeners]]\nurl = "tcp://127.0.0.1:1"\nrole = "clients"\nport = 1',
            "listeners[0].port",
        ),
        ('[[listeners]]\nurl = "tcp://127.0.0.1:1"', "listeners[0].role"),
        ('[[listeners]]\nrole = "clients"', "listeners[0].url"),
        ('[[listeners]]\nurl = "127.0.0.1:1"\nrole = "clients"', "listeners[0].url"),
        ('[[listeners]]\nurl = 51500\nrole = "clients"', "listeners[0].url"),
        (
            '[[listeners]]\nurl = "tcp://127.0.0.1:1"\nrole = "clients"\n'
            '[[listeners]]\nurl = "tcp://127.0.0.1:2"\nrole = "worker"',
            "listeners[1].role",
        ),
        ('[[listeners]]\nurl = "tcp://127.0.0.1:1"\nrole = 1', "listeners[0].role"),
    ],
)
def test_toml_error_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    assert key_of(tmp_path, toml=toml) == key


def test_toml_error_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\nqueue_limit = "ten"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert "'ten'" in info.value.message
    assert str(path) in info.value.message


def test_invalid_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits\nqueue_limit = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert info.value.key == str(path)
    assert "invalid TOML" in info.value.message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert info.value.key == str(path)
    assert "cannot read" in info.value.message


def test_directory_is_unreadable(tmp_path: Path) -> None:
    assert key_of(tmp_path, env={"REASONBROKER_CONFIG": str(tmp_path)}) == str(tmp_path)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "d\xe9bug"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert info.value.key == str(path)


# --------------------------------------------------------------------------- errors: environment


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"REASONBROKER_QUEUE_LIMT": "1"}, "REASONBROKER_QUEUE_LIMT"),
        ({"REASONBROKER_LIMITS_QUEUE_LIMIT": "1"}, "REASONBROKER_LIMITS_QUEUE_LIMIT"),
        ({"REASONBROKER_QUEUE_LIMIT": "ten"}, "REASONBROKER_QUEUE_LIMIT"),
        ({"REASONBROKER_QUEUE_LIMIT": "1.5"}, "REASONBROKER_QUEUE_LIMIT"),
        ({"REASONBROKER_QUEUE_LIMIT": ""}, "REASONBROKER_QUEUE_LIMIT"),
        ({"REASONBROKER_QUEUE_LIMIT": "-1"}, "REASONBROKER_QUEUE_LIMIT"),
        ({"REASONBROKER_OUTBOX_HIGH_WATER_BYTES": "1024"}, "REASONBROKER_OUTBOX_HIGH_WATER_BYTES"),
        ({"REASONBROKER_DRAIN_TIMEOUT_S": "soon"}, "REASONBROKER_DRAIN_TIMEOUT_S"),
        ({"REASONBROKER_DRAIN_TIMEOUT_S": "inf"}, "REASONBROKER_DRAIN_TIMEOUT_S"),
        ({"REASONBROKER_UVLOOP": "maybe"}, "REASONBROKER_UVLOOP"),
        ({"REASONBROKER_LOG_LEVEL": "loud"}, "REASONBROKER_LOG_LEVEL"),
        ({"REASONBROKER_LOG_FORMAT": "xml"}, "REASONBROKER_LOG_FORMAT"),
        ({"REASONBROKER_CLIENT": "tcp://127.0.0.1:1,nonsense"}, "REASONBROKER_CLIENT"),
        ({"REASONBROKER_CLIENT": "", "REASONBROKER_WORKER": ""}, "listeners"),
    ],
)
def test_environment_error_names_the_variable(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    assert key_of(tmp_path, env=env) == key


def test_cross_field_error_names_the_limit_that_breaks_the_rule(tmp_path: Path) -> None:
    # max_frame_bytes from the environment outgrows the default outbox: Limits
    # blames the outbox, which no layer set, so it is named by its TOML key.
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REASONBROKER_MAX_FRAME_BYTES": str(64 * 1024 * 1024)}, {})
    assert info.value.key == "limits.outbox_high_water_bytes"
    assert "max_frame_bytes" in info.value.message


# --------------------------------------------------------------------------- errors: flags


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"limits.queue_limt": 1}, "limits.queue_limt"),
        ({"client": ["tcp://127.0.0.1:1"]}, "client"),
        ({"limits.queue_limit": "10"}, "limits.queue_limit"),
        ({"limits.queue_limit": True}, "limits.queue_limit"),
        ({"limits.queue_limit": -1}, "limits.queue_limit"),
        ({"uvloop": "no"}, "uvloop"),
        ({"log.level": "loud"}, "log.level"),
        ({"log.format": "xml"}, "log.format"),
        ({"listeners.clients": "tcp://127.0.0.1:1"}, "listeners.clients"),
        ({"listeners.workers": ["nonsense"]}, "listeners.workers"),
        ({"listeners.both": [1]}, "listeners.both"),
    ],
)
def test_override_error_names_the_key(tmp_path: Path, overrides: dict[str, Any], key: str) -> None:
    assert key_of(tmp_path, overrides=overrides) == key


def test_flag_error_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    # A valid file and a bad flag: the flag is named, not the file.
    path = write(tmp_path, "[limits]\nqueue_limit = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"REASONBROKER_QUEUE_LIMIT": "6"}, {"limits.queue_limit": -1})
    assert info.value.key == "limits.queue_limit"
    assert str(path) not in info.value.message


def test_journal_defaults_to_the_state_directory_and_none_turns_it_off(tmp_path: Path) -> None:
    assert load_config(None, {"HOME": str(tmp_path)}, {}).journal_path == str(
        tmp_path / ".local" / "state" / "reasonbroker" / "journal.sqlite3"
    )
    xdg = {"HOME": "/nowhere", "XDG_STATE_HOME": str(tmp_path / "st")}
    assert load_config(None, xdg, {}).journal_path == str(
        tmp_path / "st" / "reasonbroker" / "journal.sqlite3"
    )
    assert load_config(None, {"REASONBROKER_JOURNAL_PATH": "none"}, {}).journal_path is None
    assert load_config(None, {}, {"journal.path": "None"}).journal_path is None
    path = write(tmp_path, '[journal]\npath = "/srv/j.db"\nsync = "normal"\n')
    config = load_config(path, {}, {})
    assert (config.journal_path, config.journal_sync) == ("/srv/j.db", "normal")


def test_journal_sync_must_be_full_or_normal(tmp_path: Path) -> None:
    path = write(tmp_path, '[journal]\nsync = "sometimes"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, {})
    assert info.value.key == "journal.sync"
    with pytest.raises(ConfigError, match="REASONBROKER_JOURNAL_SYNC"):
        load_config(None, {"REASONBROKER_JOURNAL_SYNC": "x"}, {})
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[journal]\nbogus = 1\n"), {}, {})
    assert info.value.key == "journal.bogus"


# --------------------------------------------------------------------------- cluster


def test_cluster_settings_come_from_the_file_the_environment_and_the_flags(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        '[cluster]\nservers = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]\n'
        'node = "n1"\nreplicas = 3\nack_wait_s = 10\n',
    )
    config = load_config(path, {}, {})
    assert config.cluster is not None
    assert config.cluster.servers == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert (config.cluster.node, config.cluster.replicas, config.cluster.ack_wait_s) == (
        "n1",
        3,
        10.0,
    )
    env = {"REASONBROKER_CLUSTER_SERVERS": "nats://127.0.0.1:4222"}
    from_env = load_config(None, env, {"cluster.node": "flag-node"})
    assert from_env.cluster is not None
    assert from_env.cluster.servers == ("nats://127.0.0.1:4222",)
    assert from_env.cluster.node == "flag-node"
    assert load_config(None, {}, {}).cluster is None  # off unless servers are given


def test_a_cluster_without_a_node_name_takes_the_host_name() -> None:
    config = load_config(None, {}, {"cluster.servers": "nats://127.0.0.1:4222"})
    assert config.cluster is not None and config.cluster.node
    assert all(ch.isalnum() or ch in "-_" for ch in config.cluster.node)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('servers = ["http://x:1"]', "cluster.servers"),
        ('servers = ["nats://x:1"]\nnode = "a b"', "cluster.node"),
        ('servers = ["nats://x:1"]\nreplicas = 7', "cluster.replicas"),
        ('servers = ["nats://x:1"]\nack_wait_s = 0', "cluster.ack_wait_s"),
        ('servers = ["nats://x:1"]\ncredentials = "/no/such.creds"', "cluster.credentials"),
        ('servers = ["nats://x:1"]\nstream = "x"', "cluster.stream"),
    ],
)
def test_a_bad_cluster_setting_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[cluster]\n{toml}\n"), {}, {})
    assert caught.value.key == key
