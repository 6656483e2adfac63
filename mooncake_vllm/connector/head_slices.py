"""Byte ranges of a run of KV heads inside blocks: what a prefill rank writes into a decode
rank of another tensor-parallel size (issue 14; `tp_mapping.py` says which heads).

Same TP sizes move whole blocks (layout.py). With different sizes a block on each side holds
another number of heads, so a run of heads is a sub-range of a block: where the heads are
outermost in the block interior (vLLM's CPU backend, [heads, block, 2*head]; HND layouts)
a run of heads is one range per block and plane; where tokens come first (NHD,
[block, heads, head]) it is one range per token. `layout.HeadGeometry` says which, per side,
from the tensor's own shape and strides, and `head_transfer` builds the (local, remote,
length) arrays for the engine, vectorised, without a staging copy.
"""

from __future__ import annotations

import numpy as np

from mooncake_vllm.connector.layout import HeadGeometry, LayoutError, Plane


def head_transfer(local: list[Plane] | tuple[Plane, ...], local_geom: HeadGeometry,
                  remote: list[Plane] | tuple[Plane, ...], remote_geom: HeadGeometry,
                  local_ids: np.ndarray, remote_ids: np.ndarray, local_head: int,
                  remote_head: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(local addr, remote addr, length) uint64 arrays that copy heads
    [local_head, local_head + count) of each local block into heads
    [remote_head, remote_head + count) of the matching remote block, in one layer's planes."""
    if (local_geom.outer_count != remote_geom.outer_count
            or local_geom.head_bytes != remote_geom.head_bytes or len(local) != len(remote)):
        raise LayoutError(f"KV head geometries differ: {local_geom} here, {remote_geom} there")
    li = np.asarray(local_ids, np.int64)
    ri = np.asarray(remote_ids, np.int64)
    outer = np.arange(local_geom.outer_count, dtype=np.int64)
    merged = local_geom.heads_adjacent and remote_geom.heads_adjacent
    heads = np.zeros(1, np.int64) if merged else np.arange(count, dtype=np.int64)
    length = local_geom.head_bytes * (count if merged else 1)
    outs_l, outs_r = [], []
    for lp, rp in zip(local, remote, strict=True):
        # [block, outer step, head] -> one range each, flattened in that order.
        lo = (lp.base + li[:, None, None] * lp.stride
              + outer[None, :, None] * local_geom.outer_stride
              + (local_head + heads[None, None, :]) * local_geom.head_stride)
        ro = (rp.base + ri[:, None, None] * rp.stride
              + outer[None, :, None] * remote_geom.outer_stride
              + (remote_head + heads[None, None, :]) * remote_geom.head_stride)
        outs_l.append(lo.ravel())
        outs_r.append(ro.ravel())
    local_addr = np.concatenate(outs_l).astype(np.uint64)
    return (local_addr, np.concatenate(outs_r).astype(np.uint64),
            np.full(len(local_addr), length, np.uint64))
