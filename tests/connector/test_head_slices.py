"""Heads of a block copied between prefill and decode ranks of different tensor-parallel sizes
(issue 14): the byte ranges `head_transfer` builds, executed with memmove on real tensors in
the CPU backend's layout and both FlashAttention layouts, rebuild each decode rank's shard."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from mooncake_vllm.connector.head_slices import head_transfer
from mooncake_vllm.connector.layout import LayoutError, describe_layer, head_geometry
from mooncake_vllm.connector.tp_mapping import head_map, heads_of

BLOCKS, BS, HD = 8, 5, 3
P_IDS, D_IDS = np.array([1, 2, 5]), np.array([7, 3, 4])
HEAD_DIM = {"cpu": 1, "nhd": 3, "hnd": 2}


def _cache(layout: str, heads: int) -> tuple[torch.Tensor, int]:
    """(a layer's cache with `heads` KV heads per rank, its block dimension)."""
    shape = {"cpu": (BLOCKS, heads, BS, 2 * HD),  # vLLM's CPU backend
             "nhd": (2, BLOCKS, BS, heads, HD),  # FlashAttention, tokens first
             "hnd": (2, BLOCKS, heads, BS, HD)}[layout]
    return torch.zeros(shape), 0 if layout == "cpu" else 1


def _heads(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with the head dimension first (the others in order), for slicing."""
    return t.movedim(HEAD_DIM[layout], 0)


@pytest.mark.parametrize("layout", ["cpu", "nhd", "hnd"])
@pytest.mark.parametrize(("src_tp", "dst_tp", "heads"), [
    (1, 2, 4), (2, 1, 4), (2, 4, 8), (4, 2, 8), (1, 4, 2), (4, 1, 2), (2, 2, 4)])
def test_head_runs_rebuild_each_decode_shard(layout: str, src_tp: int, dst_tp: int,
                                             heads: int) -> None:
    full, block_dim = _cache(layout, heads)
    full.copy_(torch.randn_like(full))
    src, dst = [], []
    for r in range(src_tp):
        own = heads_of(r, src_tp, heads)
        src.append(_heads(full, layout)[own.start:own.stop].movedim(
            0, HEAD_DIM[layout]).contiguous())
    for r in range(dst_tp):
        dst.append(_cache(layout, len(heads_of(r, dst_tp, heads)))[0])
    for run in head_map(heads, src_tp, dst_tp):
        s, d = src[run.src_rank], dst[run.dst_rank]
        sp, _ = describe_layer(s, BLOCKS)
        dp, _ = describe_layer(d, BLOCKS)
        sg = head_geometry(s, block_dim, s.shape[HEAD_DIM[layout]])
        dg = head_geometry(d, block_dim, d.shape[HEAD_DIM[layout]])
        loc, rem, n = head_transfer(sp, sg, dp, dg, P_IDS, D_IDS, run.src_head, run.dst_head,
                                    run.count)
        for a, b, k in zip(loc, rem, n, strict=True):
            ctypes.memmove(int(b), int(a), int(k))
    for r in range(dst_tp):
        own = heads_of(r, dst_tp, heads)
        want = _heads(full, layout)[own.start:own.stop]
        got = _heads(dst[r], layout)
        blocks = 1 if layout == "cpu" else 2  # the block dimension in the head-first view
        assert torch.equal(got.index_select(blocks, torch.as_tensor(D_IDS)),
                           want.index_select(blocks, torch.as_tensor(P_IDS))), (layout, r)
        untouched = [b for b in range(BLOCKS) if b not in D_IDS]
        assert not got.index_select(blocks, torch.as_tensor(untouched)).any()


def test_heads_outermost_are_one_range_per_block_and_tokens_first_one_per_token() -> None:
    cpu, _ = _cache("cpu", 4)
    g = head_geometry(cpu, 0, 4)
    assert (g.outer_count, g.heads_adjacent) == (1, True)
    nhd, _ = _cache("nhd", 4)
    g = head_geometry(nhd, 1, 4)
    assert (g.outer_count, g.outer_stride, g.head_bytes) == (BS, 4 * HD * 4, HD * 4)


def test_an_ambiguous_or_strided_block_is_refused() -> None:
    t = torch.zeros(BLOCKS, 4, 4, 6)  # as many tokens as heads: which is which?
    with pytest.raises(LayoutError, match="cannot tell the KV head dimension"):
        head_geometry(t, 0, 4)
    strided = torch.zeros(BLOCKS, 2, BS, 8)[..., ::2]
    with pytest.raises(LayoutError, match="not one dense range"):
        head_geometry(strided, 0, 2)
