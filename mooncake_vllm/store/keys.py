"""Content addresses of KV blocks.

A full block of `block_size` tokens is addressed by a chained hash: the key of block i covers
the tokens of blocks 0..i, so equal keys mean equal prefixes, and a lookup walks the chain
until the first miss. A partial last block has no key: the pool holds full blocks only.

Two steps, because the two halves of the connector know different things:
- the scheduler knows the tokens and the model (`ModelSpace`: model, dtype, block size,
  layers, heads, TP size) and computes the chain (`block_keys`);
- each worker knows how its cache lays a block out and which TP shard it holds (`ShardSpace`)
  and turns every chain key into the key of its shard's entry (`shard_keys`).
So KV that one instance could not use as its own (another model, dtype, block size, cache
layout, or another rank's heads) never shares a key with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KEY_BYTES = 32


def _digest(label: bytes, obj: object) -> bytes:
    text = json.dumps(asdict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(label + b"\0" + text.encode()).digest()


def _require_positive(obj: object, names: Sequence[str]) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 1, got "
                             f"{getattr(obj, name)}")


@dataclass(frozen=True)
class ModelSpace:
    """What the scheduler knows that two instances must share for KV to be exchangeable."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    total_kv_heads: int
    head_size: int
    tp_size: int = 1

    def __post_init__(self) -> None:
        _require_positive(self, ("block_size", "num_layers", "total_kv_heads", "head_size",
                                 "tp_size"))

    def digest(self) -> bytes:
        return _digest(b"mooncake-vllm model space v1", self)


@dataclass(frozen=True)
class ShardSpace:
    """What a worker adds: how its cache lays a block out, and which shard of heads it holds."""

    block_bytes: int  # one block of one layer and plane
    planes: int  # per layer (K and V apart, or together)
    num_layers: int
    tp_rank: int = 0

    def __post_init__(self) -> None:
        _require_positive(self, ("block_bytes", "planes", "num_layers"))
        if self.tp_rank < 0:
            raise ValueError(f"ShardSpace.tp_rank must be >= 0, got {self.tp_rank}")

    @property
    def entry_bytes(self) -> int:
        """Bytes of one pool entry: one block, every layer and plane."""
        return self.block_bytes * self.planes * self.num_layers

    def digest(self) -> bytes:
        return _digest(b"mooncake-vllm shard space v1", self)


def block_keys(space: ModelSpace, token_ids: Sequence[int]) -> list[bytes]:
    """One key per full block of `token_ids`, each chained on the one before."""
    return chain_keys(space.digest(), space.block_size, token_ids)


def chain_keys(seed: bytes, block_size: int, token_ids: Sequence[int]) -> list[bytes]:
    """`block_keys` from the space's digest (what an instance publishes for conductors)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or (len(ids) and ids.min() < 0):
        raise ValueError("token ids must be a flat sequence of non-negative integers")
    keys, prev = [], seed
    for i in range(len(ids) // block_size):
        block = ids[i * block_size:(i + 1) * block_size]
        prev = hashlib.sha256(prev + block.astype("<i8").tobytes()).digest()
        keys.append(prev)
    return keys


def shard_keys(shard: ShardSpace | bytes, keys: Sequence[bytes]) -> list[bytes]:
    """The keys of a shard's entries for the chain keys `keys` (`shard`: the space, or its
    digest as an instance publishes it)."""
    salt = shard if isinstance(shard, bytes) else shard.digest()
    return [hashlib.sha256(salt + key).digest() for key in keys]
