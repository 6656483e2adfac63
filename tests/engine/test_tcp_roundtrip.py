"""WRITE and READ between two engines, in one process and across two processes."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import pattern, sha256

from mooncake_vllm.engine import BatchState, compiled_transports


def test_tcp_is_compiled_in() -> None:
    assert "tcp" in compiled_transports()


def test_write_then_read_in_one_process(engine_factory) -> None:
    a = engine_factory(4 << 20)
    b = engine_factory(4 << 20, remote_read=True)
    a.buffer[:] = pattern(a.buffer.nbytes, seed=1)
    seg = a.engine.open_segment(b.engine.descriptor())
    # 3 scattered blocks of different sizes, one of them crossing nothing but its own range
    offsets_local = np.array([0, 100_000, 3 << 20], dtype=np.uint64)
    offsets_remote = np.array([1 << 20, 7, 2 << 20], dtype=np.uint64)
    lengths = np.array([65536, 4096, 1 << 20], dtype=np.uint64)
    status = a.engine.transfer_sync(
        seg, "write", a.base + offsets_local, b.base + offsets_remote, lengths
    )
    assert status.state is BatchState.DONE
    for lo, ro, n in zip(offsets_local, offsets_remote, lengths, strict=True):
        assert np.array_equal(b.buffer[ro : ro + n], a.buffer[lo : lo + n])
    untouched = np.ones(b.buffer.nbytes, dtype=bool)
    for ro, n in zip(offsets_remote, lengths, strict=True):
        untouched[ro : ro + n] = False
    assert not b.buffer[untouched].any(), "bytes outside the requested ranges were written"

    # READ them back into a cleared local buffer
    a.buffer[:] = 0
    a.engine.transfer_sync(seg, "read", a.base + offsets_local, b.base + offsets_remote, lengths)
    for lo, ro, n in zip(offsets_local, offsets_remote, lengths, strict=True):
        assert np.array_equal(a.buffer[lo : lo + n], b.buffer[ro : ro + n])


def test_large_write_striped_across_connections(engine_factory) -> None:
    a = engine_factory(40 << 20, connections_per_peer=3)
    b = engine_factory(40 << 20)
    a.buffer[:] = pattern(a.buffer.nbytes, seed=2)
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [a.buffer.nbytes])
    assert sha256(a.buffer) == sha256(b.buffer)
    stats = a.engine.stats()
    assert stats["connects"] == 3  # every connection carried a share
    assert stats["messages_sent"] >= 3
    assert stats["bytes_sent"] == a.buffer.nbytes


def test_small_batches_queued_together_share_system_calls(engine_factory) -> None:
    a = engine_factory(32 << 20, connections_per_peer=1)
    b = engine_factory(32 << 20)
    a.buffer[:] = pattern(a.buffer.nbytes, seed=6)
    seg = a.engine.open_segment(b.engine.descriptor())
    busy = a.engine.submit(seg, "write", [a.base], [b.base], [16 << 20])  # occupies the link
    block = 4096
    target = b.base + (16 << 20)
    small = [
        a.engine.submit(seg, "write", [a.base + i * block], [target + i * block], [block])
        for i in range(64)
    ]
    for bid in [busy, *small]:
        assert a.engine.wait(bid, timeout_s=20).state is BatchState.DONE
    stats = a.engine.stats()
    assert stats["messages_sent"] == 1 + 64  # one connection: the 16 MiB batch is one message
    assert stats["send_calls"] < stats["messages_sent"]
    assert np.array_equal(b.buffer[16 << 20 : (16 << 20) + 64 * block], a.buffer[: 64 * block])


def test_write_and_read_across_processes(engine_factory, peer_factory) -> None:
    size = 8 << 20
    peer = peer_factory(size, remote_read=True)
    local = engine_factory(size)
    local.buffer[:] = pattern(size, seed=3)
    seg = local.engine.open_segment(peer.descriptor)

    # a layer-like batch: 256 scattered 16 KiB blocks, in shuffled order
    block = 16 << 10
    rng = np.random.default_rng(4)
    remote_blocks = rng.permutation(size // block)[:256].astype(np.uint64)
    local_blocks = np.arange(256, dtype=np.uint64)
    lengths = np.full(256, block, dtype=np.uint64)
    local_addrs = local.base + local_blocks * block
    remote_addrs = peer.base + remote_blocks * block
    local.engine.transfer_sync(seg, "write", local_addrs, remote_addrs, lengths)
    for lb, rb in list(zip(local_blocks, remote_blocks, strict=True))[:: 37]:
        assert peer.digest(int(rb) * block, block) == sha256(
            local.buffer[int(lb) * block : int(lb + 1) * block]
        )

    # the peer fills a region; we READ it
    peer.call(cmd="fill", offset=0, length=size, seed=5)
    local.buffer[:] = 0
    local.engine.transfer_sync(seg, "read", [local.base], [peer.base], [size])
    assert sha256(local.buffer) == peer.digest(0, size)
    assert np.array_equal(local.buffer, pattern(size, seed=5))


def test_submit_returns_at_once_and_status_polls(engine_factory) -> None:
    a = engine_factory(16 << 20)
    b = engine_factory(16 << 20)
    seg = a.engine.open_segment(b.engine.descriptor())
    bid = a.engine.submit(seg, "write", [a.base], [b.base], [16 << 20])
    first = a.engine.status(bid)
    assert first.state in (BatchState.PENDING, BatchState.DONE)
    assert a.engine.wait(bid, timeout_s=10).state is BatchState.DONE
    assert a.engine.status(bid).state is BatchState.DONE
    a.engine.release(bid)
    with pytest.raises(ValueError, match="unknown batch"):
        a.engine.status(bid)


def test_open_segment_is_idempotent_per_name(engine_factory) -> None:
    a = engine_factory()
    b = engine_factory()
    desc = b.engine.descriptor()
    assert a.engine.open_segment(desc) == a.engine.open_segment(dict(desc))


def test_empty_batch_is_done_at_once(engine_factory) -> None:
    a = engine_factory()
    b = engine_factory()
    seg = a.engine.open_segment(b.engine.descriptor())
    empty = np.zeros(0, dtype=np.uint64)
    assert a.engine.transfer_sync(seg, "write", empty, empty, empty).state is BatchState.DONE


def test_reopening_a_segment_with_new_regions_keeps_the_handle(engine_factory) -> None:
    a = engine_factory(1 << 20)
    b = engine_factory(1 << 20)
    seg = a.engine.open_segment(b.engine.descriptor())
    extra = np.zeros(1 << 16, dtype=np.uint8)
    b.engine.register(extra.ctypes.data, extra.nbytes)
    with pytest.raises(ValueError, match="outside the regions"):
        a.engine.submit(seg, "write", [a.base], [extra.ctypes.data], [4096])
    assert a.engine.open_segment(b.engine.descriptor()) == seg
    a.buffer[:4096] = 8
    a.engine.transfer_sync(seg, "write", [a.base], [extra.ctypes.data], [4096])
    assert (extra[:4096] == 8).all()
