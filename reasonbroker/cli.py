"""The command line: `reasonbroker serve`. It owns the process.

This is the one place that reads the real environment, configures logging,
picks the event loop, installs signal handlers and chooses the exit status:
0 after a clean shutdown, 1 when a listener cannot be bound, 2 on a
configuration error (and on a usage error, as click does).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol

import click

from ._version import __version__
from .config import LOG_LEVELS, Config, LogFormat, load_config
from .errors import ConfigError
from .log import configure, get_logger

EXIT_OK: Final = 0
EXIT_LISTEN_FAILED: Final = 1
EXIT_CONFIG: Final = 2
# What a shell reports for a process ended by SIGINT; used when Ctrl-C comes
# before our handlers are in place.
EXIT_INTERRUPTED: Final = 130

# load_config names a bad override by its key; the user typed a flag.
_FLAG_OF_KEY = {
    "listeners.clients": "--client",
    "listeners.workers": "--worker",
    "listeners.both": "--both",
    "log.level": "--log-level",
    "log.format": "--log-format",
    "uvloop": "--no-uvloop",
}


class _Stoppable(Protocol):
    def shutdown(self, force: bool = False) -> None: ...


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reasonbroker", message="%(prog)s %(version)s")
def main() -> None:
    """reasonbroker: routes jobs from clients to workers, exactly one result per job."""


@main.command()
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
    help="Listen for clients at URL (repeatable; replaces the configured client listeners).",
)
@click.option(
    "--worker",
    "workers",
    multiple=True,
    metavar="URL",
    help="Listen for workers at URL (repeatable; replaces the configured worker listeners).",
)
@click.option(
    "--both",
    "boths",
    multiple=True,
    metavar="URL",
    help="Listen for clients and workers at URL (repeatable; replaces the configured ones).",
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
    try:
        config = load_config(config_path, os.environ, overrides)
        configure(config.log_level, config.log_format)
        status = _run(config)
    except ConfigError as exc:
        _config_error(exc)
    ctx.exit(status)


def _config_error(exc: ConfigError) -> NoReturn:
    key = _FLAG_OF_KEY.get(exc.key, exc.key)
    click.echo(f"reasonbroker: config error: {key}: {exc.message}", err=True)
    raise SystemExit(EXIT_CONFIG)


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
    log.info("starting", version=__version__, loop=loop_name, pid=os.getpid())
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(config))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _serve(config: Config) -> int:
    from .broker import Broker

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
    except OSError as exc:
        if bound:
            raise
        log.error("listen_failed", error=str(exc))
        click.echo(f"reasonbroker: cannot listen: {exc}", err=True)
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
