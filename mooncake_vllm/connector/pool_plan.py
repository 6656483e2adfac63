"""The KV pool, scheduler half: which prompt blocks to fetch from the pool, and which to save.

Fetching (any request that prefills here; not D's loads from P, which P's KV covers):
1. `matched` (vLLM's get_num_new_matched_tokens) computes the prompt's chain keys and looks the
   blocks beyond the local prefix cache up in the pool itself (rank 0's keys, on a thread of
   its own; a few milliseconds are waited for inline, then None, "ask again"). With no store
   node, or nothing held, it answers 0 at once: a miss costs the workers nothing.
2. On a hit it asks the workers to read the blocks held into their pool buffer (PoolPrefetch)
   and answers None until every rank has reported how many entries it holds, or
   `pool_lookup_timeout_s` has passed since the lookup began (then: no hit).
3. The hit is the fewest entries any rank holds, in whole blocks, always leaving the prompt's
   last token to compute. It is reported as a *synchronous* external hit: the workers copy
   the entries into the request's blocks before the forward pass of the step that schedules
   it (`allocated` -> PoolPlace), so a load can no longer fail once vLLM counts it.
4. Entries prefetched but not placed (no hit, fewer blocks, request gone) are dropped.

Saving: after each step, the prompt blocks that step completed (whole blocks only) go to the
workers as PoolSave; they copy them into their buffer after the forward pass and write them to
the pool in the background. Blocks that came from a prefix cache or the pool are not saved
again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mooncake_vllm.connector.step_schema import MooncakeMetadata, PoolPlace, PoolPrefetch, PoolSave
from mooncake_vllm.store.client import Found
from mooncake_vllm.store.keys import ModelSpace, block_keys, shard_keys

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.mooncake_vllm.connector")


def model_space(vllm_config: Any) -> ModelSpace:
    mc = vllm_config.model_config
    name = mc.served_model_name
    if isinstance(name, list | tuple):
        name = name[0]
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    return ModelSpace(
        model=str(name or mc.model),
        dtype=f"{str(mc.dtype).removeprefix('torch.')}/{cache_dtype}",
        block_size=int(vllm_config.cache_config.block_size),
        num_layers=int(mc.hf_text_config.num_hidden_layers),
        total_kv_heads=int(mc.get_total_num_kv_heads()), head_size=int(mc.get_head_size()),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size))


# How long `matched` waits inline for its lookup before answering "ask again": a lookup on a
# healthy pool is a network round trip, and a request that is asked again waits a step.
INLINE_LOOKUP_S = 0.005
# (rank 0's entry keys) -> what the pool holds (store.client.PoolLookup.lookup).
Lookup = Callable[[list[bytes]], Found]


@dataclass
class _Fetch:
    first: int  # the prompt's first block asked for
    keys: list[bytes]  # the chain keys asked for
    started: float
    lookup: Future[Found] | None = None
    asked: int = 0  # blocks the workers were asked to read (0: not yet)
    reports: dict[int, int] = field(default_factory=dict)  # rank -> entries held
    hit: int | None = None  # blocks, once decided


class PoolPlanner:
    def __init__(self, space: ModelSpace, timeout_s: float) -> None:
        self.space, self.timeout_s = space, timeout_s
        self.block_size = space.block_size
        # Set once the workers said how their caches lay blocks out (attach).
        self._lookup: Lookup | None = None
        self._has_stores: Callable[[], bool] = lambda: False
        self._shard = b""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mooncake-pool-lookup")
        self._keys: dict[str, list[bytes]] = {}  # request -> its prompt's chain keys
        self._fetch: dict[str, _Fetch] = {}
        self._prefetches: list[PoolPrefetch] = []
        self._places: list[PoolPlace] = []
        self._drops: list[str] = []
        # Lookups begun and hits found since the last fill(): rank 0 exports them.
        self._lookups = self._hits = 0
        self._lookup_s: list[float] = []  # lookup durations not yet passed on

    def _chain(self, request: Request) -> list[bytes]:
        keys = self._keys.get(request.request_id)
        if keys is None:
            tokens = list(request.prompt_token_ids or [])
            keys = self._keys[request.request_id] = block_keys(self.space, tokens)
        return keys

    def attach(self, lookup: Lookup, has_stores: Callable[[], bool], shard_salt: bytes) -> None:
        """Start looking up: `lookup` asks the stores for rank 0's entries, whose keys are
        salted with `shard_salt` (its ShardSpace digest)."""
        self._lookup, self._has_stores, self._shard = lookup, has_stores, shard_salt

    # ------------------------------------------------------------------ fetching
    def matched(self, request: Request, num_computed: int, now: float | None = None
                ) -> int | None:
        """Tokens the pool adds beyond `num_computed`; None: not known yet, ask again."""
        now = time.monotonic() if now is None else now
        rid = request.request_id
        first = num_computed // self.block_size
        fetch = self._fetch.get(rid)
        if fetch is None:
            # Whole blocks, leaving the prompt's last token to compute.
            last = (request.num_prompt_tokens - 1) // self.block_size
            if last <= first or self._lookup is None or not self._has_stores():
                return 0
            fetch = self._fetch[rid] = _Fetch(first, self._chain(request)[first:last], now)
            lookup, spent = self._lookup, self._lookup_s
            salted = shard_keys(self._shard, fetch.keys)

            def timed() -> Found:
                t0 = time.monotonic()
                try:
                    return lookup(salted)
                finally:
                    spent.append(time.monotonic() - t0)  # list.append: atomic

            fetch.lookup = self._pool.submit(timed)
            self._lookups += 1
            wait([fetch.lookup], INLINE_LOOKUP_S)
        if fetch.hit is None and not self._decide(rid, fetch, now):
            return None
        assert fetch.hit is not None
        if fetch.first != first:  # the local cache changed meanwhile: the entries don't fit
            return 0
        return fetch.hit * self.block_size

    def _decide(self, rid: str, fetch: _Fetch, now: float) -> bool:
        """Move the fetch on; True once its hit is known."""
        if not fetch.asked:
            assert fetch.lookup is not None
            if fetch.lookup.done():
                try:
                    found = fetch.lookup.result()
                except Exception:  # the lookup's own bounds absorb pool failures: a bug
                    logger.exception("request %s: pool lookup failed: a miss", rid)
                    found = Found(0)
                if not found.held:
                    fetch.hit = 0
                    return True
                fetch.asked = found.held
                self._prefetches.append(PoolPrefetch(rid, fetch.keys[:found.held], fetch.first,
                                                     found.copies[:found.held]))
            elif now - fetch.started < self.timeout_s:
                return False
        if fetch.asked and len(fetch.reports) >= self.space.tp_size:
            fetch.hit = min(fetch.reports.values())
            if fetch.hit:
                self._hits += 1
            return True
        if now - fetch.started < self.timeout_s:
            return False
        logger.warning("request %s: the pool did not answer within %.1fs: computing the "
                       "prompt", rid, self.timeout_s)
        fetch.hit = 0
        return True

    def waiting(self) -> bool:
        """A fetch waits for the pool: an idle step may wait for news instead of spinning."""
        return any(f.hit is None for f in self._fetch.values())

    def on_prefetched(self, reports: set[tuple[str, int, int]]) -> None:
        for rid, rank, n in reports:
            fetch = self._fetch.get(rid)
            if fetch is None:
                self._drops.append(rid)  # the request went meanwhile
            elif fetch.hit is None and fetch.asked:
                fetch.reports[rank] = min(n, fetch.asked)

    def allocated(self, request: Request, block_ids: list[int], num_external: int) -> None:
        fetch = self._fetch.pop(request.request_id, None)
        if fetch is None:
            return
        blocks = num_external // self.block_size
        if blocks and fetch.hit:
            self._places.append(PoolPlace(request.request_id,
                                          block_ids[fetch.first:fetch.first + blocks]))
        else:
            self._drops.append(request.request_id)

    # ------------------------------------------------------------------ saving
    def saves(self, out: SchedulerOutput, requests: dict[str, Request],
              block_ids: Any) -> list[PoolSave]:
        """The prompt blocks each scheduled request completes in this step."""
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        saves = []
        for rid, n in out.num_scheduled_tokens.items():
            req = requests.get(rid)
            if req is None or rid not in computed:
                continue
            start = computed[rid]
            if start >= req.num_prompt_tokens:
                continue  # decoding
            lo = start // self.block_size  # the first block this step completes
            hi = min(start + n, req.num_prompt_tokens) // self.block_size
            if hi <= lo:
                continue
            ids = block_ids(rid)
            saves.append(PoolSave(rid, self._chain(req)[lo:hi], list(ids[lo:hi])))
        return saves

    # ------------------------------------------------------------------ bookkeeping
    def finished(self, rid: str) -> None:
        self._keys.pop(rid, None)
        if self._fetch.pop(rid, None) is not None:
            self._drops.append(rid)

    def fill(self, meta: MooncakeMetadata) -> None:
        meta.pool_lookups, meta.pool_hits = self._lookups, self._hits
        self._lookups = self._hits = 0
        n = len(self._lookup_s)
        meta.pool_lookup_s, self._lookup_s[:n] = self._lookup_s[:n], []
        meta.pool_prefetches, self._prefetches = self._prefetches, []
        meta.pool_places, self._places = self._places, []
        meta.pool_drops, self._drops = self._drops, []

    def has_pending(self) -> bool:
        return bool(self._prefetches or self._places or self._drops or self.waiting())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

