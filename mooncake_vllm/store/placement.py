"""Which stores hold a block, and the hot-spot rule that adds replicas.

Owners: rendezvous (highest random weight) hashing. Every live store gets a score per key,
a hash of (store id, key); the key's owners are the stores in descending score. Any node that
knows the live set (etcd leases) computes the same order with no server on the data path, and
a store joining or leaving moves only the keys it wins or held.

Hot spots. One popular prefix (a system prompt, a shared document) would make its primary
owner serve every reader. Every reader looks a block up at its primary owner, which counts
those lookups per block over a sliding window and answers that the block should have
`1 + reads // hot_reads` copies (at most `max_replicas`; `HotSpots.target`) on the first
owners in rendezvous order. A reader that has just loaded a block that should have more
copies writes it to the next owners itself (it holds the bytes; no store-to-store traffic),
marked as a replica; readers spread over the copies by their own rendezvous order (each
reader sticks to one copy, readers split evenly), falling back to the primary when their copy
is not there yet. A replica that no reader has pinned for two windows is dropped by the node
holding it, so a block that cools returns to one copy without any coordination.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence


def _score(node: str, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(node.encode() + b"\0" + key, digest_size=8).digest(),
                          "big")


def rendezvous(key: bytes, nodes: Sequence[str]) -> list[str]:
    """Every node, best owner of `key` first (ties, which need equal hashes, by id)."""
    return sorted(nodes, key=lambda n: (-_score(n, key), n))


def owners(key: bytes, nodes: Sequence[str], count: int) -> list[str]:
    return rendezvous(key, nodes)[:count]


def pick_replica(key: bytes, replicas: Sequence[str], reader: str) -> str:
    """The copy `reader` reads: its own rendezvous choice among them, so each reader sticks
    to one copy and readers spread evenly."""
    if not replicas:
        raise ValueError("no replica to read from")
    return rendezvous(key + b"\0" + reader.encode(), replicas)[0]


class HotSpots:
    """The primary's read counts and the copies each block should have (module docstring).

    The target at time t is `1 + reads in (t - window, t] // hot_reads`, capped; copies grow to
    the current target at once and shrink only to the larger of the current target and the
    one a window ago, so a surplus copy goes once two consecutive windows are quiet."""

    def __init__(self, hot_reads: int = 16, max_replicas: int = 3, window_s: float = 10.0,
                 max_tracked: int = 65536) -> None:
        if hot_reads < 1 or max_replicas < 1 or window_s <= 0 or max_tracked < 1:
            raise ValueError("hot_reads, max_replicas and max_tracked must be >= 1 and "
                             "window_s > 0")
        self.hot_reads, self.max_replicas, self.window_s = hot_reads, max_replicas, window_s
        self.max_tracked = max_tracked
        # Read times over the last two windows, per block, least recently read block first.
        self._reads: OrderedDict[bytes, deque[float]] = OrderedDict()

    def read(self, key: bytes, now: float) -> None:
        times = self._reads.get(key)
        if times is None:
            times = self._reads[key] = deque()
            while len(self._reads) > self.max_tracked:
                self._reads.popitem(last=False)
        self._reads.move_to_end(key)
        times.append(now)
        self._trim(times, now)

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - 2 * self.window_s:
            times.popleft()
        # Past twice what the largest target needs, more reads change nothing: bounded.
        while len(times) > 2 * self.hot_reads * self.max_replicas:
            times.popleft()

    def reads(self, key: bytes, now: float) -> int:
        """Reads in the window ending now."""
        times = self._reads.get(key)
        if times is None:
            return 0
        self._trim(times, now)
        return sum(1 for t in times if now - self.window_s < t <= now)

    def target(self, key: bytes, now: float) -> int:
        """Copies the block should have at `now`: 1 + reads in the window // hot_reads."""
        return min(self.max_replicas, 1 + self.reads(key, now) // self.hot_reads)

    def copies(self, key: bytes, kept: int, now: float) -> int:
        """How many copies to keep, given `kept` now: the current target when it is higher;
        else no fewer than the target of a window ago (and no more than `kept`)."""
        now_target = self.target(key, now)
        if now_target >= kept:
            return now_target
        return min(kept, max(now_target, self.target(key, now - self.window_s)))
