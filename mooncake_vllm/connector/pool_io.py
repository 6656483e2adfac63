"""The KV pool, worker half: prefetching entries into a host buffer, placing them in blocks,
and saving completed blocks (pool_plan.py says when each happens).

Every entry passes through this worker's pool buffer (registered with the engine), so pool
I/O never touches a KV block that vLLM may free or reuse meanwhile:
- prefetch (background): read the entries the scheduler found (its lookup) into buffer
  slots, report how many landed; they wait there for PoolPlace or PoolDrop;
- place (before the forward pass): copy the entries into the request's blocks, a local copy
  that cannot fail, so vLLM may count the tokens as computed; entries of hot blocks are then
  written to their next owners as replicas before their slots are freed;
- save (after the forward pass): copy the blocks the step completed into slots, then write
  them to the pool in the background.
A full buffer, a slow or failed pool: fewer entries, a miss, never an error. The background
thread survives any one failed job.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mooncake_vllm.config import ConnectorConfig
from mooncake_vllm.connector.layout import KVLayout
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata, PoolPlace
from mooncake_vllm.engine import TransferEngine
from mooncake_vllm.metadata import MetadataStore
from mooncake_vllm.store.client import PoolClient
from mooncake_vllm.store.keys import ShardSpace, shard_keys

logger = logging.getLogger("vllm.mooncake_vllm.connector")
MIB = 1 << 20


@dataclass
class _Staged:
    slots: list[int]
    copies: list[int]
    keys: list[bytes]


class PoolWorker:
    def __init__(self, engine: TransferEngine, metadata: MetadataStore, layout: KVLayout,
                 config: ConnectorConfig, reader: str, stats: MooncakeStats,
                 news: threading.Condition) -> None:
        self.layout, self.rank = layout, layout.tp_rank
        # The worker's stats (exported by vLLM) and its condition (on its lock), which an idle
        # step waits on: a finished prefetch wakes it.
        self._stats, self._news = stats, news
        self.shard = ShardSpace(layout.block_bytes, len(layout.planes[0]),
                                len(layout.layer_names), layout.tp_rank)
        self.entry = self.shard.entry_bytes
        slots = max(1, config.pool_buffer_mb * MIB // self.entry)
        self.buffer = np.zeros(slots * self.entry, np.uint8)
        self.base = int(self.buffer.ctypes.data)
        self.engine = engine
        engine.register(self.base, self.buffer.nbytes)
        self.client = PoolClient(engine, metadata, hostname=config.hostname,
                                 token=config.cluster_token, reader=reader,
                                 entry_bytes=self.entry, ask_timeout_s=config.pool_lookup_timeout_s)
        self._lock = threading.Lock()
        self._free = list(range(slots - 1, -1, -1))
        self._staged: dict[str, _Staged] = {}
        self._dropped: set[str] = set()  # dropped while their prefetch was still running
        self._running: set[str] = set()
        self._reports: set[tuple[str, int, int]] = set()
        self.load_errors: set[int] = set()  # blocks that could not be placed (worker.py)
        # (byte offset in an entry, layer, plane) of each chunk, in entry order.
        self._chunks = [(i * layout.block_bytes, layer, plane)
                        for i, (layer, plane) in enumerate(
                            (la, pl) for la in range(len(layout.planes))
                            for pl in range(len(layout.planes[la])))]
        # Reads (a request waits for them) and writes (nobody waits) on threads of their own,
        # so that a slow write never holds a read up.
        self._reads: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._writes: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, args=(q,), name=name, daemon=True)
                         for q, name in ((self._reads, "mooncake-pool-read"),
                                         (self._writes, "mooncake-pool-write"))]
        for t in self._threads:
            t.start()

    def _count(self, read_s: float | None = None, **counts: int) -> None:
        with self._news:
            self._stats.add(**counts)
            if read_s is not None:
                self._stats.observe("pool_read_s", read_s)

    # ------------------------------------------------------------------ buffer
    def _take(self, n: int) -> list[int]:
        with self._lock:
            got = [self._free.pop() for _ in range(min(n, len(self._free)))]
        if len(got) < n:
            self._count(pool_buffer_full=1)
        return got

    def _give(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def _addr(self, slot: int) -> int:
        return self.base + slot * self.entry

    def _copy(self, slot: int, block: int, into_block: bool) -> None:
        for offset, layer, plane in self._chunks:
            p = self.layout.planes[layer][plane]
            kv, buf = p.base + block * p.stride, self._addr(slot) + offset
            if into_block:
                ctypes.memmove(kv, buf, self.layout.block_bytes)
            else:
                ctypes.memmove(buf, kv, self.layout.block_bytes)

    # ------------------------------------------------------------------ steps
    def bind(self, meta: MooncakeMetadata) -> None:
        """Before the forward pass."""
        if self.rank == 0 and (meta.pool_lookups or meta.pool_hits or meta.pool_lookup_s):
            self._count(pool_lookups=meta.pool_lookups, pool_hits=meta.pool_hits)
            with self._news:
                for seconds in meta.pool_lookup_s:
                    self._stats.observe("pool_lookup_s", seconds)
        for rid in meta.pool_drops:
            self._drop(rid)
        for pf in meta.pool_prefetches:
            keys = shard_keys(self.shard, pf.keys)
            with self._lock:
                self._running.add(pf.req_id)
            self._reads.put(lambda rid=pf.req_id, keys=keys, copies=pf.copies:
                            self._prefetch(rid, keys, copies))
        for place in meta.pool_places:
            self._place(place)

    def after_forward(self, meta: MooncakeMetadata) -> None:
        """After the forward pass: copy out the blocks it completed, write them later."""
        if not self.client.live_stores():
            return  # no store to write to: no copy either
        for save in meta.pool_saves:
            slots = self._take(len(save.keys))
            if not slots:
                continue
            for slot, block in zip(slots, save.block_ids, strict=False):
                self._copy(slot, block, into_block=False)
            keys = shard_keys(self.shard, save.keys[:len(slots)])
            self._writes.put(lambda keys=keys, slots=slots: self._write(keys, slots, None))

    def has_news(self) -> bool:
        return bool(self._reports)

    def take_reports(self) -> set[tuple[str, int, int]]:
        with self._lock:
            reports, self._reports = self._reports, set()
        return reports

    # ------------------------------------------------------------------ the three moves
    def _prefetch(self, rid: str, keys: list[bytes], copies: list[int]) -> None:
        n, slots = 0, []
        started = time.monotonic()
        try:
            slots = self._take(len(keys))
            if slots:
                n = self.client.read(keys[:len(slots)], [self._addr(s) for s in slots],
                                     copies[:len(slots)] or None)
            self._count(time.monotonic() - started)
        except Exception:  # the client bounds and absorbs pool failures: this is a bug
            logger.exception("pool: prefetch for request %s failed: a miss", rid)
            n = 0
        self._give(slots[n:])
        with self._lock:
            self._running.discard(rid)
            if rid in self._dropped:
                self._dropped.discard(rid)
                self._free.extend(slots[:n])
                return
            # Always reported, a miss included: the scheduler waits for every rank.
            self._staged[rid] = _Staged(slots[:n], (copies + [1] * n)[:n], keys[:n])
            self._reports.add((rid, self.rank, n))
        with self._news:
            self._news.notify_all()

    def _place(self, place: PoolPlace) -> None:
        with self._lock:
            staged = self._staged.pop(place.req_id, None)
        if staged is None or len(staged.slots) < len(place.block_ids):
            # The scheduler places only what every rank reported staged, so this is a bug:
            # said loudly, and the blocks reported as failed loads (vLLM's policy applies),
            # never a worker brought down or KV left unwritten.
            logger.error("pool: request %s has %d blocks to place but %d entries staged: "
                         "reported as a failed load", place.req_id, len(place.block_ids),
                         0 if staged is None else len(staged.slots))
            self.load_errors.update(place.block_ids)
            if staged is not None:
                self._give(staged.slots)
            return
        n = len(place.block_ids)
        for slot, block in zip(staged.slots, place.block_ids, strict=False):
            self._copy(slot, block, into_block=True)
        self._count(pool_blocks_loaded=n, pool_bytes_read=n * self.entry)
        self._give(staged.slots[n:])
        hot = [i for i in range(n) if staged.copies[i] > 1]
        self._give([staged.slots[i] for i in range(n) if staged.copies[i] <= 1])
        if hot:
            keys = [staged.keys[i] for i in hot]
            slots = [staged.slots[i] for i in hot]
            copies = [staged.copies[i] for i in hot]
            self._writes.put(lambda: self._write(keys, slots, copies))

    def _write(self, keys: list[bytes], slots: list[int], copies: list[int] | None) -> None:
        try:
            n = self.client.write(keys, [self._addr(s) for s in slots], copies)
        finally:
            self._give(slots)
        if copies is None:
            self._count(pool_blocks_saved=n, pool_bytes_written=n * self.entry)
        else:
            self._count(pool_replicas_written=n, pool_bytes_written=n * self.entry)

    def _drop(self, rid: str) -> None:
        with self._lock:
            staged = self._staged.pop(rid, None)
            if staged is not None:
                self._free.extend(staged.slots)
            elif rid in self._running:
                self._dropped.add(rid)

    # ------------------------------------------------------------------ thread
    @staticmethod
    def _run(jobs: queue.Queue[Callable[[], None] | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # one failed job must not end pool I/O
                logger.exception("pool: a background job failed")

    def close(self) -> None:
        for q in (self._reads, self._writes):
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.client.close()
        self.engine.unregister(self.base)
