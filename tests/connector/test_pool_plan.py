"""The KV pool's scheduler half (pool_plan.py) driven call by call without vLLM: a real
lookup function stands in for the stores, request objects carry only what vLLM's do."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from mooncake_vllm.connector.pool_plan import PoolPlanner
from mooncake_vllm.connector.step_schema import MooncakeMetadata
from mooncake_vllm.store.client import Found
from mooncake_vllm.store.keys import ModelSpace, block_keys, shard_keys

SPACE = ModelSpace(model="tiny", dtype="float32/auto", block_size=4, num_layers=2,
                   total_kv_heads=2, head_size=8, tp_size=2)
SALT = b"s" * 32


def request(rid: str, n: int) -> Any:
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(range(10, 10 + n)),
                           num_prompt_tokens=n)


class Pool:
    """Holds the first `held` keys of any chain; answers after `gate` opens."""

    def __init__(self, held: int, stores: bool = True) -> None:
        self.held, self.stores, self.asked = held, stores, []
        self.gate = threading.Event()
        self.gate.set()

    def lookup(self, keys: list[bytes]) -> Found:
        self.asked.append(keys)
        self.gate.wait(5)
        held = min(self.held, len(keys))
        return Found(held, [2] + [1] * (len(keys) - 1))  # the first block is hot


def planner(pool: Pool, timeout_s: float = 5.0) -> PoolPlanner:
    p = PoolPlanner(SPACE, timeout_s)
    p.attach(pool.lookup, lambda: pool.stores, SALT)
    return p


def meta(p: PoolPlanner) -> MooncakeMetadata:
    m = MooncakeMetadata()
    p.fill(m)
    return m


def test_no_store_or_a_miss_costs_the_workers_nothing() -> None:
    assert planner(Pool(3, stores=False)).matched(request("r", 40), 0) == 0
    p = planner(Pool(0))
    assert p.matched(request("r", 40), 0) == 0  # looked up inline: nothing held
    assert meta(p).pool_prefetches == [] and not p.has_pending()


def test_a_hit_is_read_by_every_rank_and_counts_the_fewest() -> None:
    pool = Pool(held=6)
    p = planner(pool)
    r = request("r", 41)  # 10 whole blocks; the last token is always computed
    assert p.matched(r, 8) is None  # the local cache holds 2 blocks: ask beyond them
    # Looked up with rank 0's salted keys, from the first block not held locally.
    chain = block_keys(SPACE, r.prompt_token_ids)
    assert pool.asked == [shard_keys(SALT, chain[2:10])]
    [pf] = meta(p).pool_prefetches
    assert (pf.req_id, pf.first, pf.keys) == ("r", 2, chain[2:8])
    assert pf.copies == [2, 1, 1, 1, 1, 1]  # the workers replicate hot blocks they read
    assert p.matched(r, 8) is None and p.waiting()
    p.on_prefetched({("r", 0, 6)})
    assert p.matched(r, 8) is None  # rank 1 has not reported
    p.on_prefetched({("r", 1, 5)})
    assert p.matched(r, 8) == 5 * 4
    p.allocated(r, list(range(100, 111)), 5 * 4)
    m = meta(p)
    assert [(x.req_id, x.block_ids) for x in m.pool_places] == [("r", [102, 103, 104, 105,
                                                                       106])]
    assert not p.has_pending()


def test_the_last_token_is_left_to_compute() -> None:
    pool = Pool(held=99)
    p = planner(pool)
    assert p.matched(request("r", 40), 0) is None  # 40 tokens: 9 blocks asked, not 10
    assert len(pool.asked[0]) == 9


def test_a_slow_pool_is_a_miss_and_its_entries_are_dropped() -> None:
    pool = Pool(held=6)
    pool.gate.clear()
    p = planner(pool, timeout_s=0.05)
    r = request("r", 41)
    assert p.matched(r, 0) is None
    assert p.matched(r, 0, now=10**9) == 0  # past the timeout: computed, not waited for
    pool.gate.set()
    p.allocated(r, list(range(11)), 0)
    assert meta(p).pool_drops == ["r"]


def test_a_request_that_goes_drops_what_was_read_for_it() -> None:
    p = planner(Pool(held=6))
    r = request("r", 41)
    assert p.matched(r, 0) is None
    p.finished("r")
    p.on_prefetched({("r", 0, 6)})  # a late report of a request gone: dropped too
    assert meta(p).pool_drops == ["r", "r"]


def test_saves_are_the_prompt_blocks_each_step_completes() -> None:
    p = planner(Pool(held=0))
    r = request("r", 22)  # 5 whole blocks and 2 tokens
    chain = block_keys(SPACE, r.prompt_token_ids)
    ids = list(range(50, 56))

    def step(start: int, n: int) -> list[tuple[list[bytes], list[int]]]:
        out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r",
                                                                  num_computed_tokens=start)],
                              scheduled_cached_reqs=SimpleNamespace(req_ids=[],
                                                                    num_computed_tokens=[]),
                              num_scheduled_tokens={"r": n})
        return [(s.keys, s.block_ids) for s in p.saves(out, {"r": r}, lambda _: ids)]

    assert step(0, 6) == [(chain[:1], ids[:1])]  # a chunk of 6: block 0 complete
    assert step(6, 10) == [(chain[1:4], ids[1:4])]  # block 1 completes here, then 2 and 3
    assert step(16, 6) == [(chain[4:5], ids[4:5])]  # block 4; the partial 5th is not saved
    assert step(22, 1) == []  # decoding
