"""Chaos modes that need more than scripts/chaos's in-process broker.

crash.py: `scripts/chaos --crash` SIGKILLs a `reasonbroker serve` process with
a journal, several times, under load from resuming SDK clients and workers,
and checks that every ACCEPTED job ended exactly once (docs/durability.md).

cluster.py: `scripts/chaos --cluster` SIGKILLs a reasonbroker cluster node and a
nats-server of three under the same kind of load, and checks the same
(docs/cluster.md).
"""
