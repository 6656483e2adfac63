"""The RDMA transport's logic, run against FakeVerbs: the software NIC test double (no RDMA
hardware here). Both engines live in this process; the QP handshake goes over real TCP, the
data moves by memcpy inside the fake NICs. See csrc/transports/rdma/fake_verbs.h."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from engine_helpers import LocalEngine, pattern

from mooncake_vllm import _engine
from mooncake_vllm.engine import BatchState, TransferError, compiled_transports

pytestmark = pytest.mark.skipif(
    "rdma" not in compiled_transports(), reason="built without libibverbs"
)
testing = _engine._testing


@pytest.fixture
def fake_pair(request) -> Iterator[tuple[LocalEngine, LocalEngine, int]]:
    """Initiator and target with 2 fake NICs each; yields (a, b, segment handle on a)."""
    options = getattr(request, "param", {})
    size = options.pop("size", 8 << 20)
    remote_read = options.pop("remote_read", False)
    testing.fake_verbs_reset()
    a = LocalEngine(size, protocol="rdma", verbs="fake", fake_nics=2, **options)
    b = LocalEngine(size, protocol="rdma", verbs="fake", fake_nics=2, remote_read=remote_read)
    try:
        yield a, b, a.engine.open_segment(b.engine.descriptor())
    finally:
        a.close()
        b.close()
        testing.fake_verbs_reset()


def test_descriptor_carries_devices_gids_and_rkeys(fake_pair) -> None:
    _, b, _ = fake_pair
    desc = b.engine.descriptor()
    assert desc["protocol"] == "rdma"
    assert len(desc["rdma_devices"]) == 2
    for dev in desc["rdma_devices"]:
        assert re.fullmatch(r"[0-9a-f]{32}", dev["gid"])
        assert dev["port"] == 1
    assert len(desc["rkeys"]) == len(desc["regions"]) == 1
    assert len(set(desc["rkeys"][0])) == 2  # one MR, with its own rkey, per NIC


@pytest.mark.parametrize(
    "fake_pair", [{"rdma_slice_bytes": 64 << 10, "rdma_signal_every": 4}], indirect=True
)
def test_write_is_sliced_striped_and_selectively_signalled(fake_pair) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = pattern(a.buffer.nbytes, seed=31)
    nbytes = 4 << 20
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [nbytes])
    assert np.array_equal(b.buffer[:nbytes], a.buffer[:nbytes])
    assert not b.buffer[nbytes:].any()
    stats = testing.fake_verbs_stats()
    slices = nbytes // (64 << 10)  # 64 slices of 64 KiB
    assert stats["wrs_posted"] == slices
    assert set(stats["wr_lengths"]) == {64 << 10}
    # striped evenly over the initiator's two NICs
    initiator = {k: v for k, v in stats["bytes_by_device"].items()}
    assert sorted(initiator.values()) == [nbytes // 2, nbytes // 2]
    # chains of 4 WRs, only the last of each signalled, one post_send per chain
    assert stats["wrs_signaled"] == slices // 4 == stats["post_send_calls"]
    assert stats["completions"] == stats["wrs_signaled"]
    assert stats["error_completions"] == 0 and stats["cq_overflows"] == 0


@pytest.mark.parametrize("fake_pair", [{"remote_read": True}], indirect=True)
def test_read_back(fake_pair) -> None:
    a, b, seg = fake_pair
    b.buffer[:] = pattern(b.buffer.nbytes, seed=32)
    a.engine.transfer_sync(seg, "read", [a.base + 100], [b.base + 5000], [3 << 20])
    assert np.array_equal(a.buffer[100 : 100 + (3 << 20)], b.buffer[5000 : 5000 + (3 << 20)])


def test_qps_go_reset_init_rtr_rts(fake_pair) -> None:
    a, b, seg = fake_pair
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4096])
    per_qp: dict[str, list[str]] = {}
    for entry in testing.fake_verbs_stats()["qp_transitions"]:
        qpn, step = entry.split(":")
        per_qp.setdefault(qpn, []).append(step)
    assert len(per_qp) == 4  # 2 lanes, a QP at each end
    for steps in per_qp.values():
        assert steps == ["RESET->INIT", "INIT->RTR", "RTR->RTS"]


@pytest.mark.parametrize(
    "fake_pair", [{"size": 64 << 20, "rdma_slice_bytes": 16 << 10}], indirect=True
)
def test_deep_batches_respect_the_send_queue_depth(fake_pair) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = pattern(a.buffer.nbytes, seed=33)
    # 4096 WRs: 2048 per QP, 8x its send-queue depth of 256
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [64 << 20])
    assert np.array_equal(a.buffer, b.buffer)
    stats = testing.fake_verbs_stats()
    assert stats["wrs_posted"] == 4096
    assert stats["send_queue_full"] == 0
    assert stats["max_outstanding"] <= 256


def test_layer_pattern_scattered_blocks(fake_pair) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = pattern(a.buffer.nbytes, seed=34)
    block, blocks = 16 << 10, 256
    rng = np.random.default_rng(35)
    src = rng.permutation(a.buffer.nbytes // block)[:blocks].astype(np.uint64)
    dst = rng.permutation(b.buffer.nbytes // block)[:blocks].astype(np.uint64)
    lengths = np.full(blocks, block, dtype=np.uint64)
    a.engine.transfer_sync(seg, "write", a.base + src * block, b.base + dst * block, lengths)
    for s, d in zip(src, dst, strict=True):
        s, d = int(s) * block, int(d) * block
        assert np.array_equal(b.buffer[d : d + block], a.buffer[s : s + block])


def test_injected_completion_error_fails_the_batch_with_verbs_status_then_reconnects(
    fake_pair,
) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = 1
    testing.fake_verbs_inject_error("RETRY_EXC_ERR", after_wrs=1)
    with pytest.raises(TransferError, match=r"transport retry counter exceeded \(wc status 12"):
        a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4 << 20])
    stats = testing.fake_verbs_stats()
    assert stats["error_completions"] >= 1
    assert any(t.endswith("RTS->ERR") for t in stats["qp_transitions"])
    # the next batch builds fresh QPs and succeeds
    a.buffer[:] = 2
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4 << 20])
    assert (b.buffer[: 4 << 20] == 2).all()
    rts = [t for t in testing.fake_verbs_stats()["qp_transitions"] if t.endswith("RTR->RTS")]
    assert len(rts) == 8  # 4 QPs for the first connection, 4 for the reconnection


def test_out_of_bounds_remote_write_is_a_remote_access_error(fake_pair) -> None:
    a, b, _ = fake_pair
    forged = b.engine.descriptor()
    forged["regions"] = [[b.base, 2 * b.buffer.nbytes]]  # claims twice what is registered
    seg = a.engine.open_segment(forged)
    a.buffer[:] = 7
    with pytest.raises(TransferError, match="remote access error"):
        a.engine.transfer_sync(seg, "write", [a.base], [b.base + b.buffer.nbytes - 4096], [8192])
    assert not b.buffer.any()


def test_unregistered_remote_memory_is_refused_by_the_nic(fake_pair) -> None:
    a, b, seg = fake_pair
    extra = np.zeros(1 << 20, dtype=np.uint8)
    b.engine.register(extra.ctypes.data, extra.nbytes)
    seg = a.engine.open_segment(b.engine.descriptor())  # now knows `extra` and its rkeys
    b.engine.unregister(extra.ctypes.data)
    a.buffer[:] = 3
    with pytest.raises(TransferError, match="remote access error"):
        a.engine.transfer_sync(seg, "write", [a.base], [extra.ctypes.data], [extra.nbytes])
    assert not extra.any()


def test_concurrent_batches_from_threads(fake_pair) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = pattern(a.buffer.nbytes, seed=36)
    chunk = a.buffer.nbytes // 16
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            off = i * chunk
            bid = a.engine.submit(seg, "write", [a.base + off], [b.base + off], [chunk])
            assert a.engine.wait(bid, timeout_s=20).state is BatchState.DONE
            a.engine.release(bid)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert np.array_equal(a.buffer, b.buffer)


def test_auto_picks_rdma_when_a_device_is_present(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mooncake_vllm.engine"):
        engine = LocalEngine(4096, protocol="auto", verbs="fake", fake_nics=1)
    try:
        assert engine.engine.protocol == "rdma"
        assert "using rdma" in caplog.text
    finally:
        engine.close()


def test_tcp_engine_cannot_open_an_rdma_segment(fake_pair, engine_factory) -> None:
    _, b, _ = fake_pair
    tcp = engine_factory()
    with pytest.raises(ValueError, match="speaks 'rdma'"):
        tcp.engine.open_segment(b.engine.descriptor())


@pytest.mark.parametrize("fake_pair", [{"timeout_s": 1.0}], indirect=True)
def test_stalled_peer_times_out_flushes_and_reconnects(fake_pair) -> None:
    a, b, seg = fake_pair
    a.buffer[:] = 4
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4096])  # connected
    testing.fake_verbs_inject_stall()
    started = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        a.engine.transfer_sync(seg, "write", [a.base], [b.base], [1 << 20])
    assert 0.9 < time.monotonic() - started < 2.5
    stats = testing.fake_verbs_stats()
    assert any(t.endswith("RTS->ERR") for t in stats["qp_transitions"])  # aborted -> flushed
    a.buffer[:] = 5
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [1 << 20])
    assert (b.buffer[: 1 << 20] == 5).all()
