"""The command line: `reasonbroker serve`, `submit`, `job`, `status` and `worker`.

It owns the process. This is the one place that reads the real environment,
configures logging, picks the event loop, installs signal handlers and
chooses the exit status: 0 after a clean shutdown, 1 when a listener cannot
be bound, 2 on a configuration error (and on a usage error, as click does).
`submit` and `job` exit with a status per result code (`SUBMIT_EXIT`),
`status` with `STATUS_EXIT_*`; the shell worker's per-job logic lives in
`cmdworker.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, TypeVar

import click

from . import COMPILED
from ._version import __version__
from .core.errors import ConfigError
from .core.packets import ResultCode
from .daemon.config import LOG_LEVELS, Config, LogFormat, check_exposure, load_config
from .daemon.log import configure, get_logger
from .daemon.malloc import keep_freed_memory

EXIT_OK: Final = 0
EXIT_LISTEN_FAILED: Final = 1
EXIT_CONFIG: Final = 2
# What a shell reports for a process ended by SIGINT; used when Ctrl-C comes
# before our handlers are in place.
EXIT_INTERRUPTED: Final = 130

# load_config names a bad override by its key; the user typed a flag. Used
# only for errors in the flags alone: a bad `log.level` in the TOML file is
# named `log.level` (issue 19, item 7).
_FLAG_OF_KEY = {
    "listeners.clients": "--client",
    "listeners.workers": "--worker",
    "listeners.both": "--both",
    "log.level": "--log-level",
    "log.format": "--log-format",
    "uvloop": "--no-uvloop",
    "metrics_address": "--metrics",
    "journal.path": "--journal",
    "journal.sync": "--journal-sync",
    "cluster.servers": "--cluster",
    "cluster.node": "--node",
}


class _Stoppable(Protocol):
    def shutdown(self, force: bool = False) -> None: ...


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__,
    prog_name="reasonbroker",
    message="%(prog)s %(version)s" + (" (compiled)" if COMPILED else ""),
)
def main() -> None:
    """reasonbroker: routes jobs from clients to workers, exactly one result per job."""


@main.command(short_help="Run the broker (SIGTERM drains, then exits).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="TOML configuration file (default: $REASONBROKER_CONFIG, else none).",
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="URL",
    help="Listen for clients at URL (repeatable; replaces the client listeners).",
)
@click.option(
    "--worker",
    "workers",
    multiple=True,
    metavar="URL",
    help="Listen for workers at URL (repeatable; replaces the worker listeners).",
)
@click.option(
    "--both",
    "boths",
    multiple=True,
    metavar="URL",
    help=(
        "Listen for clients and workers at URL (repeatable; replaces the both listeners, "
        "and the default ones: --both URL alone is that one listener)."
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Lowest level logged (default: info).",
)
@click.option(
    "--log-format",
    type=click.Choice([fmt.value for fmt in LogFormat], case_sensitive=False),
    help="auto (the default): console on a terminal, JSON otherwise.",
)
@click.option(
    "--no-uvloop", is_flag=True, help="Use asyncio's own event loop even if uvloop is installed."
)
@click.option(
    "--metrics",
    "metrics_address",
    metavar="ADDRESS",
    help='Serve Prometheus metrics at host:port (IPv6 "[::1]:9464"), GET /metrics, and the '
    "read-only dashboard at / (docs/dashboard.md). Default: off.",
)
@click.option(
    "--journal",
    "journal",
    metavar="PATH|none",
    help=(
        "The SQLite journal that keeps accepted jobs across restarts "
        "(default: $XDG_STATE_HOME/reasonbroker/journal.sqlite3); none: in memory only."
    ),
)
@click.option(
    "--journal-sync",
    type=click.Choice(["full", "normal"], case_sensitive=False),
    help="full (default): ACCEPTED jobs survive power loss; normal: a broker crash only.",
)
@click.option(
    "--cluster",
    "cluster",
    metavar="URLS",
    help="Join a cluster on NATS JetStream at these nats:// URLs (comma-separated); "
    "needs the cluster extra.",
)
@click.option(
    "--node", metavar="NAME", help="This node's name in the cluster (default: host name)."
)
@click.pass_context
def serve(
    ctx: click.Context,
    config_path: Path | None,
    clients: tuple[str, ...],
    workers: tuple[str, ...],
    boths: tuple[str, ...],
    log_level: str | None,
    log_format: str | None,
    no_uvloop: bool,
    metrics_address: str | None,
    journal: str | None,
    journal_sync: str | None,
    cluster: str | None,
    node: str | None,
) -> None:
    """Run the broker until SIGTERM or SIGINT (a second one ends the drain at once)."""
    overrides: dict[str, Any] = {}
    for key, urls in (
        ("listeners.clients", clients),
        ("listeners.workers", workers),
        ("listeners.both", boths),
    ):
        if urls:
            overrides[key] = list(urls)
    if log_level is not None:
        overrides["log.level"] = log_level
    if log_format is not None:
        overrides["log.format"] = log_format
    if no_uvloop:
        overrides["uvloop"] = False
    if metrics_address is not None:
        overrides["metrics_address"] = metrics_address
    if journal is not None:
        overrides["journal.path"] = journal
    if journal_sync is not None:
        overrides["journal.sync"] = journal_sync
    if cluster is not None:
        overrides["cluster.servers"] = cluster
    if node is not None:
        overrides["cluster.node"] = node
    try:
        # The flags alone first, so that an error in them names the flag and
        # one in the file or the environment names its own key or variable.
        load_config(None, {}, overrides)
    except ConfigError as exc:
        _config_error(exc, _FLAG_OF_KEY.get(exc.key, exc.key))
    try:
        config = load_config(config_path, os.environ, overrides)
        check_exposure(config)
        configure(config.log_level, config.log_format)
        status = _run(config)
    except ConfigError as exc:
        _config_error(exc, exc.key)
    ctx.exit(status)


def _config_error(exc: ConfigError, key: str) -> NoReturn:
    click.echo(f"reasonbroker: config error: {key}: {exc.message}", err=True)
    raise SystemExit(EXIT_CONFIG)


class _UsageError(click.ClickException):
    """A usage error as one line on stderr ("reasonbroker: ..."), exit status 2."""

    exit_code = EXIT_CONFIG

    def show(self, file: Any = None) -> None:
        click.echo(f"reasonbroker: {self.message}", err=True)


def _check_broker_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--broker: a transport URL, checked before anything connects."""
    import transports

    try:
        transports.parse_url(value)
    except ValueError as exc:
        raise _UsageError(f"--broker: {exc}") from None
    return value


