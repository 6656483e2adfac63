"""The control channel on real zmq sockets: what a stranger's frames can and cannot do."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from mooncake_vllm.channel import control_channel as cc
from mooncake_vllm.channel.control_channel import ControlChannel
from mooncake_vllm.connector import control
from mooncake_vllm.connector import messages as m
from mooncake_vllm.security import FrameAuth

V = m.PROTOCOL_VERSION
TOKEN = "cluster-token-for-tests-0123456789"


@pytest.fixture
def channel() -> Iterator[tuple[ControlChannel, queue.Queue]]:
    got: queue.Queue = queue.Queue()

    def on_message(sender: bytes | str, msg: m.Message) -> None:
        if isinstance(msg, m.Release) and msg.reason == "explode":
            raise RuntimeError("handler bug")
        got.put((sender, msg))

    ch = ControlChannel("127.0.0.1", 0, on_message, lambda: None, codec=m.CODEC, token=TOKEN)
    try:
        yield ch, got
    finally:
        ch.close()


def _stranger(endpoint: str) -> zmq.Socket:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def test_frames_without_the_tokens_mac_are_dropped(channel, caplog) -> None:
    ch, got = channel
    s = _stranger(ch.endpoint)
    try:
        s.send(m.encode(m.Release(V, "t1", "forged")))  # no MAC
        s.send(FrameAuth("another-token-of-32-characters!!").seal(
            m.encode(m.Release(V, "t1", "forged"))))
        s.send(FrameAuth(TOKEN).seal(m.encode(m.Release(V, "t1", "real"))))
        sender, msg = got.get(timeout=5)
        assert msg == m.Release(V, "t1", "real") and isinstance(sender, bytes)
        assert got.empty()
        assert caplog.text.count("bad MAC") == 2
    finally:
        s.close(linger=0)


def test_a_bad_handler_or_a_bad_endpoint_does_not_stop_the_channel(channel, caplog) -> None:
    ch, got = channel
    s = _stranger(ch.endpoint)
    try:
        auth = FrameAuth(TOKEN)
        s.send(auth.seal(m.encode(m.Release(V, "t1", "explode"))))
        ch.send(12345, m.Release(V, "t1", "x"))  # type: ignore[arg-type]
        ch.send("tcp://;rm -rf/:1", m.Release(V, "t1", "x"))
        s.send(auth.seal(m.encode(m.Release(V, "t2", "after"))))
        _, msg = got.get(timeout=5)
        assert msg.transfer_id == "t2" and ch.alive()
        # The channel thread takes sends and receives in turn: a peer's frame can be handled
        # before our bad sends are refused (and logged).
        deadline = time.monotonic() + 5
        while "contains whitespace or control characters" not in caplog.text \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "handler failed" in caplog.text and "not a non-empty string" in caplog.text
        assert "contains whitespace or control characters" in caplog.text
        assert not ch._dealers  # nothing was opened for the bad endpoints
    finally:
        s.close(linger=0)


def test_oversized_frames_never_reach_the_handler(channel) -> None:
    ch, got = channel
    big = _stranger(ch.endpoint)
    small = _stranger(ch.endpoint)
    try:
        big.send(b"\0" * (m.MAX_FRAME_BYTES + 1024))
        time.sleep(0.3)
        small.send(FrameAuth(TOKEN).seal(m.encode(m.Release(V, "t3", "ok"))))
        _, msg = got.get(timeout=5)
        assert msg.transfer_id == "t3" and got.empty()
    finally:
        big.close(linger=0)
        small.close(linger=0)


def test_outgoing_connections_are_bounded(channel, monkeypatch) -> None:
    ch, _ = channel
    monkeypatch.setattr(cc, "MAX_DEALERS", 8)
    for port in range(20000, 20020):
        ch.send(f"tcp://127.0.0.1:{port}", m.Release(V, "t", "x"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ch._out.qsize():
        time.sleep(0.05)
    time.sleep(0.2)
    assert len(ch._dealers) == 8 and ch.alive()


def test_health_probe_asks_the_worker(channel) -> None:
    ch, got = channel

    def answer() -> None:
        sender, ping = got.get(timeout=5)
        ch.send(sender, m.Pong(V, ping.transfer_id, False, "the engine refused a transfer", 0))

    t = threading.Thread(target=answer)
    t.start()
    why = control.probe_health(ch.endpoint, TOKEN, timeout_s=5)
    t.join()
    assert why == f"worker {ch.endpoint} (tp0): the engine refused a transfer"
    assert "refused the frame (cluster-token)" in (control.probe_health(
        ch.endpoint, "wrong-token-0123456789", timeout_s=5) or "")


def test_a_peer_with_another_token_is_told_at_once_and_no_more_than_once_a_second() -> None:
    """Our frames to a worker with another cluster token come back as a refusal notice (not
    silence until a deadline), once a second at most; `ask` raises Refused."""
    refused: queue.Queue = queue.Queue()
    ours = ControlChannel("127.0.0.1", 0, lambda s, msg: None, lambda: None, codec=m.CODEC,
                          token=TOKEN, on_refused=lambda ep, why: refused.put((ep, why)))
    theirs = ControlChannel("127.0.0.1", 0, lambda s, msg: None, lambda: None,
                            codec=m.CODEC, token="another-cluster-token-0123456789")
    try:
        for i in range(5):
            ours.send(theirs.endpoint, m.Release(V, f"t{i}", "x"))
        assert refused.get(timeout=5) == (theirs.endpoint, cc.REFUSED_TOKEN)
        time.sleep(0.5)
        assert refused.empty()  # five refused frames, one notice
        with pytest.raises(cc.Refused, match="its cluster token is not this one"):
            control.ping(theirs.endpoint, TOKEN, timeout_s=5)
    finally:
        ours.close()
        theirs.close()
