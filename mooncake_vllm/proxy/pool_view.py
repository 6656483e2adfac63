"""How much of a prompt's prefix the cluster KV pool holds, for the routing cost.

A prefix in the pool is available to every prefill instance of the same KV space, at the
cost of fetching it: routing (routing.assess) counts it as reused by every such candidate,
adding the time to move its bytes. The conductor computes the pool keys of rank 0's entries
from the prompt's token ids and what each instance publishes (`extra.pool`: the chain's seed
and the shard's salt) and asks the owners, as an instance would, without counting a read
(the instance it routes to looks the blocks up again). Bounded by `timeout_s`; a pool that
does not answer holds nothing, and routing goes on without it.
"""

from __future__ import annotations

import logging
from typing import Any

from mooncake_vllm.store.client import PoolLookup
from mooncake_vllm.store.keys import chain_keys, shard_keys

log = logging.getLogger(__name__)
PoolIdentity = tuple[bytes, bytes]  # (space digest, shard digest)

# Assumed until measured: the rate at which an instance fetches pool entries, for the routing
# cost. Conservative (TCP on a busy host); with RDMA fetches are faster and the pool only
# wins more often than predicted.
FETCH_BYTES_PER_S = 1e9


def identity_of(extra: Any) -> PoolIdentity | None:
    """An instance record's pool identity, or None; ValueError naming what is wrong."""
    pool = (extra or {}).get("pool") if isinstance(extra, dict) else None
    if pool is None:
        return None
    if not isinstance(pool, dict):
        raise ValueError("extra.pool is not an object")
    out = []
    for field in ("space", "shard"):
        v = pool.get(field)
        if not isinstance(v, str) or len(v) != 64:
            raise ValueError(f"extra.pool.{field} is not 64 hex digits")
        try:
            out.append(bytes.fromhex(v))
        except ValueError as e:
            raise ValueError(f"extra.pool.{field} is not 64 hex digits") from e
    return out[0], out[1]


class PoolView:
    def __init__(self, metadata: Any, token: str | None, timeout_s: float = 0.2) -> None:
        self.lookup = PoolLookup(metadata, hostname="127.0.0.1", token=token,
                                 ask_timeout_s=timeout_s, count_reads=False)

    def has_stores(self) -> bool:
        return bool(self.lookup.metadata.list_stores())

    def held_tokens(self, identity: PoolIdentity, block_size: int,
                    token_ids: tuple[int, ...]) -> int:
        """Tokens of the prompt's prefix whose entries the pool holds (blocking)."""
        keys = chain_keys(identity[0], block_size, token_ids)
        if not keys or not self.lookup.metadata.list_stores():
            return 0
        return self.lookup.lookup(shard_keys(identity[1], keys)).held * block_size

    def close(self) -> None:
        self.lookup.close()