def _check_broker_urls(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """--broker for submit and job: one transport URL, or several, comma-separated."""
    urls = tuple(url.strip() for url in value.split(",") if url.strip())
    if not urls:
        raise _UsageError("--broker: no URL given")
    for url in urls:
        _check_broker_url(ctx, param, url)
    return urls


def _run(config: Config) -> int:
    log = get_logger()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    loop_name = "asyncio"
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop_unavailable")
        else:
            loop_factory = uvloop.new_event_loop
            loop_name = "uvloop"
    # Big payloads churn glibc's heap; keep what is freed for reuse (daemon/malloc.py).
    malloc_tuned = keep_freed_memory()
    log.info(
        "starting",
        version=__version__,
        loop=loop_name,
        pid=os.getpid(),
        compiled=COMPILED,
        malloc_tuned=malloc_tuned,
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(config))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _serve(config: Config) -> int:
    if config.cluster is not None:
        return await _serve_node(config)
    from .daemon.broker import Broker
    from .daemon.store.base import JournalError

    log = get_logger()
    bound = False
    try:
        async with Broker(config) as broker:
            bound = True  # the broker logs one "listening" line per bound address
            remove_handlers = _install_signal_handlers(broker)
            try:
                await broker.serve()
            finally:
                remove_handlers()
    except JournalError as exc:
        # Corrupt, not a journal, newer schema, not writable, locked: say which
        # file and why, in one line, and touch nothing (exit 2, as a bad config).
        log.error("journal_unusable", why=str(exc))
        click.echo(f"reasonbroker: journal: {exc}", err=True)
        return EXIT_CONFIG
    except OSError as exc:
        if bound:
            raise
        log.error("listen_failed", error=str(exc))
        # The transports' message says "cannot listen on URL: why"; say it once,
        # without str()'s "[Errno 98]" in front.
        why = exc.strerror or str(exc)
        click.echo(
            f"reasonbroker: {why if 'cannot listen' in why else f'cannot listen: {why}'}", err=True
        )
        return EXIT_LISTEN_FAILED
    log.info("stopped")
    return EXIT_OK


async def _serve_node(config: Config) -> int:
    """`serve --cluster`: one node of a cluster on NATS JetStream (docs/cluster.md)."""
    log = get_logger()
    try:
        from .cluster.node import ClusterError, ClusterNode
    except ImportError as exc:
        click.echo(
            "reasonbroker: --cluster needs the cluster extra "
            f"(pip install 'reasonbroker[cluster]'): {exc}",
            err=True,
        )
        return EXIT_CONFIG
    if config.journal_path is not None:
        log.info("journal_unused", why="a cluster node keeps its jobs in JetStream")
    try:
        async with ClusterNode(config) as node:
            remove_handlers = _install_signal_handlers(node)
            try:
                await node.serve()
            finally:
                remove_handlers()
    except ClusterError as exc:
        log.error("cluster_unusable", why=str(exc))
        click.echo(f"reasonbroker: cluster: {exc}", err=True)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        click.echo(f"reasonbroker: {exc.strerror or exc}", err=True)
        return EXIT_LISTEN_FAILED
    log.info("stopped")
    return EXIT_OK


def _install_signal_handlers(broker: _Stoppable) -> Callable[[], None]:
    """First SIGTERM/SIGINT: graceful drain; any later one: end the drain now.

    Returns the function that removes the handlers again.
    """
    log = get_logger()
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info("shutdown_requested", signal=sig.name)
            broker.shutdown()
        else:
            log.warning("shutdown_forced", signal=sig.name)
            broker.shutdown(force=True)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            # Windows, or not the main thread: Ctrl-C still raises KeyboardInterrupt.
            log.warning("signal_handler_unavailable", signal=sig.name, error=str(exc))
        else:
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


# --------------------------------------------------------------------------- submit

DEFAULT_CLIENT_URL: Final = "tcp://127.0.0.1:51500"
DEFAULT_WORKER_URL: Final = "tcp://127.0.0.1:51510"

# `submit`'s exit status: 0 for OK, one status per common non-OK result code,
# EXIT_CONNECT_FAILED when the broker cannot be reached, EXIT_OTHER_RESULT for
# the remaining codes. 1 stays "generic error" and 2 "usage error" (click's).
SUBMIT_EXIT: Final[dict[ResultCode, int]] = {
    ResultCode.OK: EXIT_OK,
    ResultCode.PROCESSOR_EXCEPTION: 3,
    ResultCode.TIMEOUT: 4,
    ResultCode.CANCELLED: 5,
    ResultCode.NO_CAPACITY: 6,
    ResultCode.WORKER_WENT_AWAY: 7,
    ResultCode.BROKER_WENT_AWAY: 8,
}
EXIT_CONNECT_FAILED: Final = 9
EXIT_OTHER_RESULT: Final = 10
EXIT_GENERIC: Final = 1
# `job`: the broker knows no job by that cookie (never, or its result expired).
# Not 10: a script polling `reasonbroker job` must tell "no such job" apart.
EXIT_NO_SUCH_JOB: Final = 12

_LOG_FORMATS: Final = [fmt.value for fmt in LogFormat]


def _parse_vars(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--vars: JSON text, or @FILE holding JSON (@- reads stdin)."""
    if value is None:
        return None
    if value.startswith("@"):
        name = value[1:]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {name!r}: {exc}") from exc
        where = f" in {name!r}"
    else:
        text, where = value, ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if not where and text and text.lstrip()[:1] not in ("{", "[", '"'):
            # `--vars hello`: the shell ate no quotes the JSON needs.
            hint = f"; to send the string {text!r}, quote it for JSON and the shell: " + (
                f"--vars '{json.dumps(text)}'" if "'" not in text else "--vars @FILE"
            )
        raise click.BadParameter(f"not valid JSON{where}: {exc}{hint}") from exc


def _render(value: Any) -> str:
    """JSON text when `value` is JSON-serialisable, else its repr."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


F = TypeVar("F", bound=Callable[..., Any])


def _log_options(default_level: str) -> Callable[[F], F]:
    """--log-level and --log-format for the job commands (serve's come from config layers)."""

    def decorate(f: F) -> F:
        f = click.option(
            "--log-format",
            type=click.Choice(_LOG_FORMATS, case_sensitive=False),
            default="auto",
            help="auto (the default): console on a terminal, JSON otherwise.",
        )(f)
        return click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            default=default_level,
            show_default=True,
        )(f)

    return decorate


def _broker_list_option(f: F) -> F:
    """--broker URL[,URL...] and --resume, shared by submit and job."""
    f = click.option(
        "--resume",
        is_flag=True,
        help=(
            "If the connection is lost, reconnect (cycling through the URLs) and collect "
            "the job's result; on by default with more than one URL."
        ),
    )(f)
    return click.option(
        "--broker",
        "urls",
        default=DEFAULT_CLIENT_URL,
        show_default=True,
        metavar="URL[,URL...]",
        callback=_check_broker_urls,
        help="The broker's client address; several, comma-separated, to resume across them.",
    )(f)


@main.command(short_help="Run one job and print its result.")
@click.argument("pipeline")
@_broker_list_option
@click.option(
    "--vars",
    "variables",
    callback=_parse_vars,
    metavar="JSON|@FILE",
    help=(
        "The job's variables: JSON text (a string quoted: '\"hello\"'), or @FILE to read "
        "it from FILE (@- for stdin). Without --vars they are null."
    ),
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Deadline, enforced by the broker (result TIMEOUT).",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Do not wait for the result: print the cookie, exit 0 once the broker accepted the job.",
)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs sooner.")
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    metavar="N",
    help="Attempts if workers go away mid-job (default: the broker's).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON object {rc, result, error, cookie}."
)
@_log_options(default_level="warning")
@click.pass_context
def submit(
    ctx: click.Context,
    pipeline: str,
    urls: tuple[str, ...],
    resume: bool,
    variables: Any,
    timeout: float | None,
    detach: bool,
    priority: int,
    max_attempts: int | None,
    as_json: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Run one job of PIPELINE and print its result.

    PROGRESS values go to stderr, one per line; the result goes to stdout as
    JSON (repr when it is not JSON-serialisable). The exit status tells the
    result code: 0 OK, 3 PROCESSOR_EXCEPTION, 4 TIMEOUT, 5 CANCELLED,
    6 NO_CAPACITY, 7 WORKER_WENT_AWAY, 8 BROKER_WENT_AWAY, 9 broker
    unreachable, 10 any other code. Ctrl-C cancels the job. --detach prints
    only the job's cookie, once the broker has accepted it (a refusal exits
    with its status).
    """
    if not pipeline:
        raise click.BadParameter("must not be empty", param_hint="PIPELINE")
    configure(log_level, LogFormat(log_format))
    job = _SubmitJob(
        urls,
        resume or len(urls) > 1,
        pipeline,
        variables,
        timeout,
        detach,
        priority,
        max_attempts,
        as_json,
    )
    ctx.exit(asyncio.run(job.main()))


class _SubmitJob:
    def __init__(
        self,
        urls: tuple[str, ...],
        resume: bool,
        pipeline: str,
        variables: Any,
        timeout: float | None,
        detach: bool,
        priority: int,
        max_attempts: int | None,
        as_json: bool,
    ) -> None:
        self.urls = urls
        self.resume = resume
        self.pipeline = pipeline
        self.variables = variables
        self.timeout = timeout
        self.detach = detach
        self.priority = priority
        self.max_attempts = max_attempts
        self.as_json = as_json
        self.cookie: str | None = None

    async def main(self) -> int:
        """Run the job; SIGINT/SIGTERM cancel it (the client sends CANCEL)."""
        task = asyncio.current_task()
        assert task is not None
        received: list[signal.Signals] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig)
            if len(received) == 1:
                task.cancel()

        remove = _add_signal_handlers(on_signal)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if not received:
                raise
            task.uncancel()
            click.echo(f"reasonbroker: {received[0].name}: job cancelled", err=True)
            return 128 + received[0].value
        finally:
            remove()

    async def _run(self) -> int:
        from .core.errors import EncodeError
        from .sdk.client import Client
        from .sdk.errors import BrokerConnectionError, JobError

        client = Client(self.urls, name="reasonbroker submit", resume=self.resume)
        try:
            try:
                await client.connect()
            except BrokerConnectionError as exc:  # its message says it could not connect
                return self._fail(None, str(exc), EXIT_CONNECT_FAILED)
            handle = await client.submit(
                self.pipeline,
                self.variables,
                timeout=self.timeout,
                priority=self.priority,
                max_attempts=self.max_attempts,
                detach=self.detach,
                on_progress=self._progress,
            )
            self.cookie = str(handle.cookie)
            try:
                value = await handle
            except asyncio.CancelledError:
                await handle.cancel()  # Ctrl-C: the job is not wanted any more
                raise
        except JobError as exc:
            status = SUBMIT_EXIT.get(exc.rc, EXIT_OTHER_RESULT)
            return self._fail(exc.rc, str(exc), status, exc.error)
        except EncodeError as exc:
            return self._fail(None, f"cannot send the variables: {exc}", EXIT_GENERIC)
        finally:
            await client.close()
        if self.as_json:
            out = {"rc": "OK", "result": _jsonable(value), "error": None, "cookie": self.cookie}
            click.echo(json.dumps(out, ensure_ascii=False))
        elif self.detach:
            click.echo(self.cookie)  # only the cookie: `id=$(reasonbroker submit --detach ...)`
        else:
            click.echo(_render(value))
        return EXIT_OK

    def _progress(self, value: Any) -> None:
        click.echo(_render(value), err=True)

    def _fail(self, rc: ResultCode | None, message: str, status: int, error: Any = None) -> int:
        if self.as_json:
            out = {
                "rc": None if rc is None else rc.value,
                "result": None,
                "error": message if rc is None else error,
                "cookie": self.cookie,
            }
            click.echo(json.dumps(out, ensure_ascii=False))
        click.echo(f"reasonbroker: {message}", err=True)
        return status


# --------------------------------------------------------------------------- job


@main.command(short_help="Show a job's state by its cookie, or wait for its result.")
@click.argument("cookie")
@_broker_list_option
@click.option(
    "--wait", is_flag=True, help="Wait for the job's result (ATTACH) and exit as submit does."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="With --wait: print a JSON object {rc, result, error, cookie}.",
)
@_log_options(default_level="warning")
@click.pass_context
def job(
    ctx: click.Context,
    cookie: str,
    urls: tuple[str, ...],
    resume: bool,
    wait: bool,
    as_json: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Print the state of the job COOKIE as one JSON object.

    {"cookie", "state" (queued, running or ended), "pipeline", "attempts",
    "rc", "error"}: rc and error are set once the job has ended. --wait
    attaches to the job instead and prints its result as submit does, with
    submit's exit statuses (PROGRESS values on stderr). 12: the broker knows
    no job by this cookie (never did, or its result has expired); 9 broker
    unreachable.
    """
    import uuid

    try:
        uuid.UUID(cookie)
    except ValueError:
        raise _UsageError(f"job: not a job cookie (a UUID): {cookie!r}") from None
    configure(log_level, LogFormat(log_format))
    query = _JobQuery(urls, resume or len(urls) > 1, cookie, wait, as_json)
    ctx.exit(asyncio.run(query.main()))


