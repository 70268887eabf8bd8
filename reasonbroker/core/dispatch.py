"""Dispatch: the registered workers, picking one, the queues, worker cookies.

Owns the worker list dispatch scans, the least-loaded pick with its batch
affinity (Limits.dispatch_batch_slack), the index of free and idle workers
that replaces the scan from INDEX_FROM workers on, a job's move onto a worker's slot and
off it, the per-pipeline priority queues (lazily deleted entries, compacted
when dead ones outnumber live ones), the index of their heads (so a worker
serving every pipeline finds the best queued job in O(log n), however many
pipelines have jobs), how many workers serve each pipeline (so a worker's
leaving checks only what it served), taking the best queued job a worker
serves, and the broker-made cookie each attempt gets. Whether a job may go
(codecs, answers, endings) is the board's.
"""

from __future__ import annotations

import heapq
from typing import Final

from .deadlines import Deadlines
from .state import Stats, _Conn, _Job, _State

# Worker cookies are the broker's 8-byte prefix and a 64-bit big-endian
# sequence number, made 256 at a time: the numbers k*256 .. k*256+255 share
# their first 15 bytes, so a batch is one repeated stem with its last byte
# set by a single slice assignment; each cookie is then one 16-byte slice.
_WCOOKIE_BATCH: Final = 256
_LOW_BYTES: Final = bytes(range(_WCOOKIE_BATCH))
# Below this many registered workers pick() scans them all (cheaper than keeping the
# index up to date: the scan costs about 0.2 us per worker); from it on, the index of
# idle and free workers is kept and consulted, so a pick costs about the same with
# 10,000 workers as with 40 (scripts/bench --scale, the workers rows).
INDEX_FROM: Final = 32


