"""The cluster doctor's parts without vLLM: two real workers' doctor probes (a control channel,
a TCP transfer engine and the probe each, in this process) checked from each other's side,
and the judgements on layouts and advertised addresses. The live wiring (etcd, p2p, a real
pair, a token mismatch, a killed instance) is in tests/proxy/test_pd_discovery.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from mooncake_vllm.channel.control_channel import ControlChannel, Refused
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.control import ask_worker as ask
from mooncake_vllm.connector.doctor_probe import DoctorProbe
from mooncake_vllm.doctor.cluster import (
    Finding,
    Member,
    _address_problem,
    check_pair,
    layout_problem,
)
from mooncake_vllm.engine import TransferEngine

V = m.PROTOCOL_VERSION
TOKEN = "doctor-unit-test-token-0123456789"
SHAPE = {"dtype": "float32", "block_size": 16, "num_layers": 2, "num_kv_heads": 2,
         "head_dim": 64, "num_heads": 4, "hidden_size": 256, "intermediate_size": 512}


@dataclass
class Worker:
    engine: TransferEngine
    probe: DoctorProbe
    channel: ControlChannel


def _worker(token: str) -> Worker:
    engine = TransferEngine("127.0.0.1", protocol="tcp", cluster_token=token, timeout_s=5)
    holder: dict[str, DoctorProbe] = {}

    def on_message(sender: bytes | str, msg: m.Message) -> None:  # as worker.py routes them
        probe = holder["probe"]
        if isinstance(msg, m.Ping) and isinstance(sender, bytes):
            channel.send(sender, m.Pong(V, msg.transfer_id, True, "", 0, **probe.pong_fields()))
        elif isinstance(msg, m.Check) and isinstance(sender, bytes):
            probe.on_check(sender, msg)

    channel = ControlChannel("127.0.0.1", 0, on_message, lambda: None, codec=m.CODEC, token=token)
    holder["probe"] = DoctorProbe(engine, token, channel.send)
    return Worker(engine, holder["probe"], channel)


@pytest.fixture
def pair() -> Iterator[tuple[Worker, Worker]]:
    a, b = _worker(TOKEN), _worker(TOKEN)
    try:
        yield a, b
    finally:
        for w in (a, b):
            w.channel.close()
            w.engine.close()


def _check(worker: Worker, peer: str, write: bool, token: str = TOKEN) -> m.Checked:
    reply = ask(worker.channel.endpoint, token, m.Check(V, uuid.uuid4().hex, peer, write), 30)
    assert isinstance(reply, m.Checked)
    return reply


def test_a_check_writes_into_the_peers_scratch_region_and_times_it(pair) -> None:
    a, b = pair
    a.probe.scratch[:] = np.arange(a.probe.scratch.nbytes, dtype=np.uint64).astype(np.uint8)
    reply = _check(a, b.channel.endpoint, write=True)
    assert reply.ok, reply.reason
    assert reply.protocol == "tcp" and reply.bytes == 3 * a.probe.scratch.nbytes
    assert 0 < reply.latency_s <= reply.seconds
    assert np.array_equal(b.probe.scratch, a.probe.scratch)  # the bytes landed, not KV


def test_a_check_without_write_only_pings_the_peer(pair) -> None:
    a, b = pair
    reply = _check(b, a.channel.endpoint, write=False)
    assert reply.ok and reply.bytes == 0 and not b.probe.scratch.any()


def test_a_peer_with_another_token_fails_the_check_and_says_so() -> None:
    a, stranger = _worker(TOKEN), _worker("a-different-cluster-token-9876543210")
    try:
        reply = _check(a, stranger.channel.endpoint, write=True)
        assert not reply.ok
        assert "refused the frame (cluster-token): its cluster token is not this one" in \
            reply.reason
        with pytest.raises(Refused, match="its cluster token is not this one"):
            ask(stranger.channel.endpoint, TOKEN, m.Check(V, "c1", a.channel.endpoint), 1.0)
    finally:
        for w in (a, stranger):
            w.channel.close()
            w.engine.close()


def test_a_pong_naming_another_segment_is_not_written_to(pair, monkeypatch) -> None:
    """A peer's Pong may name only its own engine: a descriptor that calls itself by another
    name could stand in for that segment's handle in this engine."""
    a, b = pair
    real = b.probe.pong_fields

    def lying() -> dict:
        fields = real()
        fields["segment"] = {**fields["segment"], "name": "10.9.9.9:4242"}
        return fields

    monkeypatch.setattr(b.probe, "pong_fields", lying)
    reply = _check(a, b.channel.endpoint, write=True)
    assert not reply.ok and "not named by its endpoint" in reply.reason


def _member(name: str, role: str, **shape: object) -> Member:
    return Member(name, role, f"http://10.0.0.{len(name)}:8000", "tiny", ["tcp://10.0.0.1:1"],
                  {**SHAPE, **shape})


@pytest.mark.parametrize(("key", "p_value", "d_value"), [
    ("block_size", 16, 32), ("dtype", "float32", "bfloat16"), ("num_layers", 2, 4),
    ("num_kv_heads", 2, 1), ("head_dim", 64, 128)])
def test_a_layout_mismatch_names_both_values(key: str, p_value: object,
                                             d_value: object) -> None:
    p, d = _member("p", "prefill", **{key: p_value}), _member("d", "decode", **{key: d_value})
    what, fix = layout_problem(p, d) or ("", "")
    assert what == f"{key} is {p_value!r} on prefill but {d_value!r} on decode"
    assert fix.startswith("start both with the same")
    found = check_pair(p, d, TOKEN)
    assert found == [Finding("layout", "p -> d", False, what, fix)]  # nothing else tried


def test_model_and_tensor_parallel_size_must_agree() -> None:
    p, d = _member("p", "prefill"), _member("d", "decode")
    d.model = "other"
    assert "model is 'tiny' on prefill but 'other' on decode" in layout_problem(p, d)[0]
    d.model, d.controls = "tiny", ["tcp://10.0.0.2:1", "tcp://10.0.0.2:2"]
    assert "tensor-parallel size is 1 on prefill but 2" in layout_problem(p, d)[0]
    assert layout_problem(p, _member("d2", "decode")) is None
    # A prefill of twice the decode's size feeds it (each decode rank from two prefill
    # ranks), with half the KV heads per rank; three into two cannot.
    p.controls = ["tcp://10.0.0.1:1", "tcp://10.0.0.1:2", "tcp://10.0.0.1:3", "tcp://10.0.0.1:4"]
    p.shape = {**(p.shape or {}), "num_kv_heads": 1}
    assert layout_problem(p, d) is None
    p.controls = p.controls[:3]
    assert "tensor-parallel size is 3 on prefill but 2" in layout_problem(p, d)[0]


@pytest.mark.parametrize(("host", "metadata", "problem"), [
    ("0.0.0.0", None, "wildcard"), ("::", "127.0.0.1", "wildcard"),
    ("127.0.0.1", "10.0.0.5", "loopback while the metadata server"),
    ("localhost", "etcd.example", "loopback while the metadata server"),
    ("127.0.0.1", "127.0.0.1", None), ("10.0.0.7", "10.0.0.5", None),
    ("decode-0.svc", "10.0.0.5", None), ("", None, "no host")])
def test_advertised_addresses_others_cannot_use(host: str, metadata: str | None,
                                                problem: str | None) -> None:
    why = _address_problem(host, "advertised URL", metadata)
    assert (why is None) if problem is None else (why is not None and problem in why), why
