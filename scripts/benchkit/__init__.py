"""The bench behind `scripts/bench`: reasonbroker against gearmand and nats-server,
side by side, in one run.

One load generator and one echo worker serve every system; only a thin
protocol adapter differs per system (adapters/: reasonbroker native msgpack,
reasonbroker-json, the Gearman binary protocol, the NATS text protocol). Each
broker is started here on free loopback ports and waited for by connecting;
workers run in separate processes (scripts/bench with the hidden
`--role worker`), so the generator never steals their event loop.

Per cell and system: jobs/s (closed loop: K jobs in flight, spread over the
client connections, each answer immediately replaced), p50/p99 latency per job
at the client, broker CPU per job (utime+stime from /proc/PID/stat over the
measured window / jobs), broker peak RSS (VmHWM, reset per cell through
/proc/PID/clear_refs where allowed). Open-loop cells send at a fixed rate,
the same for every system (half the slowest system's closed-loop peak), and
measure latency from each job's *scheduled* send time, so a stalled broker
cannot hide its stall (no coordinated omission).

Results: one table on stdout, progress on stderr, JSON in --json (default
bench-results.json). Traffic goes to 127.0.0.1 only; every loop is bounded in
count and time.

The modules, each readable alone (imports run down this list, never up; the
adapters name loadgen.Gen in annotations only):

    cli.py        flags and their defaults; runs the worker role or a mode, writes --json
    modes/        one module per mode: grid.py (the default comparison), scale.py (--scale)
    report.py     meta, each cell's median repeat, reasonbroker / peer ratios, the table
    loadgen.py    the generator (Gen), Cell and Run, closed- and open-loop runs, measure
    worker.py     the `--role worker` process: one adapter worker, steered over stdin
    adapters/     one module per protocol: its framing, client and worker; base.py the
                  two base classes; __init__ the factories by system name
    processes.py  brokers and worker processes: start, wait for, stop; peer binaries
    procfs.py     CPU and RSS readings from /proc
    common.py     system names, host, pipeline, paths, log, payload, the loop runner
"""
