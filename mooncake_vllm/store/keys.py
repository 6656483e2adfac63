"""Content addresses of KV blocks.

A full block of `block_size` tokens is addressed by a chained hash: the key of block i covers
the tokens of blocks 0..i, so equal keys mean equal prefixes, and a lookup walks the chain
until the first miss. The chain starts from the digest of a `KVSpace`, everything that makes
one instance's KV unusable by another: the model, dtype, block size, the cache layout, and
the tensor-parallel shard (a rank stores the heads it holds). A partial last block has no key:
the pool holds full blocks only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KEY_BYTES = 32


@dataclass(frozen=True)
class KVSpace:
    """What two instances must share for one's KV blocks to be the other's."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    total_kv_heads: int
    head_size: int
    block_bytes: int  # one block of one layer and plane, as the cache lays it out
    planes: int  # per layer (K and V apart, or together)
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "total_kv_heads", "head_size", "block_bytes",
                     "planes", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVSpace.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVSpace.tp_rank {self.tp_rank} is not below tp_size "
                             f"{self.tp_size}")

    @property
    def entry_bytes(self) -> int:
        """Bytes of one pool entry: one block, every layer and plane."""
        return self.block_bytes * self.planes * self.num_layers

    def digest(self) -> bytes:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"mooncake-vllm kv space v1\0" + text.encode()).digest()


def block_keys(space: KVSpace, token_ids: Sequence[int]) -> list[bytes]:
    """One key per full block of `token_ids`, each chained on the one before."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or (len(ids) and ids.min() < 0):
        raise ValueError("token ids must be a flat sequence of non-negative integers")
    keys, prev = [], space.digest()
    for i in range(len(ids) // space.block_size):
        block = ids[i * space.block_size:(i + 1) * space.block_size]
        prev = hashlib.sha256(prev + block.astype("<i8").tobytes()).digest()
        keys.append(prev)
    return keys
