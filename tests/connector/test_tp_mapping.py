"""The head map between prefill and decode tensor-parallel sizes (issue 14), against a
reference built by slicing tensors the way vLLM shards KV heads."""

from __future__ import annotations

import itertools

import pytest
import torch

from mooncake_vllm.connector.tp_mapping import TPMismatch, feeders, head_map, heads_of

SIZES = (1, 2, 4, 8)
HEADS = (1, 2, 4, 8, 16)


def _vllm_shard(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """vLLM's split of the KV heads (dim 0), written independently of heads_of: a plain
    chunk when tp <= heads, else each head repeated on tp/heads consecutive ranks."""
    heads = full.shape[0]
    if tp <= heads:
        return full.chunk(tp, dim=0)[rank]
    return full.repeat_interleave(tp // heads, dim=0)[rank:rank + 1]


def _pairs() -> list[tuple[int, int, int]]:
    out = []
    for src, dst, heads in itertools.product(SIZES, SIZES, HEADS):
        if src % dst and dst % src:
            continue
        if (heads % src and src % heads) or (heads % dst and dst % heads):
            continue
        out.append((src, dst, heads))
    return out


@pytest.mark.parametrize(("src_tp", "dst_tp", "heads"), _pairs())
def test_the_map_rebuilds_every_decode_shard_from_the_prefill_shards(
        src_tp: int, dst_tp: int, heads: int) -> None:
    full = torch.randn(heads, 3, 5)  # heads x (tokens, head size), any trailing shape
    src = [_vllm_shard(full, r, src_tp) for r in range(src_tp)]
    want = [_vllm_shard(full, r, dst_tp) for r in range(dst_tp)]
    got = [torch.full_like(w, float("nan")) for w in want]
    written = [torch.zeros(w.shape[0], dtype=torch.int) for w in want]
    runs = head_map(heads, src_tp, dst_tp)
    for r in runs:
        got[r.dst_rank][r.dst_head:r.dst_head + r.count] = \
            src[r.src_rank][r.src_head:r.src_head + r.count]
        written[r.dst_rank][r.dst_head:r.dst_head + r.count] += 1
    for rank in range(dst_tp):
        assert torch.equal(got[rank], want[rank]), (rank, runs)
        assert written[rank].eq(1).all(), "every head written exactly once"
        assert len(heads_of(rank, dst_tp, heads)) == want[rank].shape[0]
        assert feeders(runs, rank)  # someone feeds every decode rank
    # Replicated heads on P: decode ranks are spread over the replicas, not all on one.
    if src_tp > heads and dst_tp >= src_tp:
        assert len({r.src_rank for r in runs}) == src_tp


def test_same_sizes_map_rank_to_rank_in_one_run_each() -> None:
    assert [(r.src_rank, r.dst_rank, r.src_head, r.dst_head, r.count)
            for r in head_map(8, 2, 2)] == [(0, 0, 0, 0, 4), (1, 1, 0, 0, 4)]


def test_a_decode_rank_of_a_smaller_tp_waits_for_every_rank_that_feeds_it() -> None:
    runs = head_map(8, 4, 2)
    assert feeders(runs, 0) == {0, 1} and feeders(runs, 1) == {2, 3}
    assert feeders(head_map(8, 2, 4), 3) == {1}


@pytest.mark.parametrize(("heads", "src", "dst", "named"), [
    (8, 2, 3, "tensor-parallel sizes 2 on prefill and 3 on decode"),
    (6, 4, 2, "prefill: 6 KV heads cannot be sharded over tensor-parallel size 4"),
    (6, 2, 4, "decode: 6 KV heads cannot be sharded over tensor-parallel size 4"),
])
def test_an_impossible_pairing_is_refused_naming_both(heads: int, src: int, dst: int,
                                                      named: str) -> None:
    with pytest.raises(TPMismatch, match=named):
        head_map(heads, src, dst)
