"""Configuration: one frozen `Config`, loaded in layers; its `Limits` are core/limits.py's.

Layers, later wins: built-in defaults, a TOML file, `REASONBROKER_*`
environment variables, command-line flags (`load_config`). An unknown key or a
bad value raises `ConfigError` naming the key; the CLI turns that into exit
status 2. config.example.toml mirrors every key here with its default.

Key names, as they appear in a `ConfigError`:

- TOML: dotted paths, `uvloop`, `metrics_address`, `log.level`, `log.format`, `limits.<field>`,
  `listeners[<0-based index>].url` / `.role` / `.certfile` / `.keyfile` /
  `.cafile` / `.verify_client` / `.token` / `.token_file` / `.admin_token` /
  `.admin_token_file` / `.mode`; a file
  that cannot be read or parsed is named by its path.
- environment: the variable, `REASONBROKER_<LIMITS FIELD UPPERCASE>`,
  `REASONBROKER_LOG_LEVEL`, `REASONBROKER_LOG_FORMAT`, `REASONBROKER_UVLOOP`,
  `REASONBROKER_METRICS_ADDRESS`,
  `REASONBROKER_CLIENT` / `_WORKER` / `_BOTH` (comma-separated URLs that
  replace the listeners of that role), `REASONBROKER_CLIENT_TOKEN` /
  `_WORKER_TOKEN` / `_BOTH_TOKEN` (the token of every listener of that role,
  applied after every layer), `REASONBROKER_CONFIG` (the TOML file when no
  path is given). `REASONBROKER_ADMIN_TOKEN` is `reasonbroker status`'s, and
  ignored here (admin tokens are set in the TOML file only);
  `REASONBROKER_PURE` picks the build at import (reasonbroker/_native.py).
- overrides (flags): the same dotted keys as TOML, plus `listeners.clients`,
  `listeners.workers`, `listeners.both` (a sequence of URLs that replaces the
  listeners of that role; `both` ones, from a flag or the environment, also
  replace the built-in default listeners, see `_replace_role`).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ..core.errors import ConfigError
from ..core.limits import Limits, ListenerRole


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket. The TLS fields are for tls:// URLs only, where certfile
    and keyfile are required; `verify_client` demands a client certificate signed
    by a CA in `cafile` (mutual TLS).

    `token` (or `token_file`, read here and stripped of its trailing newline;
    not both) makes every peer open with HELLO carrying that token. The token
    is never in a repr. `admin_token` (or `admin_token_file`, same rules) lets
    peers that open with HELLO role admin and that token ask for STATUS, in
    addition to the listener's own role. `mode` (e.g. 0o660) sets a unix://
    socket file's permissions."""

    url: str
    role: ListenerRole
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    verify_client: bool = False
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    mode: int | None = None
    admin_token: str | None = field(default=None, repr=False)
    admin_token_file: str | None = None
    # Serve this non-loopback listener without a token anyway (see check_exposure).
    allow_unauthenticated: bool = False
    # token_file's content, read at construction (so also by dataclasses.replace).
    _file_token: str | None = field(default=None, init=False, repr=False)
    _file_admin_token: str | None = field(default=None, init=False, repr=False)

    @property
    def is_tls(self) -> bool:
        return self.url.lower().startswith("tls://")

    @property
    def required_token(self) -> str | None:
        """The token peers must send in HELLO, from `token` or `token_file`."""
        return self.token if self.token is not None else self._file_token

    @property
    def required_admin_token(self) -> str | None:
        """The token admin peers must send in HELLO, from `admin_token` or `admin_token_file`."""
        return self.admin_token if self.admin_token is not None else self._file_admin_token

    def __post_init__(self) -> None:
        if "://" not in self.url:
            raise ConfigError("listeners.url", f"{self.url!r} is not a URL (tcp://host:port)")
        file_token = _check_token(self.token, self.token_file, "token")
        object.__setattr__(self, "_file_token", file_token)
        file_admin = _check_token(self.admin_token, self.admin_token_file, "admin_token")
        object.__setattr__(self, "_file_admin_token", file_admin)
        if not isinstance(self.allow_unauthenticated, bool):
            raise ConfigError(
                "listeners.allow_unauthenticated",
                f"must be true or false, got {self.allow_unauthenticated!r}",
            )
        if self.mode is not None:
            if isinstance(self.mode, bool) or not isinstance(self.mode, int):
                raise ConfigError(
                    "listeners.mode", f"must be an integer (0o660), got {self.mode!r}"
                )
            if not 0 <= self.mode <= 0o777:
                raise ConfigError(
                    "listeners.mode", f"must be within 0o000..0o777, got {self.mode:#o}"
                )
            if urlsplit(self.url).scheme.lower() != "unix":
                raise ConfigError(
                    "listeners.mode", f"is only for unix:// listeners, not {self.url!r}"
                )
        if not self.is_tls:
            # A certificate on a plaintext listener means the operator believes
            # that traffic is encrypted: say it is not rather than ignore it.
            for name in _TLS_KEYS:
                if getattr(self, name) not in (None, False):
                    raise ConfigError(
                        f"listeners.{name}", f"is only for tls:// listeners, not {self.url!r}"
                    )
            return
        for name in ("certfile", "keyfile"):
            if getattr(self, name) is None:
                raise ConfigError(
                    f"listeners.{name}",
                    f"a tls:// listener ({self.url}) needs certfile and keyfile "
                    "(TLS listeners are configured in the TOML file)",
                )
        if self.verify_client and self.cafile is None:
            raise ConfigError(
                "listeners.cafile",
                "verify_client needs cafile: the CAs that sign client certificates",
            )


