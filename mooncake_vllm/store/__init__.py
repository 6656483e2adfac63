"""The cluster KV pool (issue 13): a store on every node offers DRAM registered with the
transfer engine, with an SSD tier below it, holding KV blocks by content address.

- `keys.py`: a block's address is the chained hash of its tokens, seeded with everything that
  makes KV incompatible (model, dtype, block size, layout, tensor-parallel shard).
- `placement.py`: which stores own a block (rendezvous hashing over the live stores, so no
  central server is on the data path), and the hot-spot rule that adds replicas of blocks
  read often and drops them when they cool.
- `pool.py`: one node's tiers: fixed-size slots in DRAM (addresses the engine reads and
  writes one-sided), LRU eviction DRAM -> SSD -> gone, slots pinned while a transfer uses
  them.
- `messages.py` and `node.py`: the pool protocol (Lookup, Reserve/Commit/Abort, Pin/Unpin)
  and a store node's side of it, a state machine over a Pool and a `send` function, with
  its failure rules (leases, the landing bound, who may close what).

Not wired in yet: the store process (its control channel and engine), its membership in
etcd, the connector's loads and saves, and the conductor's view of the pool come next
(issue 13).
"""
