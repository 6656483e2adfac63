"""The RDMA transport under faults and hostile handshakes, against FakeVerbs (the software NIC
test double; see csrc/transports/rdma/fake_verbs.h): re-opened segments, partial posts,
PSNs, address choice (port, GID, MTU, hop limit), the completion budget, QP caps and clean-up,
and a slow handshake that must not stall other peers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import wire_client as wire
from engine_helpers import LocalEngine, pattern

from mooncake_vllm import _engine
from mooncake_vllm.engine import BatchState, TransferError, compiled_transports

pytestmark = pytest.mark.skipif(
    "rdma" not in compiled_transports(), reason="built without libibverbs"
)
testing = _engine._testing
MiB = 1 << 20


@pytest.fixture
def engines() -> Iterator:
    """Makes fake-RDMA engines; closes them and resets the fake fabric afterwards."""
    made: list[LocalEngine] = []
    testing.fake_verbs_reset()

    def make(size: int = 8 * MiB, **kwargs) -> LocalEngine:
        kwargs.setdefault("fake_nics", 2)
        engine = LocalEngine(size, protocol="rdma", verbs="fake", **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()
    testing.fake_verbs_reset()


def transitions(suffix: str) -> list[str]:
    return [t for t in testing.fake_verbs_stats()["qp_transitions"] if t.endswith(suffix)]


def test_reopening_an_unchanged_segment_keeps_live_qps(engines) -> None:
    a, b = engines(), engines()
    a.buffer[:] = pattern(a.buffer.nbytes, seed=40)
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4096])  # connected
    testing.fake_verbs_inject_stall()  # the next WRs stay in flight until released
    first = a.engine.submit(seg, "write", [a.base], [b.base], [MiB])
    # The peer registers more memory and the connector re-opens its segment: same address.
    extra = np.zeros(MiB, dtype=np.uint8)
    b.engine.register(extra.ctypes.data, extra.nbytes)
    assert a.engine.open_segment(b.engine.descriptor()) == seg
    second = a.engine.submit(seg, "write", [a.base + MiB], [extra.ctypes.data], [MiB])
    testing.fake_verbs_release_stall()
    assert a.engine.wait(first).state is BatchState.DONE  # not "Work Request Flushed Error"
    assert a.engine.wait(second).state is BatchState.DONE
    assert np.array_equal(b.buffer[:MiB], a.buffer[:MiB])
    assert np.array_equal(extra, a.buffer[MiB : 2 * MiB])
    assert not transitions("->ERR")
    assert len(transitions("RTR->RTS")) == 4  # the first QPs, never rebuilt


def test_partial_post_send_fails_only_the_unposted_rest_and_recovers(engines) -> None:
    a = engines(rdma_slice_bytes=64 << 10, rdma_signal_every=4)
    b = engines()
    a.buffer[:] = 6
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4096])
    testing.fake_verbs_inject_partial_post(2)  # the next 4-WR chain: 2 posted, 2 refused
    with pytest.raises(TransferError, match=r"posted 2 of 4 work requests"):
        a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])
    # the posted prefix was flushed (its QP moved to ERR) and its completions consumed by the
    # completion thread, with the chain they name still alive
    assert transitions("->ERR")
    deadline = time.monotonic() + 3
    while testing.fake_verbs_stats()["error_completions"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert testing.fake_verbs_stats()["error_completions"] >= 2
    a.buffer[:] = 7
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4 * MiB])
    assert (b.buffer[: 4 * MiB] == 7).all()
    # deep batches after it: the send-queue accounting was not corrupted by the partial post
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [8 * MiB])
    assert testing.fake_verbs_stats()["send_queue_full"] == 0


def test_starting_psns_are_random_and_exchanged(engines) -> None:
    a, b = engines(), engines()
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])  # PSNs must match to work
    attrs = testing.fake_verbs_stats()["qp_attrs"]
    sq = [qp["sq_psn"] for qp in attrs.values()]
    assert len(sq) == 4
    assert len(set(sq)) > 1 and any(sq), sq
    assert {qp["rq_psn"] for qp in attrs.values()} == set(sq)  # each end expects the other's


def test_port_gid_mtu_and_hop_limit_are_chosen(engines) -> None:
    # a's NICs: port 1 down, port 2 active, MTU 1024; b's: one port, MTU 4096
    testing.fake_verbs_configure(ports=2, active_port=2, active_mtu=3)
    a = engines()
    testing.fake_verbs_configure()
    b = engines()
    assert {d["port"] for d in a.engine.descriptor()["rdma_devices"]} == {2}
    seg = a.engine.open_segment(b.engine.descriptor())
    a.buffer[:] = 8
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [2 * MiB])
    assert (b.buffer[: 2 * MiB] == 8).all()
    attrs = testing.fake_verbs_stats()["qp_attrs"].values()
    assert len(attrs) == 4
    assert sorted(qp["port"] for qp in attrs) == [1, 1, 2, 2]
    assert {qp["path_mtu"] for qp in attrs} == {3}  # min(1024, 4096) on both ends
    assert {qp["sgid_index"] for qp in attrs} == {3}  # the RoCE v2, IPv4-mapped GID
    assert {qp["hop_limit"] for qp in attrs} == {64}


def test_gid_index_override(engines) -> None:
    a, b = engines(rdma_gid_index=1), engines()
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])
    assert sorted(qp["sgid_index"] for qp in testing.fake_verbs_stats()["qp_attrs"].values()) == [
        1,
        1,
        3,
        3,
    ]


def test_outstanding_work_per_completion_queue_is_capped(engines) -> None:
    size = 32 * MiB
    a = engines(size, rdma_slice_bytes=16 << 10, rdma_cq_depth=256)
    peers = [engines(size), engines(size)]
    a.buffer[:] = pattern(size, seed=41)
    segs = [a.engine.open_segment(p.engine.descriptor()) for p in peers]
    # two peers: two QPs on each of a's CQs, each could hold 256 WRs
    bids = [
        a.engine.submit(s, "write", [a.base], [p.base], [size])
        for s, p in zip(segs, peers, strict=True)
    ]
    for bid in bids:
        assert a.engine.wait(bid, timeout_s=30).state is BatchState.DONE
    for p in peers:
        assert np.array_equal(p.buffer, a.buffer)
    stats = testing.fake_verbs_stats()
    assert stats["max_cq_outstanding"] <= 256, stats["max_cq_outstanding"]
    assert stats["cq_overflows"] == 0


def _control(endpoint: str, blob: bytes) -> tuple[int, str]:
    host, port = endpoint.rsplit(":", 1)
    sock, status = wire.connect((host, int(port)))
    assert status == 0
    with sock:
        sock.sendall(wire.request_header(wire.OP_CONTROL, total_bytes=len(blob)) + blob)
        magic, status, _, error_len, _, payload = wire.RESPONSE.unpack(
            wire.recv_exact(sock, wire.RESPONSE.size)
        )
        error = wire.recv_exact(sock, error_len).decode()
        wire.recv_exact(sock, payload)
        return status, error


def _qp_line(lane: int, device: int) -> str:
    return f"{lane} {device} {0x9000 + lane} {'fe80' + '0' * 28} 1 0 5\n"


def test_handshake_for_too_many_qps_or_a_missing_device_creates_none(engines) -> None:
    b = engines()
    before = testing.fake_verbs_stats()["live_qps"]
    too_many = "MVRDMA2 attacker:1\n" + "".join(_qp_line(i, 0) for i in range(17))
    status, error = _control(b.engine.endpoint, too_many.encode())
    assert status != 0 and "more than 16 queue pairs" in error
    bad_second = "MVRDMA2 attacker:2\n" + _qp_line(0, 0) + _qp_line(1, 99)
    status, error = _control(b.engine.endpoint, bad_second.encode())
    assert status != 0 and "device 99" in error
    assert testing.fake_verbs_stats()["live_qps"] == before, "no QP may be left behind"
    # a well-formed handshake still works
    a = engines()
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])


def test_control_frame_before_authentication_creates_no_qp(engines) -> None:
    b = engines(cluster_token="tok")
    before = testing.fake_verbs_stats()["live_qps"]
    host, port = b.engine.endpoint.rsplit(":", 1)
    blob = ("MVRDMA2 attacker:1\n" + _qp_line(0, 0)).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        wire.recv_exact(sock, wire.HELLO.size)
        # a CONTROL frame where the Auth answer belongs
        sock.sendall(wire.request_header(wire.OP_CONTROL, total_bytes=len(blob)) + blob)
        sock.sendall(bytes(wire.AUTH.size))
        assert wire.closed_within(sock, 3.0)
    assert testing.fake_verbs_stats()["live_qps"] == before


def test_slow_handshake_with_one_peer_does_not_stall_the_others(engines) -> None:
    """A peer that accepts the handshake connection and never answers holds only batches to
    itself: completions (and error handling) for other peers go on."""

    def mute(server: wire.FakeServer, conn: socket.socket) -> None:
        wire.hello(conn, auth_required=False)
        conn.sendall(wire.VERDICT.pack(wire.MAGIC, 0, bytes(32)))
        server.drain(conn, 10.0)  # reads the CONTROL request, never answers

    fake = wire.FakeServer(mute)
    try:
        a = engines(timeout_s=4.0)
        b = engines()
        seg_b = a.engine.open_segment(b.engine.descriptor())
        a.engine.transfer_sync(seg_b, "write", [a.base], [b.base], [4096])
        desc = fake.descriptor()
        desc.update(
            protocol="rdma",
            rdma_devices=[{"name": "mute0", "gid": "fe80" + "0" * 28, "lid": 1, "port": 1}],
            rkeys=[[1]],
        )
        seg_mute = a.engine.open_segment(desc)
        stuck = threading.Thread(
            target=lambda: a.engine.submit(seg_mute, "write", [a.base], [1 << 40], [4096])
        )
        stuck.start()  # blocks in the handshake for up to 4 s
        time.sleep(0.3)
        testing.fake_verbs_inject_error("RETRY_EXC_ERR", after_wrs=0)
        with pytest.raises(TransferError, match="retry counter exceeded"):
            a.engine.transfer_sync(seg_b, "write", [a.base], [b.base], [MiB])
        started = time.monotonic()
        a.buffer[:] = 5
        a.engine.transfer_sync(seg_b, "write", [a.base], [b.base], [MiB])
        assert time.monotonic() - started < 2.0, "the completion thread waited for the handshake"
        assert stuck.is_alive(), "the mute handshake should still be pending"
        assert (b.buffer[:MiB] == 5).all()
        stuck.join(timeout=10)
    finally:
        fake.close()


def test_a_restarted_peer_gets_new_qps(engines) -> None:
    """Same endpoint and devices, but its regions were registered anew (other rkeys): the peer
    restarted, its QPs are gone, so the next batch reconnects instead of failing."""
    a, b = engines(), engines()
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [4096])
    desc = b.engine.descriptor()
    b.engine.unregister(b.base)
    b.engine.register(b.base, b.buffer.nbytes)  # new MRs, new rkeys
    restarted = b.engine.descriptor()
    assert restarted["rkeys"] != desc["rkeys"]
    assert a.engine.open_segment(restarted) == seg
    a.buffer[:] = 3
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])
    assert (b.buffer[:MiB] == 3).all()
    assert len(transitions("RTR->RTS")) == 8  # a second set of QPs


def test_oversized_handshake_reply_fails_the_batch_not_the_process(engines) -> None:
    """A malicious peer answers the QP handshake with a reply announcing 2^40 bytes."""

    def liar(server: wire.FakeServer, conn: socket.socket) -> None:
        wire.hello(conn, auth_required=False)
        conn.sendall(wire.VERDICT.pack(wire.MAGIC, 0, bytes(32)))
        _, _, _, _, _, seq, total = wire.REQUEST.unpack(wire.recv_exact(conn, wire.REQUEST.size))
        wire.recv_exact(conn, total)
        conn.sendall(wire.RESPONSE.pack(wire.MAGIC, 0, seq, 0, 0, 1 << 40))
        server.drain(conn)

    fake = wire.FakeServer(liar)
    try:
        a = engines()
        desc = fake.descriptor()
        desc.update(
            protocol="rdma",
            rdma_devices=[{"name": "liar0", "gid": "fe80" + "0" * 28, "lid": 1, "port": 1}],
            rkeys=[[1]],
        )
        seg = a.engine.open_segment(desc)
        before = testing.fake_verbs_stats()["live_qps"]
        with pytest.raises(TransferError, match=r"control reply of 1099511627776 bytes, limit"):
            a.engine.transfer_sync(seg, "write", [a.base], [1 << 40], [4096])
        assert testing.fake_verbs_stats()["live_qps"] == before  # its QPs were destroyed
        b = engines()
        seg_b = a.engine.open_segment(b.engine.descriptor())
        a.engine.transfer_sync(seg_b, "write", [a.base], [b.base], [MiB])
    finally:
        fake.close()


def test_rdma_read_needs_a_region_registered_for_remote_read(engines) -> None:
    a, b = engines(), engines()  # b's buffer: registered without remote_read
    b.buffer[:] = 4
    seg = a.engine.open_segment(b.engine.descriptor())
    with pytest.raises(TransferError, match="remote access error"):
        a.engine.transfer_sync(seg, "read", [a.base], [b.base], [MiB])
    assert not a.buffer.any()
    readable = np.full(MiB, 6, dtype=np.uint8)
    b.engine.register(readable.ctypes.data, readable.nbytes, remote_read=True)
    seg = a.engine.open_segment(b.engine.descriptor())
    a.engine.transfer_sync(seg, "read", [a.base], [readable.ctypes.data], [MiB])
    assert (a.buffer[:MiB] == 6).all()
