"""Byte ranges of a run of KV heads inside blocks: what a prefill rank writes into a decode
rank of another tensor-parallel size (issue 14; `tp_mapping.py` says which heads).

Same TP sizes move whole blocks (layout.py). With different sizes a block on each side holds
another number of heads, so a run of heads is a sub-range of a block: where the heads are
outermost in the block interior (vLLM's CPU backend, [heads, block, 2*head]; HND layouts)
a run of heads is one range per block and plane; where tokens come first (NHD,
[block, heads, head]) it is one range per token. `HeadGeometry` says which, per side, from the
tensor's own shape and strides, and `head_transfer` builds the (local, remote, length) arrays
for the engine, vectorised, without a staging copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mooncake_vllm.connector.layout import LayoutError, Plane


@dataclass(frozen=True)
class HeadGeometry:
    """Inside one block of one plane, head h occupies the ranges
    `i * outer_stride + h * head_stride`, `head_bytes` long, for i < outer_count."""

    outer_count: int
    outer_stride: int
    head_stride: int
    head_bytes: int

    @property
    def heads_adjacent(self) -> bool:
        """Consecutive heads are back to back: a run of them is one range per outer step."""
        return self.head_stride == self.head_bytes


def head_geometry(t: torch.Tensor, block_dim: int, num_kv_heads: int) -> HeadGeometry:
    """The geometry of `t`'s block interior (the dimensions after `block_dim`), whose head
    dimension is the one of size `num_kv_heads`; refused when no dimension, or more than one
    (as many tokens as heads, say), has that size."""
    es = t.element_size()
    shape, strides = list(t.shape[block_dim + 1:]), list(t.stride()[block_dim + 1:])
    candidates = [d for d, n in enumerate(shape) if n == num_kv_heads]
    if len(candidates) != 1:  # none, or as many tokens (or channels) as heads: not guessed
        raise LayoutError(f"cannot tell the KV head dimension (of size {num_kv_heads}) in a "
                          f"block of shape {tuple(shape)}")
    h = candidates[0]
    inner_shape, inner_strides = shape[h + 1:], strides[h + 1:]
    inner = math.prod(inner_shape)
    reach = 1 + sum((n - 1) * s for n, s in zip(inner_shape, inner_strides, strict=True))
    if reach != inner:
        raise LayoutError(f"one KV head's part of a block of shape {tuple(shape)} is not one "
                          "dense range")
    outer_shape, outer_strides = shape[:h], strides[:h]
    # The dimensions before the head must step as one (a single count and stride).
    for d in range(len(outer_shape) - 1):
        if outer_strides[d] != outer_strides[d + 1] * outer_shape[d + 1]:
            raise LayoutError(f"the dimensions before the KV heads in a block of shape "
                              f"{tuple(shape)} do not step as one")
    outer_count = math.prod(outer_shape)
    outer_stride = outer_strides[-1] * es if outer_shape else 0
    return HeadGeometry(outer_count, outer_stride, strides[h] * es, inner * es)


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
