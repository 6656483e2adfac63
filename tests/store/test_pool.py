"""One node's pool on real memory and a real file: what a peer writes at a reserved address
is what a reader finds at the pinned one, through eviction to SSD and back."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from mooncake_vllm.store.pool import Pool, PoolFull

SLOT = 4096


def _write(address: int, fill: int) -> None:
    """A peer's one-sided WRITE, as the engine would land it."""
    ctypes.memset(address, fill, SLOT)


def _read(address: int) -> bytes:
    return ctypes.string_at(address, SLOT)


def _put(pool: Pool, key: bytes, fill: int) -> None:
    address = pool.reserve(key)
    assert address is not None
    _write(address, fill)
    pool.commit(key)


def test_a_written_entry_is_read_back_and_invisible_until_committed(tmp_path: Path) -> None:
    pool = Pool(SLOT, 4)
    address = pool.reserve(b"a")
    assert address is not None and pool.base <= address < pool.base + pool.nbytes
    _write(address, 7)
    assert pool.lookup([b"a"]) == 0 and pool.pin(b"a") is None  # not yet committed
    assert pool.reserve(b"a") is None  # being written: nobody else writes it
    pool.commit(b"a")
    assert pool.reserve(b"a") is None  # held: a writer skips it
    got = pool.pin(b"a")
    assert got == address and _read(got) == bytes([7]) * SLOT
    pool.unpin(b"a")


def test_lru_entries_move_to_ssd_and_come_back_intact(tmp_path: Path) -> None:
    pool = Pool(SLOT, 2, tmp_path / "ssd.bin", ssd_slots=4)
    for i, key in enumerate((b"a", b"b", b"c")):
        _put(pool, key, i + 1)
    assert [pool.where(k) for k in (b"a", b"b", b"c")] == ["ssd", "dram", "dram"]
    assert pool.stats["to_ssd"] == 1
    address = pool.pin(b"a")  # read back from the file into a DRAM slot (b goes to SSD)
    assert address is not None and _read(address) == bytes([1]) * SLOT
    assert pool.stats["ssd_hits"] == 1 and pool.where(b"b") == "ssd"
    pool.unpin(b"a")
    assert pool.lookup([b"a", b"b", b"c", b"d"]) == 3
    pool.close()
    assert not (tmp_path / "ssd.bin").exists()


def test_the_ssd_tiers_least_recently_used_entry_is_gone(tmp_path: Path) -> None:
    pool = Pool(SLOT, 1, tmp_path / "ssd.bin", ssd_slots=1)
    for i, key in enumerate((b"a", b"b", b"c")):
        _put(pool, key, i + 1)
    assert [pool.where(k) for k in (b"a", b"b", b"c")] == [None, "ssd", "dram"]
    assert pool.stats["evicted"] == 1 and pool.pin(b"a") is None
    assert pool.stats["misses"] == 1


def test_without_ssd_the_least_recently_used_entry_is_gone() -> None:
    pool = Pool(SLOT, 2)
    for i, key in enumerate((b"a", b"b")):
        _put(pool, key, i + 1)
    pool.unpin(b"x")  # unpinning what is not pinned is harmless
    assert pool.pin(b"a") is not None  # a is now the most recently used
    pool.unpin(b"a")
    _put(pool, b"c", 3)
    assert [pool.where(k) for k in (b"a", b"b", b"c")] == ["dram", None, "dram"]


def test_pinned_and_reserved_slots_are_never_evicted() -> None:
    pool = Pool(SLOT, 2)
    _put(pool, b"a", 1)
    address = pool.pin(b"a")
    assert pool.reserve(b"b") is not None  # the free slot
    with pytest.raises(PoolFull, match="all 2 DRAM slots are pinned or being written"):
        pool.reserve(b"c")
    assert address is not None and _read(address) == bytes([1]) * SLOT  # untouched
    pool.abort(b"b")
    assert pool.reserve(b"c") is not None  # the aborted write's slot
    pool.unpin(b"a")
    assert pool.occupancy() == {"dram": {"slots": 2, "used": 2, "pinned": 0},
                                "ssd": {"slots": 0, "used": 0}}


def test_lookup_walks_the_prefix_until_the_first_miss() -> None:
    pool = Pool(SLOT, 4)
    for key in (b"k0", b"k1", b"k3"):
        _put(pool, key, 1)
    assert pool.lookup([b"k0", b"k1", b"k2", b"k3"]) == 2
    assert pool.lookup([b"k2", b"k3"]) == 0


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    for args in ((0, 1), (SLOT, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            Pool(*args)
    with pytest.raises(ValueError, match="needs a file path"):
        Pool(SLOT, 1, None, ssd_slots=2)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_ssd_entry_is_a_miss_not_wrong_kv(tmp_path: Path, damage: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ssd.bin"
    pool = Pool(SLOT, 1, path, ssd_slots=2)
    _put(pool, b"a", 1)
    _put(pool, b"b", 2)  # "a" moves to SSD
    assert pool.where(b"a") == "ssd"
    with path.open("r+b") as f:
        if damage == "flip":
            f.seek(SLOT // 2)  # "a" is in SSD slot 0
            f.write(b"\xff")
        else:
            f.truncate(SLOT // 2)
    assert pool.pin(b"a") is None
    assert pool.where(b"a") is None and pool.stats["ssd_corrupt"] == 1
    assert "is damaged" in caplog.text
    assert pool.lookup([b"a"]) == 0
    _put(pool, b"a", 3)  # the key can be written again
    assert pool.where(b"a") == "dram"
    pool.close()


def test_drop_spares_pinned_and_reserved_entries() -> None:
    pool = Pool(SLOT, 3)
    _put(pool, b"a", 1)
    assert pool.pin(b"a") is not None
    assert pool.reserve(b"b") is not None
    assert not pool.drop(b"a") and not pool.drop(b"b")
    pool.unpin(b"a")
    assert pool.drop(b"a") and pool.where(b"a") is None
    assert pool.occupancy()["dram"]["used"] == 1  # only "b" (being written)
