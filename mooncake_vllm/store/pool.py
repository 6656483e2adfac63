"""One node's pool: fixed-size slots of DRAM that the transfer engine reads and writes
one-sided, with an SSD tier below.

Rules:
- An entry is one whole block (every layer and plane: `ShardSpace.entry_bytes`) in one slot.
- Writes: `reserve(key)` hands out a free DRAM slot's address for a peer's one-sided WRITE;
  the entry is invisible to lookups until `commit(key)`, and `abort(key)` frees the slot.
  A key already held is not reserved again (the writer skips it).
- Reads: `pin(key)` gives the DRAM address of a committed entry (one on SSD is read back into
  a DRAM slot first) and keeps it there until `unpin(key)`, so eviction never overwrites
  memory that a peer's READ may still be reading.
- Eviction: the least recently used DRAM entry that is neither pinned nor reserved moves to
  the SSD tier (written from the DRAM slot straight to the file, no copy through Python
  objects), or is gone where there is none; the SSD's least recently used entry is gone.
- `lookup(keys)` counts how many leading keys are held, in either tier: a prefix walk.
- The SSD tier keeps a checksum of every entry it holds (in memory) and checks it when the
  entry is read back: a corrupted or truncated file is a miss (the entry is dropped), never
  wrong KV.
All methods are thread-safe (one lock): the store's control thread and transfer completions
call them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _checksum(view: memoryview) -> bytes:
    return hashlib.blake2b(view, digest_size=16).digest()


class PoolFull(RuntimeError):
    """No DRAM slot can be freed: every one is pinned or reserved."""


class Pool:
    def __init__(self, slot_bytes: int, dram_slots: int, ssd_path: Path | None = None,
                 ssd_slots: int = 0) -> None:
        if slot_bytes < 1 or dram_slots < 1 or ssd_slots < 0:
            raise ValueError("slot_bytes and dram_slots must be >= 1, ssd_slots >= 0")
        if ssd_slots and ssd_path is None:
            raise ValueError("an SSD tier needs a file path")
        self.slot_bytes, self.dram_slots, self.ssd_slots = slot_bytes, dram_slots, ssd_slots
        self._arena = np.zeros(slot_bytes * dram_slots, np.uint8)
        self._view = memoryview(self._arena)
        self._lock = threading.Lock()
        self._dram: OrderedDict[bytes, int] = OrderedDict()  # committed, LRU first
        self._reserved: dict[bytes, int] = {}
        self._pins: dict[bytes, int] = {}
        self._free = list(range(dram_slots - 1, -1, -1))
        self._ssd: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()  # slot, checksum
        self._ssd_free = list(range(ssd_slots - 1, -1, -1))
        self._fd = -1
        self.ssd_path = ssd_path
        if ssd_slots:
            assert ssd_path is not None
            ssd_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(ssd_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, slot_bytes * ssd_slots)
        self.stats = {"dram_hits": 0, "ssd_hits": 0, "misses": 0, "writes": 0,
                      "to_ssd": 0, "evicted": 0, "ssd_corrupt": 0, "dropped": 0}

    # ------------------------------------------------------------------ memory
    @property
    def base(self) -> int:
        """Address of the DRAM tier (register [base, base + nbytes) with the engine)."""
        return int(self._arena.ctypes.data)

    @property
    def nbytes(self) -> int:
        return int(self._arena.nbytes)

    def _address(self, slot: int) -> int:
        return self.base + slot * self.slot_bytes

    def _slot_view(self, slot: int) -> memoryview:
        return self._view[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    # ------------------------------------------------------------------ writes
    def reserve(self, key: bytes) -> int | None:
        """A DRAM address to write `key` into; None when the key is already held or being
        written. PoolFull when every slot is pinned or reserved."""
        with self._lock:
            if key in self._dram or key in self._reserved or key in self._ssd:
                return None
            slot = self._take_slot()
            self._reserved[key] = slot
            return self._address(slot)

    def commit(self, key: bytes) -> None:
        with self._lock:
            slot = self._reserved.pop(key)
            self._dram[key] = slot
            self.stats["writes"] += 1

    def abort(self, key: bytes) -> None:
        with self._lock:
            slot = self._reserved.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    # ------------------------------------------------------------------ reads
    def pin(self, key: bytes) -> int | None:
        """The DRAM address of `key`, held there until unpin; None on a miss."""
        with self._lock:
            slot = self._dram.get(key)
            if slot is not None:
                self._dram.move_to_end(key)
                self.stats["dram_hits"] += 1
            elif key in self._ssd:
                slot = self._take_slot()
                if not self._read_back(key, slot):
                    self._free.append(slot)
                    self.stats["misses"] += 1
                    return None
                self._dram[key] = slot
                self.stats["ssd_hits"] += 1
            else:
                self.stats["misses"] += 1
                return None
            self._pins[key] = self._pins.get(key, 0) + 1
            return self._address(slot)

    def _read_back(self, key: bytes, slot: int) -> bool:
        """Read `key`'s SSD copy into DRAM `slot`; False (and the entry dropped) when the
        file is short or the bytes are not those written (lock held)."""
        ssd_slot, checksum = self._ssd[key]
        view = self._slot_view(slot)
        try:
            got = os.preadv(self._fd, [view], ssd_slot * self.slot_bytes)
        except OSError as e:
            got, why = -1, str(e)
        else:
            why = f"{got} of {self.slot_bytes} bytes" if got != self.slot_bytes else "checksum"
        if got == self.slot_bytes and _checksum(view) == checksum:
            self._ssd.move_to_end(key)
            return True
        del self._ssd[key]
        self._ssd_free.append(ssd_slot)
        self.stats["ssd_corrupt"] += 1
        log.error("store: SSD entry %s in %s is damaged (%s): dropped, read as a miss",
                  key.hex()[:16], self.ssd_path, why)
        return False

    def busy(self, key: bytes) -> bool:
        """Pinned or being written."""
        with self._lock:
            return key in self._pins or key in self._reserved

    def drop(self, key: bytes) -> bool:
        """Forget `key` in both tiers unless it is pinned or being written; True if gone."""
        with self._lock:
            if key in self._pins or key in self._reserved:
                return False
            slot = self._dram.pop(key, None)
            if slot is not None:
                self._free.append(slot)
            ssd = self._ssd.pop(key, None)
            if ssd is not None:
                self._ssd_free.append(ssd[0])
            if slot is not None or ssd is not None:
                self.stats["dropped"] += 1
            return True

    def unpin(self, key: bytes) -> None:
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n > 0:
                self._pins[key] = n
            else:
                self._pins.pop(key, None)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held (committed, either tier)."""
        with self._lock:
            n = 0
            for key in keys:
                if key not in self._dram and key not in self._ssd:
                    break
                n += 1
            return n

    def where(self, key: bytes) -> str | None:
        """"dram", "ssd" or None: for status and tests."""
        with self._lock:
            return "dram" if key in self._dram else "ssd" if key in self._ssd else None

    def occupancy(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"dram": {"slots": self.dram_slots, "used": len(self._dram)
                             + len(self._reserved), "pinned": len(self._pins)},
                    "ssd": {"slots": self.ssd_slots, "used": len(self._ssd)}}

    # ------------------------------------------------------------------ eviction
    def _take_slot(self) -> int:
        """A free DRAM slot, evicting the least recently used entry not in use (lock held)."""
        if self._free:
            return self._free.pop()
        victim = next((k for k in self._dram if k not in self._pins), None)
        if victim is None:
            raise PoolFull(f"all {self.dram_slots} DRAM slots are pinned or being written")
        slot = self._dram.pop(victim)
        if self.ssd_slots:
            self._to_ssd(victim, slot)
        else:
            self.stats["evicted"] += 1
        return slot

    def _to_ssd(self, key: bytes, slot: int) -> None:
        if key in self._ssd:  # read back earlier and unchanged since: the copy is there
            self._ssd.move_to_end(key)
            return
        if self._ssd_free:
            ssd_slot = self._ssd_free.pop()
        else:
            _, (ssd_slot, _) = self._ssd.popitem(last=False)
            self.stats["evicted"] += 1
        view = self._slot_view(slot)
        try:
            written = os.pwritev(self._fd, [view], ssd_slot * self.slot_bytes)
        except OSError as e:  # a full or failing disk: the entry is gone, the pool goes on
            written, why = -1, str(e)
        else:
            why = f"{written} of {self.slot_bytes} bytes written"
        if written != self.slot_bytes:
            self._ssd_free.append(ssd_slot)
            self.stats["evicted"] += 1
            log.error("store: could not move an entry to SSD (%s): dropped", why)
            return
        self._ssd[key] = (ssd_slot, _checksum(view))
        self.stats["to_ssd"] += 1

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                if self.ssd_path is not None:
                    self.ssd_path.unlink(missing_ok=True)