def _check_token(token: str | None, token_file: str | None, name: str) -> str | None:
    """Validate a listener's `name` / `name`_file pair; the file's token, if a file is given."""
    if token is not None:
        if token_file is not None:
            raise ConfigError(f"listeners.{name}_file", f"{name} and {name}_file are exclusive")
        if not isinstance(token, str) or not token:
            # Never the value: it may be a mistyped secret.
            raise ConfigError(f"listeners.{name}", "must be a non-empty string")
        return None
    if token_file is None:
        return None
    path = token_file
    key = f"listeners.{name}_file"
    if not isinstance(path, str) or not path:
        raise ConfigError(key, f"must be a file path, got {path!r}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path!r} is not UTF-8") from None
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(key, f"{path!r} is empty")
    return text


# The ListenerConfig fields that only a tls:// listener takes.
_TLS_KEYS = ("certfile", "keyfile", "cafile", "verify_client")


DEFAULT_LISTENERS = (
    ListenerConfig("tcp://127.0.0.1:51500", ListenerRole.CLIENTS),
    ListenerConfig("tcp://127.0.0.1:51510", ListenerRole.WORKERS),
)


class LogFormat(enum.StrEnum):
    AUTO = "auto"  # console on a terminal, JSON otherwise
    CONSOLE = "console"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: the node joins a cluster on NATS JetStream (docs/cluster.md).

    `servers`: NATS URLs (nats://, tls://); `node`: this node's name, unique in
    the cluster (results for its clients are sent to it by name); `replicas`:
    of the job stream and the results bucket (3 for a 3-server NATS cluster;
    1 for one server); `ack_wait_s`: how long a job may run on a node without a
    sign of life before JetStream gives it to another node (a dead node's jobs
    are re-run after at most this); `credentials`: a NATS .creds file;
    `tls_cafile`: the CA for tls:// servers; `prefix`: the names of the
    stream, consumers, bucket and subjects start with it, so that several
    clusters can share one NATS.
    """

    servers: tuple[str, ...]
    node: str
    replicas: int = 1
    ack_wait_s: float = 30.0
    credentials: str | None = None
    tls_cafile: str | None = None
    prefix: str = "rb"

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("cluster.servers", "at least one NATS URL is needed")
        for url in self.servers:
            parts = urlsplit(url)
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ConfigError(
                    "cluster.servers", f"must be nats://host:port or tls://host:port, got {url!r}"
                )
        if not _NAME.fullmatch(self.node):
            raise ConfigError(
                "cluster.node", f"must be 1-64 letters, digits, - or _, got {self.node!r}"
            )
        if not _NAME.fullmatch(self.prefix) or len(self.prefix) > 16:
            raise ConfigError(
                "cluster.prefix", f"must be 1-16 letters, digits, - or _, got {self.prefix!r}"
            )
        if not 1 <= self.replicas <= 5:
            raise ConfigError("cluster.replicas", f"must be 1 to 5, got {self.replicas}")
        if not 1.0 <= self.ack_wait_s <= 3600.0:
            raise ConfigError("cluster.ack_wait_s", f"must be 1 to 3600 s, got {self.ack_wait_s}")


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def default_node_name() -> str:
    """The node name when none is given: the host name, cut to what a name may hold."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return name or "node"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...] = DEFAULT_LISTENERS
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    log_format: LogFormat = LogFormat.AUTO
    uvloop: bool = True
    # "host:port" (IPv6 as "[::1]:9464") of the Prometheus /metrics endpoint; None = off.
    metrics_address: str | None = None
    # The SQLite journal (docs/durability.md); None = in memory, nothing survives.
    # A Config made in code has none; `load_config` (what `serve` uses) defaults
    # to `default_journal_path()`.
    journal_path: str | None = None
    # "full": an ACCEPTED job survives power loss (fsync at every commit);
    # "normal": it survives the broker process dying, not the machine.
    journal_sync: Literal["full", "normal"] = "full"
    # A cluster node on NATS JetStream (docs/cluster.md); None: a single broker.
    cluster: ClusterConfig | None = None

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ConfigError("listeners", "at least one listener is needed")
        if self.metrics_address is not None:
            split_host_port(self.metrics_address, "metrics_address")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError("log_level", f"{self.log_level!r} is not one of {_LOG_LEVELS}")
        if self.journal_sync not in _SYNCS:
            raise ConfigError("journal.sync", f"must be one of {', '.join(_SYNCS)}")


_SYNCS = ("full", "normal")


def default_journal_path(env: Mapping[str, str]) -> str:
    """Where `serve` keeps its journal when nothing says otherwise:
    $XDG_STATE_HOME/reasonbroker/journal.sqlite3, else
    ~/.local/state/reasonbroker/journal.sqlite3 (the XDG base directory spec's
    place for state that should survive a restart)."""
    state = env.get("XDG_STATE_HOME") or str(
        Path(env.get("HOME") or Path.home()) / ".local" / "state"
    )
    return str(Path(state) / "reasonbroker" / "journal.sqlite3")


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_LEVELS = _LOG_LEVELS


def is_loopback(url: str) -> bool:
    """Whether a listener URL is reachable from this host only: unix://, or a
    tcp:// / tls:// host that is a loopback address (127.0.0.0/8, ::1) or
    "localhost". A wildcard (0.0.0.0, ::) or any other name is not."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":
        return True
    host = parts.hostname
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(config: Config) -> None:
    """Refuse to serve a listener that any host can reach and anyone can join.

    Like Redis's protected mode: a listener on a non-loopback address needs a
    token (a tls:// one with verify_client authenticates by certificate
    instead), or `allow_unauthenticated = true` in its TOML table; otherwise
    ConfigError naming the listener (`reasonbroker serve` exits 2).
    """
    for index, lc in enumerate(config.listeners):
        if lc.allow_unauthenticated or lc.required_token is not None or is_loopback(lc.url):
            continue
        if lc.is_tls and lc.verify_client:
            continue
        raise ConfigError(
            "listeners",
            f"{lc.url} ({lc.role.value}, listener {index}) is on a non-loopback address "
            "without a token: anyone who can reach it may join; set token or token_file "
            "(or REASONBROKER_<ROLE>_TOKEN), listen on 127.0.0.1, or set "
            "allow_unauthenticated = true in its [[listeners]] table",
        )


def split_host_port(address: str, key: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ("::1", 9464) from "[::1]:9464";
    ConfigError naming `key` for anything else. Port 0 picks a free port."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an unbracketed IPv6 address: its port is ambiguous
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(key, f"must be host:port (IPv6 as [::1]:9464), got {address!r}")
    return host, int(port_text)


# --------------------------------------------------------------------------- loader

ENV_PREFIX = "REASONBROKER_"
ENV_CONFIG = "REASONBROKER_CONFIG"
# Read by `reasonbroker status` (the admin token it sends), not by the broker.
ENV_ADMIN_TOKEN = "REASONBROKER_ADMIN_TOKEN"
# Read at import (reasonbroker/_native.py): run the source, not the compiled build.
ENV_PURE = "REASONBROKER_PURE"

# Limits set in the [journal] table (they bound what the journal keeps), not [limits].
_JOURNAL_LIMITS = ("result_ttl_s", "result_max", "result_max_bytes")
# The scalar settings by canonical (TOML dotted) key, with the kind of value each takes.
_SCALARS: dict[str, str] = {
    "uvloop": "bool",
    "metrics_address": "address",
    "log.level": "level",
    "log.format": "format",
    **{
        f"limits.{f.name}": "int" if f.type == "int" else "float"
        for f in fields(Limits)
        if f.name not in _JOURNAL_LIMITS
    },
    "journal.path": "journal",
    "journal.sync": "sync",
    "cluster.servers": "urls",
    "cluster.node": "text",
    "cluster.replicas": "int",
    "cluster.ack_wait_s": "float",
    "cluster.credentials": "file",
    "cluster.tls_cafile": "file",
    "cluster.prefix": "text",
    **{
        f"journal.{f.name}": "int" if f.type == "int" else "float"
        for f in fields(Limits)
        if f.name in _JOURNAL_LIMITS
    },
}
_CONFIG_FIELDS = {
    "uvloop": "uvloop",
    "metrics_address": "metrics_address",
    "log.level": "log_level",
    "log.format": "log_format",
    "journal.path": "journal_path",
    "journal.sync": "journal_sync",
}
_TOP_KEYS = ("uvloop", "metrics_address", "log", "limits", "listeners", "journal", "cluster")
_ROLES = tuple(role.value for role in ListenerRole)
_FORMATS = tuple(fmt.value for fmt in LogFormat)
_AUTH_KEYS = (
    "token",
    "token_file",
    "admin_token",
    "admin_token_file",
    "mode",
    "allow_unauthenticated",
)
_LISTENER_KEYS = ("url", "role", *_TLS_KEYS, *_AUTH_KEYS)
_REQUIRED_LISTENER_KEYS = ("url", "role")
_ROLE_ENV = {
    ListenerRole.CLIENTS: "REASONBROKER_CLIENT",
    ListenerRole.WORKERS: "REASONBROKER_WORKER",
    ListenerRole.BOTH: "REASONBROKER_BOTH",
}
_TOKEN_ENV = {role: f"{name}_TOKEN" for role, name in _ROLE_ENV.items()}
_ROLE_OVERRIDE = {role: f"listeners.{role.value}" for role in ListenerRole}
_KINDS_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "level": f"one of {', '.join(_LOG_LEVELS)}",
    "format": f"one of {', '.join(_FORMATS)}",
    "address": "host:port (IPv6 as [::1]:9464), or empty for off",
    "journal": "a file path, or none (no journal: jobs live in memory only)",
    "sync": "full or normal",
    "urls": "NATS URLs (a list, or one string of comma-separated URLs)",
    "text": "a string",
    "file": "the path of a file that exists",
}
_ENV_TRUE = ("true", "1")
_ENV_FALSE = ("false", "0")


def env_name(key: str) -> str:
    """The variable of a scalar key: `limits.queue_limit` -> REASONBROKER_QUEUE_LIMIT."""
    return ENV_PREFIX + key.removeprefix("limits.").replace(".", "_").upper()


_SCALAR_BY_ENV = {env_name(key): key for key in _SCALARS}


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a value came from, so that a later validation error names it."""

    key: str  # the name a ConfigError carries
    where: str = ""  # appended to the message, e.g. " (in /etc/reasonbroker.toml)"


def load_config(path: Path | None, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Config:
    """The Config of defaults <- `path` (or $REASONBROKER_CONFIG) <- `env` <- `overrides`.

    `env` is usually `os.environ`: every `REASONBROKER_*` name in it must be a
    known one. `overrides` are the command-line flags, keyed as in the module
    docstring; an absent key is not overridden. Raises `ConfigError`.
    """
    values: dict[str, Any] = {}
    origins: dict[str, _Origin] = {}
    listeners = list(DEFAULT_LISTENERS)

    if path is None and env.get(ENV_CONFIG):
        path = Path(env[ENV_CONFIG])
    if path is not None:
        listeners = _apply_toml(path, values, origins, listeners)
    tokens: dict[ListenerRole, str] = {}
    listeners = _apply_env(env, values, origins, listeners, tokens)
    listeners = _apply_overrides(overrides, values, origins, listeners)
    # After every layer, so that listeners given by flags get the token too.
    listeners = [
        replace(lc, token=tokens[lc.role], token_file=None) if lc.role in tokens else lc
        for lc in listeners
    ]

    limits = {k.removeprefix("limits."): v for k, v in values.items() if k.startswith("limits.")}
    for name in _JOURNAL_LIMITS:
        if f"journal.{name}" in values:
            limits[name] = values[f"journal.{name}"]
    try:
        checked = Limits(**limits)
    except ConfigError as exc:
        # Limits names the bare field; name the layer that set it instead.
        section = "journal" if exc.key in _JOURNAL_LIMITS else "limits"
        origin = origins.get(f"{section}.{exc.key}", _Origin(f"{section}.{exc.key}"))
        raise ConfigError(origin.key, exc.message + origin.where) from None
    kwargs: dict[str, Any] = {"listeners": tuple(listeners), "limits": checked}
    kwargs["journal_path"] = default_journal_path(env)
    for key, name in _CONFIG_FIELDS.items():
        if key in values:
            kwargs[name] = values[key]
    if values.get("cluster.servers"):
        kwargs["cluster"] = _cluster(values, origins)
    # What Config itself still checks is "at least one listener" (key "listeners").
    return Config(**kwargs)


def _cluster(values: Mapping[str, Any], origins: Mapping[str, _Origin]) -> ClusterConfig:
    """The [cluster] settings (any layer), checked; errors name where each came from."""
    settings = {
        name: values[f"cluster.{name}"]
        for name in ("servers", "node", "replicas", "ack_wait_s", "credentials", "tls_cafile")
        if f"cluster.{name}" in values
    }
    if "cluster.prefix" in values:
        settings["prefix"] = values["cluster.prefix"]
    settings.setdefault("node", default_node_name())
    try:
        return ClusterConfig(**settings)
    except ConfigError as exc:
        origin = origins.get(exc.key, _Origin(exc.key))
        raise ConfigError(origin.key, exc.message + origin.where) from None


# --------------------------------------------------------------------------- layers


def _apply_toml(
    path: Path,
    values: dict[str, Any],
    origins: dict[str, _Origin],
    listeners: list[ListenerConfig],
) -> list[ListenerConfig]:
    doc = _read_toml(path)
    where = f" (in {path})"
    _reject_unknown(doc, _TOP_KEYS, "", where)
    for section in ("log", "limits", "journal", "cluster"):
        if section not in doc:
            continue
        table = doc[section]
        if not isinstance(table, dict):
            raise ConfigError(section, f"must be a table ([{section}]), got {table!r}{where}")
        allowed = [k.removeprefix(f"{section}.") for k in _SCALARS if k.startswith(f"{section}.")]
        _reject_unknown(table, allowed, f"{section}.", where)
        for name, value in table.items():
            key = f"{section}.{name}"
            values[key] = _check(_SCALARS[key], value, key, where)
            origins[key] = _Origin(key, where)
    for key in ("uvloop", "metrics_address"):
        if key in doc:
            values[key] = _check(_SCALARS[key], doc[key], key, where)
            origins[key] = _Origin(key, where)
    if "listeners" in doc:
        listeners = _toml_listeners(doc["listeners"], where)
    return listeners


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fp:
            return tomllib.load(fp)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # TOML files are UTF-8 by definition.
        raise ConfigError(str(path), f"not UTF-8: {exc}") from None


def _toml_listeners(raw: object, where: str) -> list[ListenerConfig]:
    if not isinstance(raw, list):
        raise ConfigError("listeners", f"must be an array of tables ([[listeners]]){where}")
    result: list[ListenerConfig] = []
    for index, item in enumerate(raw):
        prefix = f"listeners[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(prefix, f"must be a table with url and role, got {item!r}{where}")
        _reject_unknown(item, _LISTENER_KEYS, f"{prefix}.", where)
        for name in _REQUIRED_LISTENER_KEYS:
            if name not in item:
                raise ConfigError(f"{prefix}.{name}", f"is required{where}")
        role = item["role"]
        if not isinstance(role, str) or role not in _ROLES:
            raise ConfigError(
                f"{prefix}.role", f"must be one of {', '.join(_ROLES)}, got {role!r}{where}"
            )
        url = item["url"]
        if isinstance(url, str) and not url.lower().startswith("tls://"):
            # Even `verify_client = false`: TLS settings on a plaintext
            # listener say the operator thinks it is encrypted.
            for name in _TLS_KEYS:
                if name in item:
                    raise ConfigError(
                        f"{prefix}.{name}", f"is only for tls:// listeners, not {url!r}{where}"
                    )
        tls: dict[str, Any] = {
            name: _tls_value(item, name, f"{prefix}.{name}", where) for name in _TLS_KEYS
        }
        auth = {name: item[name] for name in _AUTH_KEYS if name in item}
        result.append(_listener(url, ListenerRole(role), prefix, where, **tls, **auth))
    return result


def _tls_value(item: Mapping[str, object], name: str, key: str, where: str) -> object:
    """A listener's TLS setting from TOML: a file that exists, or verify_client's bool."""
    if name == "verify_client":
        return _check("bool", item.get(name, False), key, where)
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a file path, got {value!r}{where}")
    # Checked now so that a typo is a configuration error (exit status 2)
    # naming the key, not a failed listener at startup.
    if not Path(value).is_file():
        raise ConfigError(key, f"no such file: {value!r}{where}")
    return value


def _apply_env(
    env: Mapping[str, str],
    values: dict[str, Any],
    origins: dict[str, _Origin],
    listeners: list[ListenerConfig],
    tokens: dict[ListenerRole, str],
) -> list[ListenerConfig]:
    """Apply `env`; the *_TOKEN variables go into `tokens`, by role."""
    roles_by_env = {name: role for role, name in _ROLE_ENV.items()}
    roles_by_token_env = {name: role for role, name in _TOKEN_ENV.items()}
    # Sorted so that, with several bad variables, the error is always the same one.
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_ADMIN_TOKEN, ENV_PURE):
            continue
        text = env[name]
        if name in _SCALAR_BY_ENV:
            key = _SCALAR_BY_ENV[name]
            values[key] = _parse_env(_SCALARS[key], text, name)
            origins[key] = _Origin(name)
        elif name in roles_by_env:
            # Empty items are skipped, so "" removes every listener of that role.
            urls = [url.strip() for url in text.split(",") if url.strip()]
            new = [_listener(url, roles_by_env[name], "", "", key=name) for url in urls]
            listeners = _replace_role(listeners, roles_by_env[name], new)
        elif name in roles_by_token_env:
            if not text:
                raise ConfigError(name, "must not be empty")  # never echo a secret
            tokens[roles_by_token_env[name]] = text
        else:
            raise ConfigError(name, "unknown environment variable")
    return listeners


def _apply_overrides(
    overrides: Mapping[str, Any],
    values: dict[str, Any],
    origins: dict[str, _Origin],
    listeners: list[ListenerConfig],
) -> list[ListenerConfig]:
    roles_by_key = {key: role for role, key in _ROLE_OVERRIDE.items()}
    for key, value in overrides.items():
        if key in _SCALARS:
            values[key] = _check(_SCALARS[key], value, key, "")
            origins[key] = _Origin(key)
        elif key in roles_by_key:
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ConfigError(key, f"must be a sequence of URLs, got {value!r}")
            new = [_listener(url, roles_by_key[key], "", "", key=key) for url in value]
            listeners = _replace_role(listeners, roles_by_key[key], new)
        else:
            raise ConfigError(key, "unknown key")
    return listeners


# --------------------------------------------------------------------------- values


def _reject_unknown(
    table: Mapping[str, object], allowed: Sequence[str], prefix: str, where: str
) -> None:
    for name in table:
        if name not in allowed:
            raise ConfigError(f"{prefix}{name}", f"unknown key{where}")


def _check(kind: str, value: object, key: str, where: str) -> object:
    """`value` as the setting `key` takes it, or ConfigError. No coercion from strings."""
    match kind:
        case "int":
            # bool is an int subclass: `queue_limit = true` is a mistake, not 1.
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        case "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    return float(value)
        case "bool":
            if isinstance(value, bool):
                return value
        case "level":
            if isinstance(value, str) and value.lower() in _LOG_LEVELS:
                return value.lower()
        case "format":
            if isinstance(value, str) and value.lower() in _FORMATS:
                return LogFormat(value.lower())
        case "journal":
            if isinstance(value, str) and value.strip().lower() in ("", "none"):
                return None
            if isinstance(value, str):
                return value
        case "sync":
            if isinstance(value, str) and value.lower() in _SYNCS:
                return value.lower()
        case "urls":
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, list | tuple) and all(isinstance(u, str) for u in items):
                return tuple(u.strip() for u in items if u.strip())
        case "text":
            if isinstance(value, str) and value:
                return value
        case "file":
            if isinstance(value, str) and value and Path(value).is_file():
                return value
        case "address":
            # Empty turns metrics off, so a later layer can undo an earlier one.
            if isinstance(value, str) and not value.strip():
                return None
            if isinstance(value, str):
                try:
                    split_host_port(value.strip(), key)
                except ConfigError:
                    pass  # the error below also says where the value came from
                else:
                    return value.strip()
    raise ConfigError(key, f"must be {_KINDS_TEXT[kind]}, got {value!r}{where}")