class _JobQuery:
    def __init__(
        self, urls: tuple[str, ...], resume: bool, cookie: str, wait: bool, as_json: bool
    ) -> None:
        self.urls = urls
        self.resume = resume
        self.cookie = cookie
        self.wait = wait
        self.as_json = as_json

    async def main(self) -> int:
        """Ask (or wait); SIGINT/SIGTERM stop waiting and leave the job alone."""
        task = asyncio.current_task()
        assert task is not None
        received: list[signal.Signals] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig)
            if len(received) == 1:
                task.cancel()

        remove = _add_signal_handlers(on_signal)
        try:
            return await self._run()
        except asyncio.CancelledError:
            if not received:
                raise
            task.uncancel()
            click.echo(
                f"reasonbroker: {received[0].name}: stopped waiting (the job runs on)", err=True
            )
            return 128 + received[0].value
        finally:
            remove()

    async def _run(self) -> int:
        from .sdk.client import Client
        from .sdk.errors import BrokerConnectionError, CookieNotFound, JobError

        client = Client(self.urls, name="reasonbroker job", resume=self.resume)
        try:
            try:
                await client.connect()
            except BrokerConnectionError as exc:
                return self._fail(None, str(exc), EXIT_CONNECT_FAILED)
            if not self.wait:
                info = await client.job(self.cookie)
                click.echo(json.dumps(info.as_dict(), ensure_ascii=False))
                return EXIT_OK
            handle = await client.attach(self.cookie, on_progress=_progress_to_stderr)
            value = await handle
        except CookieNotFound:
            message = f"no job with cookie {self.cookie} (unknown, or its result has expired)"
            return self._fail(ResultCode.COOKIE_NOT_FOUND, message, EXIT_NO_SUCH_JOB, message)
        except JobError as exc:
            status = SUBMIT_EXIT.get(exc.rc, EXIT_OTHER_RESULT)
            return self._fail(exc.rc, str(exc), status, exc.error)
        finally:
            await client.close()
        if self.as_json:
            out = {"rc": "OK", "result": _jsonable(value), "error": None, "cookie": self.cookie}
            click.echo(json.dumps(out, ensure_ascii=False))
        else:
            click.echo(_render(value))
        return EXIT_OK

    def _fail(self, rc: ResultCode | None, message: str, status: int, error: Any = None) -> int:
        if self.as_json and self.wait:
            out = {
                "rc": None if rc is None else rc.value,
                "result": None,
                "error": message if rc is None else error,
                "cookie": self.cookie,
            }
            click.echo(json.dumps(out, ensure_ascii=False))
        click.echo(f"reasonbroker: {message}", err=True)
        return status


