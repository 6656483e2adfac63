"""Content addresses, owners by rendezvous hashing, and the hot-spot replication rule."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from mooncake_vllm.store.keys import ModelSpace, ShardSpace, block_keys, shard_keys
from mooncake_vllm.store.placement import HotSpots, owners, pick_replica, rendezvous

SPACE = ModelSpace(model="tiny", dtype="float32", block_size=4, num_layers=2,
                   total_kv_heads=2, head_size=8)
SHARD = ShardSpace(block_bytes=256, planes=1, num_layers=2)


def test_keys_chain_over_the_prefix_and_skip_a_partial_block() -> None:
    a = block_keys(SPACE, list(range(10)))  # two full blocks, two tokens left over
    assert len(a) == 2 and len(set(a)) == 2
    b = block_keys(SPACE, [*range(4), 99, 5, 6, 7])  # second block differs
    assert b[0] == a[0] and b[1] != a[1]
    c = block_keys(SPACE, [0, 1, 2, 99, *range(4, 8)])  # first block differs: so does all
    assert c[0] != a[0] and c[1] != a[1]
    assert block_keys(SPACE, [1, 2, 3]) == []


@pytest.mark.parametrize("change", [{"model": "other"}, {"dtype": "bfloat16"},
                                    {"block_size": 8}, {"tp_size": 2}, {"block_bytes": 512},
                                    {"planes": 2}, {"tp_rank": 1}])
def test_incompatible_kv_never_shares_a_key(change: dict) -> None:
    model = {k: v for k, v in change.items() if hasattr(SPACE, k)}
    shard = {k: v for k, v in change.items() if k not in model}
    other_space = dataclasses.replace(SPACE, **model)
    other_shard = dataclasses.replace(SHARD, **shard)
    tokens = list(range(16))
    ours = shard_keys(SHARD, block_keys(SPACE, tokens))
    theirs = shard_keys(other_shard, block_keys(other_space, tokens))
    assert len(ours) == 4 and not set(ours) & set(theirs)
    assert shard_keys(SHARD, block_keys(SPACE, tokens)) == ours  # and equal KV always does


def test_bad_spaces_and_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="tp_rank must be >= 0"):
        dataclasses.replace(SHARD, tp_rank=-1)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        dataclasses.replace(SPACE, block_size=0)
    with pytest.raises(ValueError, match="non-negative"):
        block_keys(SPACE, [1, -2, 3, 4])


def test_owners_agree_everywhere_and_a_departure_moves_only_its_keys() -> None:
    nodes = [f"store-{i}" for i in range(5)]
    keys = [i.to_bytes(4, "big") for i in range(2000)]
    first = {k: owners(k, nodes, 2) for k in keys}
    assert all(owners(k, list(reversed(nodes)), 2) == first[k] for k in keys)
    share = collections.Counter(o[0] for o in first.values())
    assert all(300 <= share[n] <= 500 for n in nodes), share  # 400 each, give or take
    left = [n for n in nodes if n != "store-2"]
    for k in keys:
        if first[k][0] != "store-2":
            assert rendezvous(k, left)[0] == first[k][0]


def test_readers_spread_over_the_replicas_and_each_sticks_to_one() -> None:
    replicas = ["store-0", "store-1", "store-2"]
    picks = collections.Counter(pick_replica(b"hot", replicas, f"reader-{i}")
                                for i in range(600))
    assert all(picks[r] >= 120 for r in replicas), picks
    assert pick_replica(b"hot", replicas, "reader-7") == pick_replica(b"hot", replicas,
                                                                      "reader-7")
    with pytest.raises(ValueError):
        pick_replica(b"hot", [], "reader-0")


def test_a_hot_block_gains_copies_and_loses_them_a_window_after_it_cools() -> None:
    spots = HotSpots(hot_reads=4, max_replicas=3, window_s=10.0)
    assert spots.copies(b"k", 1, 0.0) == 1
    for i in range(4):
        spots.read(b"k", 0.1 * i)
    assert spots.copies(b"k", 1, 0.5) == 2  # four reads in the window: one more copy
    for i in range(100):
        spots.read(b"k", 1.0 + 0.01 * i)
    assert spots.copies(b"k", 2, 2.0) == 3  # capped at max_replicas
    # Reads stop: the window empties at 12 s; the copies stay a whole window below target.
    assert spots.copies(b"k", 3, 12.5) == 3
    assert spots.copies(b"k", 3, 21.9) == 3
    assert spots.copies(b"k", 3, 22.1) == 1
    assert spots.copies(b"never-read", 2, 0.0) == 1  # untracked: not read for long


def test_tracked_blocks_are_bounded() -> None:
    spots = HotSpots(hot_reads=1, max_tracked=3)
    for i in range(10):
        spots.read(bytes([i]), 0.0)
    assert spots.reads(bytes([0]), 0.0) == 0 and spots.reads(bytes([9]), 0.0) == 1
