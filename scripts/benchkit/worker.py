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
    EOF on stdin (the generator went away) ends the process."""
    loop = asyncio.get_running_loop()
    proto = make_worker(args.system, args.capacity, args.hold, args.gearman_depth)
    try:
        await loop.create_connection(lambda: proto, HOST, args.port)
        await asyncio.wait_for(proto.ready, 20)
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
            proto.release()
        elif words == [b"count"]:  # jobs answered so far (the durable mode's drain)
            print(proto.jobs, flush=True)
        elif len(words) == 2 and words[0] == b"depth":
            if isinstance(proto, GearmanWorker):
                proto.set_depth(int(words[1]))
            print("ok", flush=True)
    if proto.transport is not None:
        proto.transport.close()
    return 0