def _progress_to_stderr(value: Any) -> None:
    click.echo(_render(value), err=True)


# --------------------------------------------------------------------------- status

# `status`'s exit status besides EXIT_OK, EXIT_CONNECT_FAILED (9) and EXIT_GENERIC (1).
EXIT_UNAUTHORIZED: Final = 11
ENV_ADMIN_TOKEN: Final = "REASONBROKER_ADMIN_TOKEN"
_STATUS_TIMEOUT_S: Final = 10.0


@main.command(short_help="Show the broker's workers, clients and queue.")
@click.option(
    "--broker",
    "url",
    default=DEFAULT_CLIENT_URL,
    show_default=True,
    metavar="URL",
    callback=_check_broker_url,
    help="A broker listener that has an admin_token.",
)
@click.option(
    "--token",
    envvar=ENV_ADMIN_TOKEN,
    show_envvar=True,
    metavar="TOKEN",
    help="The listener's admin_token.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.pass_context
def status(ctx: click.Context, url: str, token: str | None, as_json: bool) -> None:
    """Show the broker's workers, clients, queue depth by pipeline and uptime.

    Exit status: 0 shown, 9 broker unreachable, 11 unauthorized (no admin
    token on that listener, or a wrong or missing one), 1 any other failure.
    """
    configure("warning", LogFormat.AUTO)
    ctx.exit(asyncio.run(_status(url, token or None, as_json)))


async def _status(url: str, token: str | None, as_json: bool) -> int:
    from .core import protocol as p
    from .sdk.errors import BrokerConnectionError, Unauthorized
    from .sdk.peer import Peer, library_logger

    hello = p.Hello(role=p.Role.ADMIN, token=token, name="reasonbroker status")
    try:
        log = library_logger("reasonbroker.status")
        peer = await Peer.connect(url, hello, log=log, connect_timeout=_STATUS_TIMEOUT_S)
    except Unauthorized as exc:
        click.echo(f"reasonbroker: unauthorized: {exc}", err=True)
        return EXIT_UNAUTHORIZED
    except BrokerConnectionError as exc:  # ConnectTimeout too; it says what failed
        click.echo(f"reasonbroker: {exc}", err=True)
        return EXIT_CONNECT_FAILED
    answer: dict[str, Any] | None = None
    failure = "the broker closed the connection"
    try:
        await peer.send(p.Status())
        async with asyncio.timeout(_STATUS_TIMEOUT_S):
            async for packet in peer.packets():
                if isinstance(packet, p.Status) and packet.status is not None:
                    answer = packet.status
                    break
                if isinstance(packet, p.Result):
                    failure = f"{packet.rc.value}: {packet.error}"
                    break
    except TimeoutError:
        failure = f"no STATUS within {_STATUS_TIMEOUT_S} s"
    except BrokerConnectionError as exc:
        failure = str(exc)
    finally:
        await peer.aclose()
    if answer is None:
        click.echo(f"reasonbroker: status failed: {failure}", err=True)
        return EXIT_GENERIC
    if isinstance(answer.get("uptime_s"), float):
        answer["uptime_s"] = round(answer["uptime_s"], 3)  # no 12.300000001
    if as_json:
        click.echo(json.dumps(answer, ensure_ascii=False, sort_keys=True))
    else:
        click.echo(format_status(answer))
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    """The human form of a STATUS answer: a summary line and three tables."""

    def text(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(str(v) for v in value) if value else "-"
        return str(value)

    def table(title: str, headers: list[str], rows: list[list[Any]]) -> list[str]:
        cells = [headers, *([text(v) for v in row] for row in rows)]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        lines = [f"{title} ({len(rows)})"]
        for row in cells:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return lines

    lines = [
        f"uptime {_duration(status.get('uptime_s', 0.0))}, "
        f"running {status.get('running', 0)}, queued {status.get('queued', 0)}"
        + (", compiled" if status.get("compiled") else ""),
        "",
    ]
    workers = status.get("workers", [])
    lines += table(
        "workers",
        ["conn", "name", "address", "pipelines", "capacity", "busy"],
        [
            [w.get(k) for k in ("conn", "name", "address", "pipelines", "capacity", "busy")]
            for w in workers
        ],
    )
    lines.append("")
    clients = status.get("clients", [])
    lines += table(
        "clients",
        ["conn", "name", "address", "in_flight"],
        [[c.get(k) for k in ("conn", "name", "address", "jobs")] for c in clients],
    )
    lines.append("")
    queue = status.get("queue", {})
    lines += table("queue", ["pipeline", "queued"], [[k, v] for k, v in sorted(queue.items())])
    cluster = status.get("cluster")
    if isinstance(cluster, dict):
        # A cluster node: its client side's one worker is the bridge; the cluster's
        # workers are per node, below, and this node's own in the worker side's table.
        lines.append("")
        lines.append(
            f"cluster: node {cluster.get('node')}, stream {cluster.get('stream')}, "
            f"fetched {cluster.get('fetched', 0)}, redelivered {cluster.get('redelivered', 0)}, "
            f"duplicates dropped {cluster.get('duplicates_dropped', 0)}"
        )
        node_keys = ["node", "workers", "slots", "busy", "running", "pipelines"]
        nodes = cluster.get("nodes", [])
        lines += table("nodes", node_keys, [[n.get(k) for k in node_keys] for n in nodes])
        lines.append("")
        keys = ["conn", "name", "pipelines", "capacity", "busy"]
        local = cluster.get("workers", [])
        lines += table("this node's workers", keys, [[w.get(k) for k in keys] for w in local])
        pending = cluster.get("pending", {})
        if pending:
            lines.append("")
            rows = [[k, v] for k, v in sorted(pending.items())]
            lines += table("stream pending", ["pipeline", "jobs"], rows)
    return "\n".join(lines)


def _duration(seconds: Any) -> str:
    """12.3 s, 5 min 3 s, 2 h 5 min, 3 d 4 h: no float noise, no more digits than help."""
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        return "? s"
    if total < 60:
        return f"{total:.1f} s"
    whole = int(total)
    for unit, size, sub, sub_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "min", 60),
        ("min", 60, "s", 1),
    ):
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // sub_size} {sub}"
    return f"{total:.1f} s"  # unreachable


