"""The echo worker process (`scripts/bench --role worker`, started by
processes.start_workers): one adapter worker connection, registered, then steered by lines
on stdin (`release`, `depth N`, `count`) until EOF.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .adapters import make_worker
from .adapters.gearman import GearmanWorker
from .common import HOST, log


async def worker_main(args: argparse.Namespace) -> int:
    """`--role worker`: connect, register, print `ready`; `release` on stdin ends a hold;
    `--conns N` holds N such worker connections in this one process (the --scale workers phase);
    EOF on stdin (the generator went away) ends the process."""
    loop = asyncio.get_running_loop()
    protos = [
        make_worker(args.system, args.capacity, args.hold, args.gearman_depth, args.serve)
        for _ in range(max(1, args.conns))
    ]
    proto = protos[0]
    try:
        for start in range(0, len(protos), 200):  # --scale workers: many per process
            batch = protos[start : start + 200]
            await asyncio.gather(
                *(loop.create_connection(lambda p=p: p, HOST, args.port) for p in batch)
            )
        await asyncio.wait_for(asyncio.gather(*(p.ready for p in protos)), 60)
    except (OSError, TimeoutError) as exc:
        log(f"worker ({args.system}): could not register: {exc!r}")
        return 1
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line_task = asyncio.ensure_future(reader.readline())
        await asyncio.wait([line_task, proto.lost], return_when=asyncio.FIRST_COMPLETED)
        if not line_task.done():
            line_task.cancel()
            break  # the broker went away
        line = line_task.result()
        if not line:
            break
        words = line.split()
        if words == [b"release"]:
            for p in protos:
                p.release()
        elif words == [b"count"]:  # jobs answered so far (the durable mode's drain)
            print(sum(p.jobs for p in protos), flush=True)
        elif len(words) == 2 and words[0] == b"depth":
            if isinstance(proto, GearmanWorker):
                proto.set_depth(int(words[1]))
            print("ok", flush=True)
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    return 0