def _parse_env(kind: str, text: str, name: str) -> object:
    """An environment string parsed to the setting's type, or ConfigError naming `name`."""
    value: object = text
    try:
        if kind == "int":
            value = int(text)
        elif kind == "float":
            value = float(text)
    except ValueError:
        raise ConfigError(name, f"must be {_KINDS_TEXT[kind]}, got {text!r}") from None
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered not in _ENV_TRUE + _ENV_FALSE:
            raise ConfigError(name, f"must be true, false, 1 or 0, got {text!r}")
        value = lowered in _ENV_TRUE
    return _check(kind, value, name, "")


def _listener(
    url: object,
    role: ListenerRole,
    prefix: str,
    where: str,
    *,
    key: str | None = None,
    **tls: Any,
) -> ListenerConfig:
    """A ListenerConfig whose errors name `key` (an environment variable or a
    flag, which set the URL only) or else `prefix`.<field> (a TOML table)."""
    if not isinstance(url, str):
        raise ConfigError(key or f"{prefix}.url", f"must be a URL string, got {url!r}{where}")
    try:
        return ListenerConfig(url, role, **tls)
    except ConfigError as exc:
        field_key = prefix + exc.key.removeprefix("listeners")
        raise ConfigError(key or field_key, exc.message + where) from None


def _replace_role(
    listeners: list[ListenerConfig], role: ListenerRole, new: list[ListenerConfig]
) -> list[ListenerConfig]:
    """Every listener of `role` replaced by `new`, placed where the first old one was.

    A `both` listener serves clients and workers, so new ones also replace the
    built-in default listeners still in place (there are none once a TOML file
    has [[listeners]]): `--both unix:///tmp/rb.sock` alone is that one listener.
    """

    def replaced(lc: ListenerConfig) -> bool:
        if lc.role is role:
            return True
        return bool(new) and role is ListenerRole.BOTH and any(lc is d for d in DEFAULT_LISTENERS)

    at = next((i for i, lc in enumerate(listeners) if replaced(lc)), len(listeners))
    kept = [lc for lc in listeners[:at] if not replaced(lc)]
    rest = [lc for lc in listeners[at:] if not replaced(lc)]
    return kept + new + rest
