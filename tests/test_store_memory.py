"""The in-memory store: nothing kept, nothing held back, every call a no-op."""

from __future__ import annotations

from reasonbroker.daemon.store.base import Accepted, Ended, Recovered
from reasonbroker.daemon.store.memory import MemoryStore


async def test_memory_store_keeps_nothing_and_holds_nothing() -> None:
    calls: list[object] = []
    store = MemoryStore()
    assert (store.durable, store.location) == (False, None)
    recovered = store.open(0.0, calls.append, calls.append)
    assert recovered == Recovered(pending=[], ended=[], next_seq=1)
    store.accept(Accepted(b"c" * 16, 1, "p", None, 0, None, None, 1, False, 0.0))
    store.dispatch(b"c" * 16, 1)
    store.requeue(b"c" * 16, 1)
    store.end(Ended(b"c" * 16, "p", "OK", None, None, None, 1, 0.0, 1.0))
    store.forget([b"c" * 16])
    # The mark equals the committed number (0): the broker holds no packet back.
    assert (store.mark(), store.backlog()) == (0, 0)
    store.flush()
    await store.close()
    assert calls == []  # no commit or trouble is ever reported
