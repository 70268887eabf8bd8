"""Bench modes, one module each; cli.mode_of picks one from the command line.

    grid   the default: every system over the grid of cells (closed loop K x W, the big
           payload, open loop), systems interleaved per repeat; the comparison table
    scale  --scale: reasonbroker alone, connections held, jobs queued, client counts
    jetstream  --cluster-baseline: the bare JetStream work-queue pattern with nats-py on
           1 and 3 nats-servers, and its building blocks (issue #14, docs/cluster.md)
    cluster  --cluster: reasonbroker cluster nodes (1, 2) vs the bare JetStream pattern (#14)
    durable  --durable: the SQLite journal (sync full, normal) vs in-memory vs gearmand's
           libsqlite3 queue, then 100k detached jobs accepted, SIGKILL, restart, drain (#13)

A mode module has `main(args) -> report | None`: it starts what it needs (brokers and
workers through ..processes, load through ..loadgen), prints its table on stdout and
returns the JSON document cli.py writes to --json (None: nothing could run, exit 1).
Adding one is a module here, its flag in cli.parse_args, its line in
cli.mode_of and its name in report.meta's "mode".
"""
