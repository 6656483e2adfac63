"""A store node driven message by message (no channel, no engine): its pool's slots lent to
clients' writes and reads and taken back by the rules in store/node.py; the "client's
one-sided write" is a memset at the address the node gave."""

from __future__ import annotations

import ctypes
import hashlib
from typing import Any

import pytest

from mooncake_vllm.store import messages as m
from mooncake_vllm.store.node import StoreNode
from mooncake_vllm.store.placement import HotSpots
from mooncake_vllm.store.pool import Pool

V = m.PROTOCOL_VERSION
SLOT = 1024
A, B = b"client-a", b"client-b"


def key(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


class Node:
    def __init__(self, slots: int = 4) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.pool = Pool(SLOT, slots)
        self.node = StoreNode(self.pool, lambda to, msg: self.sent.append((to, msg)),
                              landing_s=5.0, max_open=3)

    def ask(self, sender: bytes, msg: m.Message, now: float = 0.0) -> Any:
        self.sent.clear()
        self.node.on_message(sender, msg, now)
        [(to, reply)] = self.sent
        assert to == sender
        return reply

    def write(self, sender: bytes, rid: str, keys: list[bytes], fill: int,
              now: float = 0.0) -> list[int]:
        reserved = self.ask(sender, m.Reserve(V, rid, keys, 10.0), now)
        for address in reserved.addresses:
            if address:
                ctypes.memset(address, fill, SLOT)
        self.node.on_message(sender, m.Commit(V, rid), now)
        return reserved.addresses


def test_written_blocks_are_found_and_read_where_the_pin_says() -> None:
    n = Node()
    n.write(A, "w1", [key(0), key(1)], 7)
    assert n.ask(B, m.Lookup(V, "l1", [key(0), key(1), key(2)])).held == 2
    pinned = n.ask(B, m.Pin(V, "p1", [key(0), key(1), key(2)], 10.0))
    assert len(pinned.addresses) == 2  # a miss ends them
    assert all(ctypes.string_at(a, SLOT) == bytes([7]) * SLOT for a in pinned.addresses)
    n.node.on_message(B, m.Unpin(V, "p1"))
    assert n.node.open_count() == 0 and n.node.hot.reads(key(0), 0.0) == 1


def test_a_reservation_is_invisible_until_committed_and_held_keys_are_skipped() -> None:
    n = Node()
    n.write(A, "w1", [key(0)], 1)
    reserved = n.ask(A, m.Reserve(V, "w2", [key(0), key(1)], 10.0))
    assert reserved.addresses[0] == 0 and reserved.addresses[1] != 0  # key 0: held already
    assert n.ask(B, m.Lookup(V, "l", [key(0), key(1)])).held == 1
    n.node.on_message(A, m.Commit(V, "w2"))
    assert n.ask(B, m.Lookup(V, "l", [key(0), key(1)])).held == 2


def test_only_the_client_that_reserved_commits_and_only_once() -> None:
    n = Node()
    n.ask(A, m.Reserve(V, "w1", [key(0)], 10.0))
    n.node.on_message(B, m.Commit(V, "w1"))  # a stranger's commit: refused
    assert n.node.stats["refused"] == 1 and n.pool.where(key(0)) is None
    n.node.on_message(A, m.Unpin(V, "w1"))  # the wrong kind: refused too
    assert n.node.stats["refused"] == 2
    n.node.on_message(A, m.Commit(V, "w1"))
    n.node.on_message(A, m.Commit(V, "w1"))
    assert n.pool.where(key(0)) == "dram" and n.node.stats["refused"] == 3


def test_an_abandoned_reservation_is_taken_back_only_after_its_lease_and_landing() -> None:
    n = Node(slots=1)
    n.ask(A, m.Reserve(V, "w1", [key(0)], 10.0), now=0.0)
    full = n.ask(B, m.Reserve(V, "w2", [key(1)], 10.0), now=1.0)
    assert full.addresses == [] and "pinned or being written" in full.reason
    n.node.on_message(B, m.Abort(V, "w2"))
    n.node.tick(14.9)  # lease 10 s + landing 5 s: a late write may still land until then
    assert n.node.open_count() == 1
    n.node.tick(15.0)
    assert n.node.open_count() == 0 and n.node.stats["expired"] == 1
    assert n.ask(B, m.Reserve(V, "w3", [key(1)], 10.0), now=16.0).addresses != []
    n.node.on_message(A, m.Commit(V, "w1"))  # too late: nothing open under that id
    assert n.pool.where(key(0)) is None


def test_an_abandoned_pin_is_released_after_its_lease_and_landing() -> None:
    n = Node(slots=1)
    n.write(A, "w1", [key(0)], 3)
    assert len(n.ask(B, m.Pin(V, "p1", [key(0)], 10.0), now=0.0).addresses) == 1
    assert n.ask(A, m.Reserve(V, "w2", [key(1)], 10.0), now=1.0).addresses == []
    n.node.on_message(A, m.Abort(V, "w2"))
    n.node.tick(15.0)
    assert len(n.ask(A, m.Reserve(V, "w3", [key(1)], 10.0), now=16.0).addresses) == 1


def test_ids_in_use_and_too_many_open_are_refused() -> None:
    n = Node()
    n.ask(A, m.Pin(V, "p1", [key(0)], 10.0))
    assert n.ask(A, m.Pin(V, "p1", [key(0)], 10.0)).addresses == []  # id in use
    n.ask(A, m.Pin(V, "p2", [key(0)], 10.0))
    n.ask(A, m.Pin(V, "p3", [key(0)], 10.0))
    refused = n.ask(A, m.Reserve(V, "w4", [key(1)], 10.0))  # max_open = 3
    assert refused.addresses == [] and "too many" in refused.reason
    assert n.ask(B, m.Reserve(V, "w1", [key(1)], 10.0)).addresses != []  # others are not held up


def test_replies_sent_to_the_store_are_refused_and_it_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    n = Node()
    n.node.on_message(A, m.Located(V, "x", 3))
    assert "refused Located" in caplog.text and n.sent == []
    assert n.ask(A, m.Lookup(V, "l", [key(0)])).held == 0


@pytest.mark.parametrize("frame", [
    b"\x00junk", m.encode(m.Lookup(2, "l", [])),
    m.encode(m.Lookup(V, "l", [b"short"])),  # type: ignore[list-item]
    m.encode(m.Reserve(V, "r", [], 10.0)).replace(b"reserve", b"reserv_"),
    b"\x92" + b"\x00" * (m.MAX_FRAME_BYTES + 1),
])
def test_frames_that_are_not_records_of_this_protocol_are_refused(frame: bytes) -> None:
    with pytest.raises(m.BadMessage):
        m.decode(frame)


def test_a_record_round_trips() -> None:
    msg = m.Pin(V, "p", [key(1), key(2)], 12.5)
    assert m.decode(m.encode(msg)) == msg


def test_the_primary_asks_for_copies_of_a_hot_block_and_cold_replicas_go() -> None:
    n = Node(slots=4)
    n.node.hot = HotSpots(hot_reads=2, max_replicas=3, window_s=10.0)
    n.write(A, "w1", [key(0), key(1)], 1)
    copies = [n.ask(B, m.Lookup(V, f"l{i}", [key(0)]), now=float(i)).copies for i in range(5)]
    assert copies == [[1], [2], [2], [3], [3]]  # 1 + reads in the window // hot_reads
    # On another owner, a reader writes a replica; read now and then, it stays.
    r = Node(slots=4)
    addresses = r.ask(A, m.Reserve(V, "w1", [key(0)], 10.0, replica=True), now=0.0).addresses
    assert addresses[0]
    r.node.on_message(A, m.Commit(V, "w1"), 0.0)
    assert r.node.stats["replicas_written"] == 1
    pinned = r.ask(B, m.Pin(V, "p1", [key(0)], 10.0), now=15.0)
    r.node.on_message(B, m.Unpin(V, "p1"), 15.0)
    assert len(pinned.addresses) == 1
    r.node.tick(30.0)
    assert r.pool.where(key(0)) == "dram"  # read 15 s ago: not two windows
    r.node.tick(35.0)
    assert r.pool.where(key(0)) is None and r.node.stats["replicas_dropped"] == 1
    # An ordinary entry is never dropped for being cold.
    r.write(A, "w2", [key(1)], 2, now=0.0)
    r.node.tick(100.0)
    assert r.pool.where(key(1)) == "dram"


def test_a_lookup_that_does_not_count_leaves_hot_spots_alone() -> None:
    n = Node()
    n.node.hot = HotSpots(hot_reads=1, max_replicas=3, window_s=10.0)
    for i in range(5):
        assert n.ask(B, m.Lookup(V, f"c{i}", [key(0)], count=False)).copies == [1]
    assert n.node.hot.reads(key(0), 0.0) == 0
