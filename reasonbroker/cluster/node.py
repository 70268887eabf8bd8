"""One cluster node: a client-side broker, a worker-side broker and the bridge (docs/cluster.md).

    async with ClusterNode(config) as node:      # NATS connected, stream and buckets checked
        await node.serve()                       # until node.shutdown()

`config.cluster` says where NATS is. The config's client listeners go to the
client-side broker, whose journal is the JetStream stream (store.py); its
worker listeners to the worker-side broker (an ordinary in-memory one). Each
also listens on a Unix socket in a private directory, where the bridge's two
peers connect. A `both` listener cannot be split between them and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from ..core.limits import ListenerRole
from ..daemon.broker import Broker
from ..daemon.config import ClusterConfig, Config, ListenerConfig
from .bridge import Bridge
from .requests import Requests
from .store import JetStreamStore
from .wire import Names

_log = structlog.get_logger("reasonbroker.cluster")
_T = TypeVar("_T")

STREAM_DUPLICATE_WINDOW_S = 120.0  # a resent RUN within this is deduplicated by the server
CONNECT_TIMEOUT_S = 10.0  # joining: NATS must answer within this
# Joining: JetStream may be reachable but not serving yet (a cluster still electing its
# meta leader after a restart, a server busy catching up): its API requests then time
# out or answer 503. The node retries them, backing off, for this long before giving up.
JOIN_TIMEOUT_S = 60.0
JOIN_REQUEST_TIMEOUT_S = 5.0  # one JetStream API request while joining


class ClusterError(Exception):
    """The cluster cannot be joined; the message says which NATS, stream or setting."""


class ClusterNode:
    def __init__(self, config: Config) -> None:
        if config.cluster is None:
            raise ValueError("ClusterNode needs config.cluster")
        both = [lc.url for lc in config.listeners if lc.role is ListenerRole.BOTH]
        if both:
            raise ClusterError(
                f"a cluster node listens for clients and workers apart; "
                f"the both listener {both[0]} cannot be used (give it as --client and --worker)"
            )
        self.config = config
        self.cluster: ClusterConfig = config.cluster
        self.names = Names(self.cluster.prefix)
        self.node = self.cluster.node
        self.nc: Any = None
        self.bridge: Bridge | None = None
        self.requests: Requests | None = None
        self.client_side: Broker | None = None
        self.worker_side: Broker | None = None
        self._dir: Path | None = None
        self._entered: list[Broker] = []
        self.join_retries = 0  # JetStream API requests retried while joining

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> ClusterNode:
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def _start(self) -> None:
        import nats.js.errors

        cluster = self.cluster
        self.nc = await self._connect()
        js = self.nc.jetstream(timeout=10.0)
        joining = self.nc.jetstream(timeout=JOIN_REQUEST_TIMEOUT_S)
        deadline = asyncio.get_running_loop().time() + JOIN_TIMEOUT_S
        await self._until_served(deadline, "the stream", lambda: self._ensure_stream(joining))
        try:
            await self._until_served(
                deadline,
                f"the bucket {self.names.results}",
                lambda: joining.create_key_value(
                    bucket=self.names.results,
                    history=1,
                    ttl=self.config.limits.result_ttl_s,
                    replicas=cluster.replicas,
                ),
            )
            await self._until_served(
                deadline,
                f"the bucket {self.names.pipelines}",
                lambda: joining.create_key_value(
                    bucket=self.names.pipelines, history=1, replicas=cluster.replicas
                ),
            )
            # Bound to the run-time context (its longer timeout), not the joining one.
            results = await self._until_served(
                deadline, "the results bucket", lambda: js.key_value(self.names.results)
            )
            pipelines = await self._until_served(
                deadline, "the pipelines bucket", lambda: js.key_value(self.names.pipelines)
            )
        except nats.js.errors.Error as exc:
            raise ClusterError(
                f"the buckets {self.names.results} / {self.names.pipelines} cannot be used "
                f"(made by another version, or with other settings?): {exc}"
            ) from None
        self.requests = requests = Requests(self.nc, timeout_s=10.0)
        await requests.start()
        self.bridge = bridge = Bridge(
            self.nc,
            js,
            requests,
            results,
            pipelines,
            self.names,
            self.node,
            self.config.limits,
            cluster.ack_wait_s,
        )
        store = JetStreamStore(
            requests,
            self.names,
            self.node,
            settled=bridge.settled,
            publish_cancel=bridge.publish_cancel,
            new_pipeline=bridge.new_pipeline,
            resent=bridge.resent,
            location=f"nats {', '.join(cluster.servers)} stream {self.names.stream}",
        )
        self._dir = Path(tempfile.mkdtemp(prefix="reasonbroker-node-"))
        self._dir.chmod(0o700)
        outbound = f"unix://{self._dir / 'outbound.sock'}"
        inbound = f"unix://{self._dir / 'inbound.sock'}"
        clients = [lc for lc in self.config.listeners if lc.role is ListenerRole.CLIENTS]
        workers = [lc for lc in self.config.listeners if lc.role is ListenerRole.WORKERS]
        client_config = dataclasses.replace(
            self.config,
            listeners=(*clients, ListenerConfig(outbound, ListenerRole.WORKERS, mode=0o600)),
            journal_path=None,
            cluster=None,
        )
        worker_config = dataclasses.replace(
            self.config,
            listeners=(*workers, ListenerConfig(inbound, ListenerRole.CLIENTS, mode=0o600)),
            journal_path=None,
            metrics_address=None,
            cluster=None,
        )
        self.client_side = Broker(client_config, store=store)
        self.worker_side = Broker(worker_config)
        for broker in (self.client_side, self.worker_side):
            await broker.__aenter__()
            self._entered.append(broker)
        await bridge.start(outbound, inbound, self.client_side, self.worker_side)
        _log.info(
            "cluster_joined",
            node=self.node,
            servers=list(cluster.servers),
            stream=self.names.stream,
            replicas=cluster.replicas,
            ack_wait_s=cluster.ack_wait_s,
        )

    async def _connect(self) -> Any:
        import nats

        cluster = self.cluster
        options: dict[str, Any] = {
            "servers": list(cluster.servers),
            "name": f"reasonbroker-{self.node}",
            "connect_timeout": 5,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "pending_size": 64 << 20,
            "error_cb": _on_error,
            "disconnected_cb": _on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if cluster.credentials is not None:
            options["user_credentials"] = cluster.credentials
        if cluster.tls_cafile is not None:
            options["tls"] = ssl.create_default_context(cafile=cluster.tls_cafile)
        try:
            # Bounded: with reconnects on, nats-py would try the first connect forever.
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await nats.connect(**options)
        except TimeoutError:
            why = f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
        except Exception as exc:
            why = str(exc) or type(exc).__name__
        raise ClusterError(f"cannot reach NATS at {', '.join(cluster.servers)}: {why}")

    async def _until_served(
        self, deadline: float, what: str, request: Callable[[], Awaitable[_T]]
    ) -> _T:
        """`request()`, retried with backoff while JetStream does not serve it yet (a
        timeout, no responders, 503), until `deadline`; then a ClusterError naming it."""
        import nats.errors
        import nats.js.errors

        loop = asyncio.get_running_loop()
        delay = 0.2
        while True:
            try:
                return await request()
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
            ) as exc:
                why = f"{type(exc).__name__}: {exc}"
            left = deadline - loop.time()
            if left <= 0:
                raise ClusterError(
                    f"JetStream at {', '.join(self.cluster.servers)} did not serve {what} "
                    f"within {JOIN_TIMEOUT_S:g} s (last: {why}); is JetStream enabled, "
                    "and does the NATS cluster have a quorum?"
                )
            self.join_retries += 1
            _log.warning("cluster_join_retry", what=what, reason=why, retry_in_s=delay)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)

    async def _ensure_stream(self, js: Any) -> None:
        import nats.js.errors
        from nats.js.api import RetentionPolicy, StorageType

        name, subjects = self.names.stream, [self.names.jobs_wildcard]
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(
                    name=name,
                    subjects=subjects,
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                    num_replicas=self.cluster.replicas,
                    duplicate_window=STREAM_DUPLICATE_WINDOW_S,
                )
            except nats.js.errors.ServiceUnavailableError:
                raise  # JetStream not serving yet: _until_served retries it
            except nats.js.errors.Error as exc:
                raise ClusterError(f"cannot create the stream {name}: {exc}") from None
            return
        except nats.js.errors.ServiceUnavailableError:
            raise  # JetStream not serving yet (a 503 as the quorum comes back): retried
        except nats.js.errors.Error as exc:
            raise ClusterError(f"cannot read the stream {name}: {exc}") from None
        got = info.config
        wrong = []
        if list(got.subjects or []) != subjects:
            wrong.append(f"subjects {got.subjects} (want {subjects})")
        if getattr(got.retention, "value", got.retention) != RetentionPolicy.WORK_QUEUE.value:
            wrong.append(f"retention {got.retention} (want workqueue)")
        if got.num_replicas != self.cluster.replicas:
            wrong.append(f"replicas {got.num_replicas} (want {self.cluster.replicas})")
        if wrong:
            # Reported, never changed: it may be another deployment's stream.
            raise ClusterError(
                f"the stream {name} exists with other settings: {'; '.join(wrong)}; "
                "change [cluster] to match, or set another cluster.prefix"
            )

    async def serve(self) -> None:
        assert self.client_side is not None and self.worker_side is not None
        await asyncio.gather(self.client_side.serve(), self.worker_side.serve())

    def shutdown(self, force: bool = False) -> None:
        if self.bridge is not None:
            self.bridge.stop_fetching()
        for broker in (self.worker_side, self.client_side):
            if broker is not None:
                broker.shutdown(force)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        if self.bridge is not None:
            await self.bridge.close()
        for broker in reversed(self._entered):
            with contextlib.suppress(Exception):
                await broker.__aexit__(None, None, None)
        self._entered.clear()
        if self.requests is not None:
            await self.requests.close()
        if self.nc is not None:
            # Everything the node wrote was awaited (publishes, creates, acks)
            # or is best effort (core NATS events): close, no drain.
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _on_reconnected(self) -> None:
        _log.warning("cluster_nats_reconnected")
        if self.bridge is not None:
            self.bridge.reconnected()

    # -- what tests and the CLI read -----------------------------------------------------

    def address(self, role: str) -> str:
        broker = self.client_side if role == "client" else self.worker_side
        assert broker is not None, "the node is not running"
        return broker.address(role)


async def _on_error(exc: Exception) -> None:
    _log.warning("cluster_nats_error", error=str(exc) or type(exc).__name__)


async def _on_disconnected() -> None:
    _log.warning("cluster_nats_disconnected")