class Dispatcher:
    __slots__ = (
        "_counted",
        "_deadlines",
        "_free",
        "_free_all",
        "_free_named",
        "_idle_all",
        "_idle_named",
        "_idle_pushes",
        "_index_from",
        "_indexed",
        "_order",
        "_orders",
        "_serve_counts",
        "_serving_all",
        "_stats",
        "_use",
        "_wcookie_at",
        "_wcookie_batch",
        "_wcookie_prefix",
        "_wcookies",
        "batch_slack",
        "batch_worker",
        "dead_in_queues",
        "heads",
        "queued",
        "queues",
        "running",
        "worker_list",
        "workers",
    )

    def __init__(
        self,
        cookie_prefix: bytes,
        batch_slack: float,
        stats: Stats,
        deadlines: Deadlines,
        index_from: int = INDEX_FROM,
    ) -> None:
        self._stats = stats
        self._deadlines = deadlines
        self.workers: dict[int, _Conn] = {}  # registered (capacity > 0)
        # The same workers as a list, for dispatch to scan (rebuilt when a
        # worker registers or goes; iterating a list is cheaper than a dict).
        self.worker_list: list[_Conn] = []
        # The index, kept from INDEX_FROM workers on (_indexed). Workers with a free
        # slot (busy + resting < capacity), those serving every pipeline and per named
        # pipeline: when no worker is idle, pick() compares only these, not every
        # connected worker. Kept exact at every change of a worker's load, capacity or
        # registration (track()).
        self._free: dict[int, set[str] | None] = {}  # worker id -> what it was indexed under
        self._free_all: dict[int, _Conn] = {}
        self._free_named: dict[str, dict[int, _Conn]] = {}
        # Idle workers (nothing busy or resting), so a pick finds the best one without
        # comparing loads: heaps of (last_used, order, push, worker), one for the
        # workers serving every pipeline and one per named pipeline. An idle worker is
        # the least loaded there is, and among idle ones the scan's tie-break (least
        # recently used, then the worker list's order) is the heap's order. Entries are
        # pushed when a worker becomes idle and deleted lazily: one is stale when its
        # worker left, is no longer idle, was used since, or re-joined (its order).
        self._idle_all: list[tuple[int, int, int, _Conn]] = []
        self._idle_named: dict[str, list[tuple[int, int, int, _Conn]]] = {}
        self._idle_pushes = 0
        self._index_from = index_from
        self._indexed = False  # whether the index is kept (len(workers) >= index_from)
        self._orders: dict[int, int] = {}  # worker id -> its place in worker_list's order
        self._order = 0
        self.queues: dict[str, list[tuple[int, int, _Job]]] = {}
        # A heap of (-priority, seq, pipeline) indexing the queues' heads. The
        # invariant: every non-empty queue has an entry whose key is at most
        # its head's (its head's own, or a stale one of a head since taken or
        # cancelled: heads only move back). A stale entry that surfaces is
        # replaced by its queue's real head (see _take_any); the heap is
        # rebuilt when stale entries pile up.
        self.heads: list[tuple[int, int, str]] = []
        # Workers serving every pipeline; per named pipeline, the workers
        # serving it (no key: none); per worker, the set it was counted with.
        self._serving_all = 0
        self._serve_counts: dict[str, int] = {}
        self._counted: dict[int, set[str] | None] = {}
        self.queued = 0  # live entries across all queues
        self.dead_in_queues = 0  # lazily deleted heap entries
        self.running = 0  # jobs holding a worker slot
        self._use = 0  # bumped at each dispatch: a worker's last_used orders equals
        # The worker this batch's last RUN went to (see end_batch).
        self.batch_worker: _Conn | None = None
        self.batch_slack = batch_slack
        self._wcookie_prefix = cookie_prefix
        self._wcookie_batch = 0  # the next batch: sequence numbers from 256 times this
        self._wcookies = self._wcookie_blob()  # the current batch, 16 bytes per cookie
        self._wcookie_at = 16  # where the next one starts in it (0 is never used)

    # -- workers ------------------------------------------------------------------

    def add_worker(self, w: _Conn) -> None:
        if w.id not in self.workers:
            self._order += 1
            self._orders[w.id] = self._order
        self.workers[w.id] = w
        self.worker_list = list(self.workers.values())
        if self._indexed:
            self._unfree(w.id)  # its pipelines may have changed
            self.track(w)
        elif len(self.workers) >= self._index_from:
            self._reindex(True)
        if w.id in self._counted:
            self._uncount(self._counted[w.id])
        # REGISTER replaces w.pipelines with a new set, so this one stays as counted.
        self._counted[w.id] = w.pipelines
        if w.pipelines is None:
            self._serving_all += 1
        else:
            counts = self._serve_counts
            for name in w.pipelines:
                counts[name] = counts.get(name, 0) + 1

    def remove_worker(self, w: _Conn) -> None:
        self.workers.pop(w.id, None)
        self._orders.pop(w.id, None)
        if self._indexed:
            self._unfree(w.id)
            if len(self.workers) < self._index_from // 2:  # hysteresis: no flapping
                self._reindex(False)
        self.worker_list = list(self.workers.values())
        if self.batch_worker is w:
            self.batch_worker = None
        if w.id in self._counted:
            self._uncount(self._counted.pop(w.id))

    def _uncount(self, pipelines: set[str] | None) -> None:
        if pipelines is None:
            self._serving_all -= 1
            return
        counts = self._serve_counts
        for name in pipelines:
            left = counts[name] - 1
            if left:
                counts[name] = left
            else:
                del counts[name]

    def served(self, pipeline: str) -> bool:
        """Whether any registered worker serves `pipeline`, in O(1)."""
        return self._serving_all > 0 or pipeline in self._serve_counts

    def unserved(self, candidates: set[str] | None) -> list[str]:
        """The queued pipelines among `candidates` (None: all) that no worker
        serves any more. A leaving worker passes its own pipelines, the only
        ones it can have left unserved: O(its pipelines), not pipelines x workers."""
        if self._serving_all:
            return []
        queues = self.queues
        counts = self._serve_counts
        if candidates is None or len(candidates) >= len(queues):
            return [
                p for p in queues if p not in counts and (candidates is None or p in candidates)
            ]
        return sorted(p for p in candidates if p in queues and p not in counts)

    def pick(self, pipeline: str) -> tuple[_Conn | None, bool]:
        """The least-loaded worker with a free slot serving `pipeline`, and whether any serves it.

        Load is busy/capacity; among equals the least recently used wins,
        which is round robin. Within a batch the worker the last RUN went to
        is kept while it is within Limits.dispatch_batch_slack of that.
        """
        if not self._indexed:
            return self.pick_scan(pipeline)
        idle = self._idle_best(pipeline)
        if idle is not None:
            return self._stay_or(idle, pipeline), True
        if not self.served(pipeline):
            return None, False
        best: _Conn | None = None
        for free in (self._free_all, self._free_named.get(pipeline)):
            if free is None:
                continue
            for w in free.values():
                # No worker serving it is idle, so every one here was used and no two
                # share a last_used: the order they are met in cannot matter.
                if best is None:
                    best = w
                    continue
                lhs = (w.busy + w.resting) * best.capacity
                rhs = (best.busy + best.resting) * w.capacity
                if lhs < rhs or (lhs == rhs and w.last_used < best.last_used):
                    best = w
        if best is None:
            return None, True
        return self._stay_or(best, pipeline), True

    def pick_scan(self, pipeline: str) -> tuple[_Conn | None, bool]:
        """pick() by scanning every worker: what it does below INDEX_FROM workers (and
        the oracle the tests hold the index to)."""
        best: _Conn | None = None
        best_used = 0
        served = False
        for w in self.worker_list:
            if w.pipelines is not None and pipeline not in w.pipelines:
                continue  # w.serves(pipeline), inline: this runs per worker per RUN
            served = True
            used = w.busy + w.resting
            if used >= w.capacity:
                continue
            if best is None:
                best = w
                best_used = used
                continue
            lhs = used * best.capacity
            rhs = best_used * w.capacity
            if lhs < rhs or (lhs == rhs and w.last_used < best.last_used):
                best = w
                best_used = used
        if best is None:
            return None, served
        return self._stay_or(best, pipeline), served

    def _stay_or(self, best: _Conn, pipeline: str) -> _Conn:
        """The batch's worker instead of `best` while it is within the slack of it."""
        stay = self.batch_worker
        if stay is not None and stay is not best and stay.serves(pipeline):
            used = stay.busy + stay.resting
            if used < stay.capacity and (
                (used - self.batch_slack * stay.capacity) * best.capacity
                <= (best.busy + best.resting) * stay.capacity
            ):
                return stay
        return best

    # -- the idle index -----------------------------------------------------------------

    def _reindex(self, on: bool) -> None:
        """Start keeping the index (built from every worker) or stop and drop it."""
        self._free.clear()
        self._free_all.clear()
        self._free_named.clear()
        self._idle_all.clear()
        self._idle_named.clear()
        self._indexed = on
        if on:
            # Idle workers in the scan's order, so equal last_used keep its tie-break.
            for w in self.worker_list:
                self.track(w)

    def track(self, w: _Conn) -> None:
        """Re-index `w` after its load changed (a slot taken or freed, a rest begun or
        over, a REGISTER): the free sets, and the idle heaps when it became idle."""
        if not self._indexed:
            return
        used = w.busy + w.resting
        free = used < w.capacity and self.workers.get(w.id) is w
        if free != (w.id in self._free):
            if free:
                self._free[w.id] = w.pipelines
                if w.pipelines is None:
                    self._free_all[w.id] = w
                else:
                    named = self._free_named
                    for name in w.pipelines:
                        group = named.get(name)
                        if group is None:
                            named[name] = group = {}
                        group[w.id] = w
            else:
                self._unfree(w.id)
        if not used and free:
            self._mark_idle(w)

    def _unfree(self, wid: int) -> None:
        if wid not in self._free:
            return
        pipelines = self._free.pop(wid)
        if pipelines is None:
            del self._free_all[wid]
            return
        named = self._free_named
        for name in pipelines:
            group = named[name]
            del group[wid]
            if not group:
                del named[name]

    def _mark_idle(self, w: _Conn) -> None:
        self._idle_pushes += 1
        entry = (w.last_used, self._orders[w.id], self._idle_pushes, w)
        if w.pipelines is None:
            self._push_idle(self._idle_all, entry, None)
        else:
            named = self._idle_named
            for name in w.pipelines:
                heap = named.get(name)
                if heap is None:
                    named[name] = heap = []
                self._push_idle(heap, entry, name)

    def _push_idle(
        self, heap: list[tuple[int, int, int, _Conn]], entry: tuple[int, int, int, _Conn],
        name: str | None,
    ) -> None:  # fmt: skip
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self.workers) + 64:  # stale entries piled up: keep the live
            live = [e for e in heap if self._idle_live(e, name)]
            heapq.heapify(live)
            heap[:] = live

    def _idle_live(self, entry: tuple[int, int, int, _Conn], name: str | None) -> bool:
        w = entry[3]
        if w.busy + w.resting or w.last_used != entry[0] or w.capacity <= 0:
            return False
        if self.workers.get(w.id) is not w or self._orders.get(w.id) != entry[1]:
            return False
        return w.pipelines is None if name is None else (
            w.pipelines is not None and name in w.pipelines
        )  # fmt: skip

    def _idle_head(
        self, heap: list[tuple[int, int, int, _Conn]], name: str | None
    ) -> tuple[int, int, int, _Conn] | None:
        while heap:
            head = heap[0]
            if self._idle_live(head, name):
                return head
            heapq.heappop(heap)
        return None

    def _idle_best(self, pipeline: str) -> _Conn | None:
        """The idle worker serving `pipeline` a scan would pick, or None."""
        best = self._idle_head(self._idle_all, None) if self._idle_all else None
        named = self._idle_named.get(pipeline)
        if named is not None:
            mine = self._idle_head(named, pipeline)
            if mine is None:
                del self._idle_named[pipeline]
            elif best is None or (mine[0], mine[1]) < (best[0], best[1]):
                best = mine
        return None if best is None else best[3]

    def end_batch(self) -> None:
        self.batch_worker = None

    # -- slots ----------------------------------------------------------------------

    def assign(self, job: _Job, w: _Conn) -> bytes:
        """Put a job on one of the worker's slots; the attempt's cookie."""
        wcookie = self._next_wcookie()
        job.state = _State.RUNNING
        job.worker = w
        job.wcookie = wcookie
        job.attempts += 1
        w.running[wcookie] = job
        w.busy += 1
        self._use += 1
        w.last_used = self._use
        self.running += 1
        self._stats.dispatched += 1
        if self._indexed and w.busy + w.resting >= w.capacity:
            self._unfree(w.id)
        if self.batch_slack:
            self.batch_worker = w
        return wcookie

    def release(self, w: _Conn, job: _Job) -> None:
        w.busy -= 1
        self.running -= 1
        job.worker = None
        job.wcookie = None
        self.track(w)

    def _next_wcookie(self) -> bytes:
        """A cookie no other attempt of any job has had in this broker's life."""
        at = self._wcookie_at
        if at == len(self._wcookies):
            self._wcookies = self._wcookie_blob()
            at = 0
        self._wcookie_at = at + 16
        return self._wcookies[at : at + 16]

    def _wcookie_blob(self) -> bytes:
        """The next batch of cookies, sequence numbers 256 * batch .. + 255."""
        stem = self._wcookie_prefix + self._wcookie_batch.to_bytes(7, "big") + b"\x00"
        self._wcookie_batch += 1
        blob = bytearray(stem * _WCOOKIE_BATCH)
        blob[15::16] = _LOW_BYTES
        return bytes(blob)

    # -- queues ---------------------------------------------------------------------

    def enqueue(self, job: _Job) -> None:
        job.state = _State.QUEUED
        pipeline = job.run.pipeline
        heap = self.queues.setdefault(pipeline, [])
        entry = (-job.run.priority, job.seq, job)
        heapq.heappush(heap, entry)
        # The queue's new head: index it. Compared by seq (unique in a queue),
        # not identity: under mypyc a tuple is unboxed, and boxed again per use.
        if heap[0][1] == job.seq:
            self._push_head(entry[0], entry[1], pipeline)
        self.queued += 1

    def _push_head(self, neg_priority: int, seq: int, pipeline: str) -> None:
        heads = self.heads
        heapq.heappush(heads, (neg_priority, seq, pipeline))
        if len(heads) > 2 * len(self.queues) + 64:
            self._rebuild_heads()  # stale entries piled up: O(queues), amortised O(1)

    def _rebuild_heads(self) -> None:
        heads = [(heap[0][0], heap[0][1], name) for name, heap in self.queues.items() if heap]
        heapq.heapify(heads)
        self.heads = heads

    def unqueue(self, job: _Job) -> None:
        """Remove a queued job lazily: its heap entry is skipped when reached.

        Dead entries hold their job's variables, so they are not left to pile
        up: an empty queue drops every heap, and a queue with more dead entries
        than live ones (past a small floor) is rebuilt, which is amortised O(1).
        """
        self._deadlines.set_done(job)
        self.queued -= 1
        if not self.queued:
            self.queues.clear()
            self.heads.clear()
            self.dead_in_queues = 0
            return
        self.dead_in_queues += 1
        if self.dead_in_queues > self.queued:
            self._compact_queues()

    def clear_queues(self) -> None:
        self.queues.clear()
        self.heads.clear()
        self.queued = 0
        self.dead_in_queues = 0

    def _compact_queues(self) -> None:
        for pipeline, heap in list(self.queues.items()):
            live = [e for e in heap if e[2].state is _State.QUEUED]
            if live:
                heapq.heapify(live)
                self.queues[pipeline] = live
            else:
                del self.queues[pipeline]
        self.dead_in_queues = 0
        self._rebuild_heads()

    def take(self, w: _Conn) -> _Job | None:
        """The best queued job the worker serves, off its queue, if it has a free slot."""
        if not (w.busy + w.resting < w.capacity and self.queued):
            return None
        if w.pipelines is None:
            return self._take_any()
        best_heap: list[tuple[int, int, _Job]] | None = None
        for name in list(w.pipelines):
            heap = self.queues.get(name)
            if heap is None:
                continue
            while heap and heap[0][2].state is not _State.QUEUED:
                heapq.heappop(heap)
                self.dead_in_queues -= 1
            if not heap:
                del self.queues[name]
                continue
            if best_heap is None or heap[0] < best_heap[0]:
                best_heap = heap
        if best_heap is None:
            return None
        _, _, job = heapq.heappop(best_heap)
        if not best_heap:
            del self.queues[job.run.pipeline]
        # The index keeps the taken head's entry: it is stale now, and its key
        # is below the new head's, which is all _take_any needs.
        self.queued -= 1
        return job

    def _take_any(self) -> _Job | None:
        """The best queued job of any pipeline, off its queue: the top of the
        heads index once stale entries are dropped, O(log n) amortised.

        Picks what a scan of every queue's head would (the least
        (-priority, seq)): by the index's invariant (see __init__), once the
        top entry matches its queue's head no other queue's head is better.
        A stale top (its queue gone, or its head since taken or cancelled)
        is dropped or replaced by the real head, whose key is no smaller."""
        heads = self.heads
        queues = self.queues
        while heads:
            neg_priority, seq, name = heads[0]
            heap = queues.get(name)
            if heap is None:
                heapq.heappop(heads)  # the queue is gone
                continue
            while heap and heap[0][2].state is not _State.QUEUED:
                heapq.heappop(heap)
                self.dead_in_queues -= 1
            if not heap:
                del queues[name]
                heapq.heappop(heads)
                continue
            top = heap[0]
            if top[0] != neg_priority or top[1] != seq:
                heapq.heapreplace(heads, (top[0], top[1], name))  # stale: index the real head
                continue
            heapq.heappop(heads)
            job = heapq.heappop(heap)[2]
            if heap:
                self._push_head(heap[0][0], heap[0][1], name)
            else:
                del queues[name]
            self.queued -= 1
            return job
        return None