# --------------------------------------------------------------------------- worker


@main.command(short_help="Serve pipelines by running a command per job.")
@click.option(
    "--pipeline",
    "pipelines",
    multiple=True,
    required=True,
    metavar="NAME",
    help="A pipeline to serve (repeatable).",
)
@click.option(
    "--capacity",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Commands run at once.",
)
@click.option(
    "--broker",
    "urls",
    default=DEFAULT_WORKER_URL,
    show_default=True,
    metavar="URL[,URL...]",
    callback=_check_broker_urls,
    help=(
        "The broker's worker address; several, comma-separated (a cluster's nodes), "
        "are tried in turn on each reconnect."
    ),
)
@click.option(
    "--name",
    metavar="NAME",
    help="This worker's name in `reasonbroker status` (default: HOST:PID).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Kill a command running longer (its job ends PROCESSOR_EXCEPTION).",
)
@_log_options(default_level="info")
@click.argument("command", nargs=-1, required=True)
@click.pass_context
def worker(
    ctx: click.Context,
    pipelines: tuple[str, ...],
    capacity: int,
    urls: tuple[str, ...],
    name: str | None,
    timeout: float | None,
    log_level: str,
    log_format: str,
    command: tuple[str, ...],
) -> None:
    """Serve pipelines by running COMMAND once per job (like `gearman -w -f NAME -- CMD`).

    The job's variables go to stdin (a string as is, bytes raw, else JSON);
    stdout, less one trailing newline, is the result. A non-zero exit is
    PROCESSOR_EXCEPTION with the status and stderr's tail. The command sees
    REASONBROKER_PIPELINE and REASONBROKER_COOKIE. A cancelled job's process
    group gets SIGTERM, then SIGKILL. SIGTERM/SIGINT: stop taking jobs, let
    running ones finish, exit 0; a second signal exits at once.
    """
    if any(not pipeline for pipeline in pipelines):
        raise click.BadParameter("must not be empty", param_hint="--pipeline")
    _check_command(command[0])
    if name is None:
        name = f"{socket.gethostname()}:{os.getpid()}"
    configure(log_level, LogFormat(log_format))
    ctx.exit(asyncio.run(_serve_commands(urls, pipelines, capacity, command, timeout, name)))


