"""What an instance holds in its prefix cache: an LRU of block hashes.

Every prompt's full blocks are inserted after routing (the conductor knows which prompts it sent
where); where the instance publishes vLLM's KV cache events (kv_events.py), the blocks vLLM
reports stored are inserted and those it reports evicted are removed, so the index follows
vLLM's cache instead of guessing. The LRU capacity bounds it either way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt are (believed) cached."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def remove(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._lru.pop(h, None)

    def clear(self) -> None:
        self._lru.clear()
