"""Failure cases: bounds checks, bad descriptors, cluster tokens, dead and hung peers,
unregistering memory under a queued transfer."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import PeerProcess, pattern, sha256

from mooncake_vllm.engine import BatchState, TransferEngine, TransferError


def test_remote_range_outside_descriptor_is_refused_at_submit(engine_factory) -> None:
    a = engine_factory(1 << 20)
    b = engine_factory(1 << 20)
    seg = a.engine.open_segment(b.engine.descriptor())
    with pytest.raises(ValueError, match="outside the regions of segment"):
        a.engine.submit(seg, "write", [a.base], [b.base + (1 << 20) - 10], [100])


def test_local_range_not_registered_is_refused(engine_factory) -> None:
    a = engine_factory(1 << 20)
    b = engine_factory(1 << 20)
    seg = a.engine.open_segment(b.engine.descriptor())
    stray = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError, match="local range .* not inside a registered region"):
        a.engine.submit(seg, "write", [stray.ctypes.data], [b.base], [4096])


def test_out_of_bounds_write_is_refused_by_the_receiver_and_nothing_is_written(
    engine_factory,
) -> None:
    a = engine_factory(2 << 20)
    b = engine_factory(1 << 20)
    a.buffer[:] = pattern(a.buffer.nbytes, seed=9)
    # A stale or forged descriptor claims a bigger region than b registered: the sender's own
    # check passes, the receiver's must not.
    forged = b.engine.descriptor()
    forged["regions"] = [[b.base, 2 << 20]]
    seg = a.engine.open_segment(forged)
    # The first block is in bounds, the second runs 1 MiB past the end: the whole message is
    # refused before any byte of it lands.
    bid = a.engine.submit(
        seg, "write", [a.base, a.base + 4096], [b.base, b.base + (1 << 20) - 4096], [4096, 1 << 20]
    )
    with pytest.raises(TransferError, match="outside the registered regions"):
        a.engine.wait(bid, timeout_s=10)
    assert a.engine.status(bid).state is BatchState.FAILED
    assert not b.buffer.any(), "a refused write must not write anything"
    # the connection survives a refused request: an in-bounds write still works
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [1 << 20])
    assert np.array_equal(b.buffer, a.buffer[: 1 << 20])


def test_out_of_bounds_read_is_refused(engine_factory) -> None:
    a = engine_factory(2 << 20)
    b = engine_factory(1 << 20)
    forged = b.engine.descriptor()
    forged["regions"] = [[b.base - 4096, 2 << 20]]
    seg = a.engine.open_segment(forged)
    with pytest.raises(TransferError, match="outside the registered regions"):
        a.engine.transfer_sync(seg, "read", [a.base], [b.base - 4096], [8192])
    assert not a.buffer.any()


@pytest.mark.parametrize("missing", ["name", "endpoint", "regions", "protocol"])
def test_descriptor_missing_field_names_it(engine_factory, missing: str) -> None:
    a = engine_factory()
    b = engine_factory()
    desc = b.engine.descriptor()
    del desc[missing]
    with pytest.raises(ValueError, match=f"missing '{missing}'"):
        a.engine.open_segment(desc)


def test_descriptor_with_bad_endpoint_is_refused(engine_factory) -> None:
    a = engine_factory()
    b = engine_factory()
    desc = b.engine.descriptor()
    desc["endpoint"] = "no-port-here"
    with pytest.raises(ValueError, match="not host:port"):
        a.engine.open_segment(desc)


def test_unreachable_endpoint_fails_the_batch_with_the_cause(engine_factory) -> None:
    a = engine_factory()
    b = engine_factory()
    desc = b.engine.descriptor()
    b.close()  # nobody listens on that port any more
    seg = a.engine.open_segment(desc)
    started = time.monotonic()
    with pytest.raises(TransferError, match=rf"connect to {desc['endpoint']} failed"):
        a.engine.transfer_sync(seg, "write", [a.base], [desc["regions"][0][0]], [4096])
    assert time.monotonic() - started < 5


def test_wrong_cluster_token_is_refused_and_nothing_written(engine_factory, caplog) -> None:
    b = engine_factory(1 << 20, cluster_token="right-token")
    wrong = engine_factory(1 << 20, cluster_token="wrong-token")
    none = engine_factory(1 << 20)
    wrong.buffer[:] = 7
    none.buffer[:] = 7
    desc = b.engine.descriptor()
    with pytest.raises(TransferError, match="wrong cluster token"):
        seg = wrong.engine.open_segment(desc)
        wrong.engine.transfer_sync(seg, "write", [wrong.base], [b.base], [4096])
    with pytest.raises(TransferError, match="requires a cluster token"):
        seg = none.engine.open_segment(desc)
        none.engine.transfer_sync(seg, "write", [none.base], [b.base], [4096])
    assert not b.buffer.any()
    right = engine_factory(1 << 20, cluster_token="right-token")
    right.buffer[:] = 3
    seg = right.engine.open_segment(desc)
    right.engine.transfer_sync(seg, "write", [right.base], [b.base], [4096])
    assert (b.buffer[:4096] == 3).all()


def test_cluster_token_mac_is_hmac_sha256() -> None:
    import hashlib
    import hmac

    from mooncake_vllm import _engine

    nonce = os.urandom(32)
    expected = hmac.new(b"k3y", nonce, hashlib.sha256).digest()
    assert _engine._testing.hmac_sha256("k3y", nonce) == expected


def test_peer_killed_mid_batch_fails_in_time_others_unaffected(
    engine_factory, peer_factory
) -> None:
    size = 32 << 20
    victim = peer_factory(size)
    survivor = engine_factory(size)
    local = engine_factory(size, timeout_s=3.0)
    local.buffer[:] = pattern(size, seed=11)
    seg_victim = local.engine.open_segment(victim.descriptor)
    seg_survivor = local.engine.open_segment(survivor.engine.descriptor())
    bids = [
        local.engine.submit(seg_victim, "write", [local.base], [victim.base], [size])
        for _ in range(6)
    ]
    victim.kill()  # SIGKILL while the batches stream
    started = time.monotonic()
    outcomes = []
    for bid in bids:
        try:
            outcomes.append(local.engine.wait(bid).state)
        except TransferError as error:
            outcomes.append(str(error))
    assert time.monotonic() - started < 3.0 + 1.5
    assert any(isinstance(o, str) for o in outcomes), outcomes  # at least the tail failed
    # the other peer never noticed
    local.engine.transfer_sync(seg_survivor, "write", [local.base], [survivor.base], [size])
    assert sha256(survivor.buffer) == sha256(local.buffer)


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until every thread of `pid` is stopped: kill() returns before a busy or sleeping thread
    has taken the stop, and on a loaded host a small write can complete in that gap."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that exited meanwhile
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout_s}s")


def test_hung_peer_times_out_then_reconnects(engine_factory, peer_factory) -> None:
    size = 4 << 20
    peer = peer_factory(size)
    local = engine_factory(size, timeout_s=1.5)
    local.buffer[:] = pattern(size, seed=12)
    seg = local.engine.open_segment(peer.descriptor)
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [size])  # connected
    os.kill(peer.proc.pid, signal.SIGSTOP)
    try:
        _wait_stopped(peer.proc.pid)
        started = time.monotonic()
        with pytest.raises(TransferError, match="timed out"):
            local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [size])
        elapsed = time.monotonic() - started
        assert 1.0 < elapsed < 1.5 + 1.5, elapsed
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
    # the stuck connection was dropped; the next batch reconnects and succeeds
    peer.call(cmd="zero")
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [size])
    assert peer.digest(0, size) == sha256(local.buffer)


def test_restarted_peer_on_same_endpoint_is_reconnected(engine_factory) -> None:
    size = 1 << 20
    first = PeerProcess(size)
    port = int(first.descriptor["endpoint"].rsplit(":", 1)[1])
    local = engine_factory(size, timeout_s=3.0)
    local.buffer[:] = pattern(size, seed=13)
    seg = local.engine.open_segment(first.descriptor)
    local.engine.transfer_sync(seg, "write", [local.base], [first.base], [size])
    first.kill()
    second = PeerProcess(size, port=port)
    try:
        assert local.engine.open_segment(second.descriptor) == seg  # same name, updated regions
        local.engine.transfer_sync(seg, "write", [local.base], [second.base], [size])
        assert second.digest(0, size) == sha256(local.buffer)
    finally:
        second.close()


def test_unregister_local_memory_while_queued_fails_that_transfer(engine_factory) -> None:
    a = engine_factory(64 << 20, connections_per_peer=1)
    b = engine_factory(64 << 20)
    extra = np.full(1 << 20, 5, dtype=np.uint8)
    a.engine.register(extra.ctypes.data, extra.nbytes)
    seg = a.engine.open_segment(b.engine.descriptor())
    # keep the only connection busy, then queue a transfer from `extra` behind it
    busy = [a.engine.submit(seg, "write", [a.base], [b.base], [64 << 20]) for _ in range(3)]
    queued = a.engine.submit(seg, "write", [extra.ctypes.data], [b.base], [extra.nbytes])
    a.engine.unregister(extra.ctypes.data)  # returns once nothing uses `extra` any more
    with pytest.raises(TransferError, match="unregistered while the transfer was queued"):
        a.engine.wait(queued)
    for bid in busy:
        assert a.engine.wait(bid).state is BatchState.DONE
    assert not (b.buffer[: 1 << 20] == 5).any()


def test_unregister_remote_memory_while_queued_fails_that_transfer(engine_factory) -> None:
    a = engine_factory(64 << 20, connections_per_peer=1)
    b = engine_factory(64 << 20)
    target = np.zeros(1 << 20, dtype=np.uint8)
    b.engine.register(target.ctypes.data, target.nbytes)
    a.buffer[:] = 9
    seg = a.engine.open_segment(b.engine.descriptor())
    busy = [a.engine.submit(seg, "write", [a.base], [b.base], [64 << 20]) for _ in range(3)]
    queued = a.engine.submit(seg, "write", [a.base], [target.ctypes.data], [target.nbytes])
    b.engine.unregister(target.ctypes.data)
    with pytest.raises(TransferError, match="outside the registered regions"):
        a.engine.wait(queued)
    for bid in busy:
        a.engine.wait(bid)
    assert not target.any()


def test_rdma_without_device_raises_and_auto_falls_back(caplog) -> None:
    with pytest.raises(TransferError, match="rdma"):
        TransferEngine(protocol="rdma")
    with caplog.at_level(logging.INFO, logger="mooncake_vllm.engine"):
        engine = TransferEngine(protocol="auto")
    try:
        assert engine.protocol == "tcp"
        assert "using tcp" in caplog.text
    finally:
        engine.close()


def test_bad_arguments_are_value_errors(engine_factory) -> None:
    a = engine_factory()
    b = engine_factory()
    seg = a.engine.open_segment(b.engine.descriptor())
    with pytest.raises(ValueError, match="same length"):
        a.engine.submit(seg, "write", [a.base, a.base], [b.base], [1])
    with pytest.raises(ValueError, match="op must be"):
        a.engine.submit(seg, "copy", [a.base], [b.base], [1])
    with pytest.raises(ValueError, match="unknown segment"):
        a.engine.submit(12345, "write", [a.base], [b.base], [1])
    with pytest.raises(ValueError, match="protocol must be"):
        TransferEngine(protocol="carrier-pigeon")
    with pytest.raises(ValueError, match="overlaps"):
        a.engine.register(a.base + 10, 100)
    with pytest.raises(ValueError, match="no region registered"):
        a.engine.unregister(a.base + 1)