def _check_command(program: str) -> None:
    """At start-up, not at the first job: the command must exist and be executable."""
    if os.sep not in program:
        if shutil.which(program) is None:
            raise _UsageError(f"worker: command not found: {program!r} (not on PATH)")
        return
    path = Path(program)
    if not path.exists():
        raise _UsageError(f"worker: command not found: {program!r} (no such file)")
    if path.is_dir() or not os.access(path, os.X_OK):
        raise _UsageError(f"worker: command not executable: {program!r}")


async def _serve_commands(
    urls: tuple[str, ...],
    pipelines: tuple[str, ...],
    capacity: int,
    command: tuple[str, ...],
    timeout: float | None,  # noqa: ASYNC109 (per command, passed on)
    name: str,
) -> int:
    from .sdk.cmdworker import CommandHandler
    from .sdk.errors import JobError
    from .sdk.worker import Worker

    log = get_logger()
    handlers = {name: CommandHandler(command, name, timeout=timeout) for name in pipelines}
    serving = Worker(urls, handlers=handlers, capacity=capacity, name=name)
    task = asyncio.current_task()
    assert task is not None
    received = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info("stop_requested", signal=sig.name, running=serving.running_jobs)
            serving.stop()
        elif received == 2:
            log.warning("stop_forced", signal=sig.name, running=serving.running_jobs)
            task.cancel()  # cancels the running jobs: their process groups are killed

    remove = _add_signal_handlers(on_signal)
    try:
        await serving.run()
    except asyncio.CancelledError:
        if received < 2:
            raise
        task.uncancel()
        return EXIT_INTERRUPTED
    except JobError as exc:  # Unauthorized
        click.echo(f"reasonbroker: {exc}", err=True)
        return EXIT_GENERIC
    finally:
        remove()
    return EXIT_OK


def _add_signal_handlers(
    on_signal: Callable[[signal.Signals], None],
) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to `on_signal` on the running loop; returns the undo."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove
