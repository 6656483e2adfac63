"""Where each KV block lives in memory, and the (local, remote, length) arrays of a transfer.

A layer's KV cache is one tensor with a block dimension. Dimensions before it split the cache
into planes (FlashAttention: [2, num_blocks, ...] -> a K plane and a V plane); the dimensions
after it are one block's interior, which must be one dense byte range. So block b of plane p of
layer l is the range  base[l][p] + b * stride[l][p]  of `block_bytes` bytes, on either side.

The CPU backend ([num_blocks, heads, block, 2*head]) has one plane; all layers may be slices
of one allocation. Both work without special cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mooncake_vllm.connector.messages import LayoutInfo


class LayoutError(ValueError):
    """A KV cache tensor this connector cannot describe as per-block byte ranges."""


@dataclass(frozen=True)
class Plane:
    base: int  # address of block 0
    stride: int  # bytes from block b to block b + 1


def _block_dim(t: torch.Tensor, num_blocks: int) -> int:
    # The first dimension of size num_blocks: planes (size 2, or 1) come before it in every
    # layout vLLM uses; a model whose num_blocks equals its plane count would be ambiguous,
    # and 2 blocks is not a usable cache.
    for d, n in enumerate(t.shape):
        if n == num_blocks:
            return d
    raise LayoutError(f"no dimension of size num_blocks={num_blocks} in shape {tuple(t.shape)}")


def describe_layer(t: torch.Tensor, num_blocks: int) -> tuple[list[Plane], int]:
    """Planes of one layer's cache and the byte length of one block."""
    d = _block_dim(t, num_blocks)
    es = t.element_size()
    inner_shape, inner_strides = t.shape[d + 1 :], t.stride()[d + 1 :]
    block_elems = math.prod(inner_shape)
    # The interior must be dense (any order): its largest reach equals its element count.
    reach = 1 + sum((n - 1) * s for n, s in zip(inner_shape, inner_strides, strict=True))
    if reach != block_elems:
        raise LayoutError(
            f"block interior of shape {tuple(inner_shape)} strides {tuple(inner_strides)} is "
            "not one dense byte range"
        )
    planes: list[Plane] = []
    outer = t.shape[:d]
    for idx in np.ndindex(*outer) if outer else [()]:
        off = sum(int(i) * s for i, s in zip(idx, t.stride()[:d], strict=True))
        planes.append(Plane(base=t.data_ptr() + off * es, stride=t.stride()[d] * es))
    return planes, block_elems * es


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


@dataclass(frozen=True)
class KVLayout:
    layer_names: tuple[str, ...]
    planes: tuple[tuple[Plane, ...], ...]  # [layer][plane]
    block_bytes: int
    num_blocks: int
    block_size: int
    dtype: str
    num_kv_heads: int
    head_size: int
    model: str
    tp_rank: int
    tp_size: int
    total_kv_heads: int = 0  # the model's, over all ranks (0: num_kv_heads * tp_size)
    heads: HeadGeometry | None = None  # None: the heads' place in a block is not known

    @classmethod
    def from_caches(
        cls, caches: Mapping[str, torch.Tensor], num_blocks: int, *, block_size: int,
        num_kv_heads: int, head_size: int, model: str, tp_rank: int = 0, tp_size: int = 1,
        total_kv_heads: int = 0,
    ) -> KVLayout:
        if not caches:
            raise LayoutError("no KV cache tensors to describe")
        names, planes, sizes, dtypes = [], [], set(), set()
        for name, t in caches.items():
            p, nbytes = describe_layer(t, num_blocks)
            names.append(name)
            planes.append(tuple(p))
            sizes.add(nbytes)
            dtypes.add(str(t.dtype).removeprefix("torch."))
        if len(sizes) != 1 or len(dtypes) != 1 or len({len(p) for p in planes}) != 1:
            raise LayoutError(
                f"layers differ in block bytes {sorted(sizes)}, dtype {sorted(dtypes)} or planes"
            )
        first = next(iter(caches.values()))
        try:  # needed only between different tensor-parallel sizes (head_slices.py)
            heads: HeadGeometry | None = head_geometry(first, _block_dim(first, num_blocks),
                                                       num_kv_heads)
        except LayoutError:
            heads = None
        return cls(tuple(names), tuple(planes), sizes.pop(), num_blocks, block_size,
                   dtypes.pop(), num_kv_heads, head_size, model, tp_rank, tp_size,
                   total_kv_heads or num_kv_heads * tp_size, heads)

    def info(self) -> LayoutInfo:
        return LayoutInfo(
            model=self.model, block_size=self.block_size, dtype=self.dtype,
            num_kv_heads=self.num_kv_heads, head_size=self.head_size,
            num_layers=len(self.layer_names), block_bytes=self.block_bytes,
            tp_rank=self.tp_rank, tp_size=self.tp_size,
            planes=[[(p.base, p.stride) for p in layer] for layer in self.planes],
            total_kv_heads=self.total_kv_heads or self.num_kv_heads * self.tp_size,
            heads=None if self.heads is None else (
                self.heads.outer_count, self.heads.outer_stride, self.heads.head_stride,
                self.heads.head_bytes),
        )


def coalesce(local_ids: np.ndarray, remote_ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Runs of blocks consecutive on both sides: (local start, remote start, run length)."""
    n = len(local_ids)
    if n == 0:
        e = np.empty(0, np.int64)
        return e, e, e
    brk = np.flatnonzero((np.diff(local_ids) != 1) | (np.diff(remote_ids) != 1)) + 1
    starts = np.concatenate(([0], brk))
    lengths = np.diff(np.concatenate((starts, [n])))
    return local_ids[starts], remote_ids[starts], lengths


def layer_transfer(
    local: tuple[tuple[int, int], ...] | list[tuple[int, int]],
    remote: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    block_bytes: int,
    local_ids: np.ndarray,
    remote_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(local addr, remote addr, length) uint64 arrays for one layer, all planes, vectorised.

    `local` / `remote`: that layer's planes as (base, stride). Runs of blocks that are adjacent
    on both sides become one range when the block stride equals the block length (blocks are
    back to back), which is the case for every layout vLLM allocates today.
    """
    l_start, r_start, run = coalesce(np.asarray(local_ids, np.int64),
                                     np.asarray(remote_ids, np.int64))
    outs_l, outs_r, outs_n = [], [], []
    for (lb, ls), (rb, rs) in zip(local, remote, strict=True):
        if ls == block_bytes and rs == block_bytes:
            outs_l.append(lb + l_start * ls)
            outs_r.append(rb + r_start * rs)
            outs_n.append(run * block_bytes)
        else:  # blocks not back to back in memory: one range per block
            li = np.asarray(local_ids, np.int64)
            ri = np.asarray(remote_ids, np.int64)
            outs_l.append(lb + li * ls)
            outs_r.append(rb + ri * rs)
            outs_n.append(np.full(len(li), block_bytes, np.int64))
    return (np.concatenate(outs_l).astype(np.uint64), np.concatenate(outs_r).astype(np.uint64),
            np.concatenate(outs_n).astype(np.uint64))


def memory_regions(caches: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Distinct (address, length) allocations behind the caches, for engine registration.

    Layers are often views of one allocation; registering the allocation once keeps the
    engine's region table short and avoids overlapping registrations.
    """
    seen: dict[int, int] = {}
    for t in caches.values():
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sorted(seen.items())
