"""fasta2a on reasonbroker: an A2A server whose tasks run on remote workers.

    pip install 'reasonbroker[fasta2a]'

`ReasonbrokerBroker` is the `fasta2a.broker.Broker` of the A2A server's
process (FastA2A(broker=...)): each task becomes a RUN of the agent's
pipeline, with the task's params as its variables and a cookie made from the
task id; tasks/cancel becomes a CANCEL; what the workers publish comes back as
PROGRESS and goes onto the server's event bus in order, so message/stream
clients see it live. `ReasonbrokerWorkerBroker` is the broker of a fasta2a
`Worker` in another process or machine: a reasonbroker worker connection
whose RUNs and CANCELs its `receive_task_operations` yields, several at once
(`capacity`), each RUN answered when its operation ends.

What reasonbroker does not carry: fasta2a's `Storage`. The server and every
worker must share one (a database: see examples/fasta2a_workers/storage.py).

Nothing in reasonbroker imports this package; it needs the `fasta2a` extra.
"""

from __future__ import annotations

try:
    import fasta2a as _fasta2a  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reasonbroker.integrations.fasta2a needs fasta2a: pip install 'reasonbroker[fasta2a]'"
    ) from exc

from ._common import task_cookie
from .server import ReasonbrokerBroker
from .worker import ReasonbrokerWorkerBroker

__all__ = ["ReasonbrokerBroker", "ReasonbrokerWorkerBroker", "task_cookie"]
