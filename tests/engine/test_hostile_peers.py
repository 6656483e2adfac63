"""Attacks and faults from the network, on real sockets against engines in other processes:
every length on the wire is bounded before it is allocated, handler-less CONTROL frames are
refused, both ends prove the cluster token, connections are capped and time out, and remote
READ needs a region registered for it. Each test checks that the engine logged the cause, is
still alive and still serves a normal transfer afterwards, and (where memory is the attack)
that its memory did not grow."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import wire_client as wire
from engine_helpers import PeerProcess, pattern, sha256

from mooncake_vllm.engine import TransferEngine, TransferError

MiB = 1 << 20


def assert_still_serving(peer: PeerProcess, local, size: int = MiB) -> None:
    """The peer process is alive and a normal WRITE into it lands."""
    assert peer.alive(), f"peer died: exit {peer.proc.returncode}\n{peer.log()}"
    local.buffer[:size] = pattern(size, seed=77)
    seg = local.engine.open_segment(peer.descriptor)
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [size])
    assert peer.digest(0, size) == sha256(local.buffer[:size])


def wait_for_log(peer: PeerProcess, text: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = peer.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged; log:\n{peer.log()}")


# --- 1. lengths from the wire ------------------------------------------------------------


def test_huge_control_frame_on_a_tcp_engine_is_refused_before_its_payload(
    peer_factory, engine_factory
) -> None:
    peer = peer_factory(4 * MiB)
    before = peer.rss_kib()
    # total_bytes = 2^63 used to be allocated as announced (SIGABRT); 256 MiB ones that never
    # finish grew the process by that much each.
    for total in (1 << 63, 256 * MiB, 256 * MiB):
        sock, status = wire.connect(peer.endpoint)
        assert status == 0
        sock.sendall(wire.request_header(wire.OP_CONTROL, total_bytes=total))
        assert wire.closed_within(sock, 3.0), "the connection must be closed"
        sock.close()
    wait_for_log(peer, "CONTROL request, but this engine has no control handler")
    assert peer.rss_kib() - before < 32 * 1024
    assert_still_serving(peer, engine_factory(4 * MiB))


def test_announced_entries_and_payloads_are_not_allocated_up_front(
    peer_factory, engine_factory
) -> None:
    peer = peer_factory(4 * MiB)
    before = peer.rss_kib()
    held = []
    # 48 connections each announce the maximum entry count (1 MiB of entries) and send none.
    for _ in range(48):
        sock, _ = wire.connect(peer.endpoint)
        sock.sendall(wire.request_header(wire.OP_WRITE, count=1 << 16, total_bytes=1 << 62))
        held.append(sock)
    time.sleep(0.5)
    grown_mib = (peer.rss_kib() - before) / 1024
    assert grown_mib < 16, f"peer grew by {grown_mib:.0f} MiB for announced entries"
    # more entries than the limit: closed at once, nothing read
    sock, _ = wire.connect(peer.endpoint)
    sock.sendall(wire.request_header(wire.OP_WRITE, count=(1 << 16) + 1))
    assert wire.closed_within(sock, 3.0)
    wait_for_log(peer, "entries, limit 65536")
    for s in held:
        s.close()
    assert_still_serving(peer, engine_factory(4 * MiB))


def test_control_frame_over_the_limit_is_refused_by_an_rdma_engine(capfd) -> None:
    from mooncake_vllm.engine import compiled_transports

    if "rdma" not in compiled_transports():
        pytest.skip("built without libibverbs")
    from engine_helpers import LocalEngine

    a = LocalEngine(MiB, protocol="rdma", verbs="fake", fake_nics=1)
    b = LocalEngine(MiB, protocol="rdma", verbs="fake", fake_nics=1)
    try:
        host, port = b.engine.endpoint.rsplit(":", 1)
        sock, _ = wire.connect((host, int(port)))
        sock.sendall(wire.request_header(wire.OP_CONTROL, total_bytes=1 << 63))
        assert wire.closed_within(sock, 3.0)
        sock.close()
        # a WRITE frame to an RDMA engine's listener: it serves no data over TCP
        sock, _ = wire.connect((host, int(port)))
        sock.sendall(wire.request_header(wire.OP_WRITE, count=1, total_bytes=16))
        assert wire.closed_within(sock, 3.0)
        sock.close()
        a.buffer[:] = 9
        seg = a.engine.open_segment(b.engine.descriptor())
        a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])
        assert (b.buffer == 9).all()
        err = capfd.readouterr().err
        assert "CONTROL request of 9223372036854775808 bytes" in err
        assert "serves no data requests over TCP" in err
    finally:
        a.close()
        b.close()


def _answer_first_request(header: bytes):
    """A fake server script: handshake (no token), read one request, answer with `header`."""

    def script(server: wire.FakeServer, conn: socket.socket) -> None:
        wire.hello(conn, auth_required=False)
        conn.sendall(wire.VERDICT.pack(wire.MAGIC, 0, bytes(32)))
        magic, op, _, count, _, seq, total = wire.REQUEST.unpack(
            wire.recv_exact(conn, wire.REQUEST.size)
        )
        wire.recv_exact(conn, count * wire.ENTRY.size + (total if op == wire.OP_WRITE else 0))
        conn.sendall(header)
        server.drain(conn, 5.0)

    return script


@pytest.mark.parametrize(
    ("what", "response", "cause"),
    [
        (
            "error text of 4 GiB",
            wire.RESPONSE.pack(wire.MAGIC, 1, 1, 0xFFFFFFFF, 0, 0),
            "error text of 4294967295 bytes",
        ),
        (
            "2^62 payload bytes for a WRITE",
            wire.RESPONSE.pack(wire.MAGIC, 0, 1, 0, 0, 1 << 62),
            "payload bytes, expected 0",
        ),
        (
            "a refusal with a payload",
            wire.RESPONSE.pack(wire.MAGIC, 1, 1, 0, 0, 1 << 40),
            "a refusal carrying a payload",
        ),
        (
            "an answer to another request",
            wire.RESPONSE.pack(wire.MAGIC, 0, 99, 0, 0, 0),
            "response for request 99, expected 1",
        ),
    ],
)
def test_malicious_server_cannot_crash_or_hang_a_client(
    engine_factory, peer_factory, what: str, response: bytes, cause: str
) -> None:
    fake = wire.FakeServer(_answer_first_request(response))
    try:
        local = engine_factory(4 * MiB, timeout_s=10.0)
        seg = local.engine.open_segment(fake.descriptor())
        started = time.monotonic()
        with pytest.raises(TransferError, match=cause):
            local.engine.transfer_sync(seg, "write", [local.base], [1 << 40], [4096])
        assert time.monotonic() - started < 5, "must fail on the bad frame, not the deadline"
        # this client still works with an honest peer
        assert_still_serving(peer_factory(4 * MiB), local)
    finally:
        fake.close()


# --- 2. mutual authentication --------------------------------------------------------------


def test_client_with_token_refuses_a_server_that_does_not_ask_for_it(engine_factory) -> None:
    def no_auth(server: wire.FakeServer, conn: socket.socket) -> None:
        conn.sendall(wire.HELLO.pack(wire.MAGIC, wire.VERSION, 0, bytes(32)))
        server.drain(conn)

    fake = wire.FakeServer(no_auth)
    try:
        local = engine_factory(MiB, cluster_token="s3cret")
        local.buffer[:] = 1
        seg = local.engine.open_segment(fake.descriptor())
        with pytest.raises(TransferError, match="does not require the cluster token"):
            local.engine.transfer_sync(seg, "write", [local.base], [1 << 40], [MiB])
        time.sleep(0.2)
        assert fake.connections >= 1
        assert fake.bytes_after_auth == 0, "not a byte may go to an unauthenticated server"
    finally:
        fake.close()


@pytest.mark.parametrize("forgery", ["zeros", "reflected client proof"])
def test_client_refuses_a_server_that_cannot_prove_the_token(engine_factory, forgery: str) -> None:
    def impostor(server: wire.FakeServer, conn: socket.socket) -> None:
        _, auth = hello(conn)
        client_mac = wire.AUTH.unpack(auth)[4]
        # The impostor cannot compute the server proof; the best it can do is send back the
        # client's own (a reflection), which the direction labels make useless.
        mac = client_mac if forgery != "zeros" else bytes(32)
        conn.sendall(wire.VERDICT.pack(wire.MAGIC, 0, mac))
        server.drain(conn)

    def hello(conn):
        return wire.hello(conn, auth_required=True)

    fake = wire.FakeServer(impostor)
    try:
        local = engine_factory(MiB, cluster_token="s3cret")
        seg = local.engine.open_segment(fake.descriptor())
        with pytest.raises(TransferError, match="could not prove it knows the cluster token"):
            local.engine.transfer_sync(seg, "write", [local.base], [1 << 40], [MiB])
        time.sleep(0.2)
        assert fake.bytes_after_auth == 0
    finally:
        fake.close()


def test_server_proves_the_token_and_refuses_a_reflected_or_wrong_proof(
    peer_factory, engine_factory
) -> None:
    peer = peer_factory(MiB, token="s3cret")
    # a correct client: the server's proof checks out (wire.connect verifies it in Python)
    sock, status = wire.connect(peer.endpoint, token="s3cret")
    assert status == 0
    sock.close()
    # a client that answers with the server-direction label, or the wrong token: refused
    for token, role in (("s3cret", "server"), ("guess", "client")):
        sock, status = wire.connect(peer.endpoint, token=token, client_role=role)
        assert status != 0
        assert wire.closed_within(sock, 3.0)
        sock.close()
    wait_for_log(peer, "wrong cluster token")
    assert_still_serving(peer, engine_factory(MiB, cluster_token="s3cret"))


# --- 3. bounded connections ----------------------------------------------------------------


def test_connections_beyond_the_per_address_cap_are_refused(peer_factory, engine_factory) -> None:
    peer = peer_factory(MiB, max_connections=16, max_per_address=4)
    held = [wire.connect(peer.endpoint)[0] for _ in range(4)]
    extra = socket.create_connection(peer.endpoint, timeout=5)
    assert wire.closed_within(extra, 3.0), "the 5th connection from one address is refused"
    wait_for_log(peer, "connection limit reached")
    for sock in held:
        sock.close()
    time.sleep(0.5)  # the listener reaps the closed ones
    assert_still_serving(peer, engine_factory(MiB, connections_per_peer=1))


def test_idle_connection_is_closed(peer_factory, engine_factory) -> None:
    peer = peer_factory(MiB, idle_timeout_s=1.0)
    sock, _ = wire.connect(peer.endpoint)
    started = time.monotonic()
    assert wire.closed_within(sock, 4.0)
    assert 0.8 < time.monotonic() - started < 3.5
    wait_for_log(peer, "no request for 1 s")
    assert_still_serving(peer, engine_factory(MiB))


def test_request_stalled_half_way_is_closed_after_the_engine_timeout(
    peer_factory, engine_factory
) -> None:
    peer = peer_factory(MiB, timeout_s=0.8)
    sock, _ = wire.connect(peer.endpoint)
    sock.sendall(wire.request_header(wire.OP_WRITE, count=1, total_bytes=4096)[:16])
    started = time.monotonic()
    assert wire.closed_within(sock, 6.0)
    assert 0.6 < time.monotonic() - started < 4.0
    wait_for_log(peer, "timed out")
    assert_still_serving(peer, engine_factory(MiB))


def test_data_sockets_have_keepalive_and_user_timeout(peer_factory, engine_factory) -> None:
    """Both ends of a data connection probe an idle peer (a partitioned one is noticed)."""
    import shutil
    import subprocess

    if not shutil.which("ss"):
        pytest.skip("needs ss (iproute2) to read the sockets' timers")

    peer = peer_factory(MiB, timeout_s=6.0)
    local = engine_factory(MiB, timeout_s=6.0, connections_per_peer=1)
    seg = local.engine.open_segment(peer.descriptor)
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [4096])
    port = peer.endpoint[1]
    deadline = time.monotonic() + 3
    while True:  # once the last response is acknowledged, both ends show the idle timer
        out = subprocess.run(
            ["ss", "-tnoi", "state", "established", f"( sport = :{port} or dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # one line per socket end, each with its keepalive timer armed
        if out.count("timer:(keepalive") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert out.count("timer:(keepalive") == 2, out


# --- 4. remote READ only of regions registered for it ----------------------------------


def test_read_of_a_region_not_registered_for_remote_read_is_refused(
    peer_factory, engine_factory
) -> None:
    peer = peer_factory(MiB)  # registered without remote_read
    peer.call(cmd="fill", offset=0, length=MiB, seed=8)
    local = engine_factory(MiB)
    seg = local.engine.open_segment(peer.descriptor)
    with pytest.raises(TransferError, match="not registered for remote read"):
        local.engine.transfer_sync(seg, "read", [local.base], [peer.base], [MiB])
    assert not local.buffer.any()
    wait_for_log(peer, "refused READ")
    assert_still_serving(peer, local)  # WRITE into it still works
    readable = peer_factory(MiB, remote_read=True)
    readable.call(cmd="fill", offset=0, length=MiB, seed=8)
    seg = local.engine.open_segment(readable.descriptor)
    local.engine.transfer_sync(seg, "read", [local.base], [readable.base], [MiB])
    assert np.array_equal(local.buffer, pattern(MiB, seed=8))


def test_engine_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        TransferEngine(protocol="tcp", max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        TransferEngine(protocol="tcp", idle_timeout_s=0)


def test_client_closes_idle_connections_before_the_server_would(
    peer_factory, engine_factory
) -> None:
    """A client closes a connection idle for half the idle timeout, so the server's idle close
    never races a new request; the next batch reconnects."""
    peer = peer_factory(MiB, idle_timeout_s=1.0)
    local = engine_factory(MiB, idle_timeout_s=1.0, connections_per_peer=1)
    seg = local.engine.open_segment(peer.descriptor)
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [4096])
    time.sleep(1.5)
    local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [4096])
    assert local.engine.stats()["connects"] == 2
    assert "no request for" not in peer.log(), "the server had to close the idle connection"


def test_idle_and_dead_peers_are_evicted_and_come_back(peer_factory, engine_factory) -> None:
    """The links (and threads) to a peer nobody talks to any more, dead or alive, are evicted
    after the idle timeout; a later batch to it makes new ones."""
    import os

    gone, alive = peer_factory(MiB), peer_factory(MiB)
    local = engine_factory(MiB, idle_timeout_s=1.0, connections_per_peer=2)
    seg_gone = local.engine.open_segment(gone.descriptor)
    seg_alive = local.engine.open_segment(alive.descriptor)
    for seg, peer in ((seg_gone, gone), (seg_alive, alive)):
        local.engine.transfer_sync(seg, "write", [local.base], [peer.base], [4096])
    threads = len(os.listdir("/proc/self/task"))
    gone.kill()
    with pytest.raises(TransferError):
        local.engine.transfer_sync(seg_gone, "write", [local.base], [gone.base], [4096])
    time.sleep(2.2)  # past the idle timeout and the once-a-second scan
    local.engine.transfer_sync(seg_alive, "write", [local.base], [alive.base], [4096])
    stats = local.engine.stats()
    assert stats["evicted_peers"] == 2  # both were quiet; `alive` got new links at once
    assert stats["peers_with_links"] == 1
    assert len(os.listdir("/proc/self/task")) <= threads - 4  # gone's 2 links x 2 threads
    with pytest.raises(TransferError, match="connect to .* failed"):
        local.engine.transfer_sync(seg_gone, "write", [local.base], [gone.base], [4096])


def test_a_thread_that_cannot_start_refuses_one_connection_only(engine_factory, capfd) -> None:
    from mooncake_vllm import _engine

    a, b = engine_factory(MiB), engine_factory(MiB)
    seg = a.engine.open_segment(b.engine.descriptor())
    host, port = b.engine.endpoint.rsplit(":", 1)
    _engine._testing.inject_thread_start_failures(1)  # the next connection's thread
    sock = socket.create_connection((host, int(port)), timeout=5)
    assert wire.closed_within(sock, 3.0), "that connection is refused"
    sock.close()
    assert "cannot start a thread for a connection" in capfd.readouterr().err
    a.buffer[:] = 2
    a.engine.transfer_sync(seg, "write", [a.base], [b.base], [MiB])  # the listener goes on
    assert (b.buffer == 2).all()
    # a link whose threads cannot start: open_segment fails with the cause, then works again
    c = engine_factory(MiB)
    _engine._testing.inject_thread_start_failures(1)
    with pytest.raises(TransferError, match="cannot start a thread for connection 0"):
        a.engine.open_segment(c.engine.descriptor())
    seg = a.engine.open_segment(c.engine.descriptor())
    a.engine.transfer_sync(seg, "write", [a.base], [c.base], [MiB])
    assert (c.buffer == 2).all()
