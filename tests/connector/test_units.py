"""Fast checks of the connector's pure parts: config parsing, wire records, KV addressing."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from mooncake_vllm.config import ConfigError, ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.layout import KVLayout, coalesce, layer_transfer, memory_regions


def test_config_sources_and_errors() -> None:
    cfg = ConnectorConfig.from_sources(
        {"registration_timeout_s": "2.5", "insecure": "true"},
        env={"MOONCAKE_VLLM_CONTROL_PORT": "5600", "MOONCAKE_VLLM_REGISTRATION_TIMEOUT_S": "9"})
    assert cfg.registration_timeout_s == 2.5  # extra config beats the environment
    assert cfg.control_port == 5600 and cfg.insecure is True
    with pytest.raises(ConfigError, match=r"'measure_non_overlapped' was removed.*"
                                          r"MOONCAKE_VLLM_BENCH_NON_OVERLAPPED=1"):
        ConnectorConfig.from_sources({"measure_non_overlapped": True}, env={})
    with pytest.raises(ConfigError, match=r"control_port=70000"):
        ConnectorConfig.from_sources({"control_port": 70000}, env={})
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        ConnectorConfig.from_sources({"nope": 1}, env={})
    with pytest.raises(ConfigError, match=r"MOONCAKE_VLLM_ENGINE_TIMEOUT_S.*'soon'"):
        ConnectorConfig.from_sources({}, env={"MOONCAKE_VLLM_ENGINE_TIMEOUT_S": "soon"})
    with pytest.raises(ConfigError, match=r"metadata_server='redis://x'"):
        ConnectorConfig.from_sources({"metadata_server": "redis://x"}, env={})


def _layout(**over: object) -> m.LayoutInfo:
    base = dict(model="m", block_size=32, dtype="float32", num_kv_heads=2, head_size=32,
                num_layers=1, block_bytes=16384, tp_rank=0, tp_size=1, planes=[[(4096, 16384)]])
    base.update(over)
    return m.LayoutInfo(**base)  # type: ignore[arg-type]


def test_messages_round_trip_and_refusals() -> None:
    reg = m.Register(m.PROTOCOL_VERSION, "t1", "e", "seg", None, _layout(), 2, [7, 8], 100)
    assert m.decode(m.encode(reg)) == reg
    with pytest.raises(m.BadMessage, match="undecodable"):
        m.decode(b"\x93garbage")
    with pytest.raises(m.BadMessage, match="protocol version 99"):
        m.decode(m.encode(m.Release(99, "t1", "x")))
    assert m.layout_mismatch(_layout(), _layout()) is None
    why = m.layout_mismatch(_layout(), _layout(dtype="bfloat16"))
    assert why == "KV layout mismatch: dtype is 'float32' on prefill but 'bfloat16' on decode"


def test_coalesce_runs_on_both_sides() -> None:
    ls, rs, n = coalesce(np.array([3, 4, 5, 9, 10]), np.array([20, 21, 30, 31, 32]))
    assert ls.tolist() == [3, 5, 9] and rs.tolist() == [20, 30, 31] and n.tolist() == [2, 1, 2]


@pytest.mark.parametrize("shape,planes", [
    ((64, 2, 32, 64), 1),  # CPU backend: [blocks, kv heads, block, 2 * head]
    ((2, 64, 32, 2, 32), 2),  # FlashAttention: [K/V, blocks, block, kv heads, head]
])
def test_layer_transfer_addresses_the_right_bytes(shape: tuple, planes: int) -> None:
    src = torch.randn(shape)
    dst = torch.zeros(shape)
    ls = KVLayout.from_caches({"l0": src}, 64, block_size=32, num_kv_heads=2, head_size=32,
                              model="m")
    ld = KVLayout.from_caches({"l0": dst}, 64, block_size=32, num_kv_heads=2, head_size=32,
                              model="m")
    assert len(ls.planes[0]) == planes
    local, remote = np.array([1, 2, 3, 10]), np.array([5, 6, 7, 40])
    la, ra, ln = layer_transfer([(p.base, p.stride) for p in ls.planes[0]],
                                ld.info().planes[0], ls.block_bytes, local, remote)
    assert len(la) == 2 * planes  # two runs per plane
    for a, b, n in zip(la.tolist(), ra.tolist(), ln.tolist(), strict=True):  # do the "write"
        ctypes.memmove(b, a, n)
    bdim = 0 if planes == 1 else 1
    for s, d in zip(local.tolist(), remote.tolist(), strict=True):
        assert torch.equal(src.select(bdim, s), dst.select(bdim, d))
    untouched = [i for i in range(64) if i not in remote.tolist()]
    assert not dst.index_select(bdim, torch.tensor(untouched)).any()
    assert memory_regions({"a": src, "b": src[:1]}) == [(src.data_ptr(), src.nbytes)]


def test_staging_gathers_raw_block_bytes_and_recycles_space() -> None:
    from mooncake_vllm.connector.staging import StagingBuffer, StagingError

    kv = torch.randn(2, 16, 32, 2, 32)  # split K/V: two planes
    lay = KVLayout.from_caches({"l": kv}, 16, block_size=32, num_kv_heads=2, head_size=32,
                               model="m")
    buf = StagingBuffer(4 * lay.block_bytes * 2, torch.device("cpu"))
    ids = np.array([3, 9, 4])
    slot = buf.alloc(len(ids) * lay.block_bytes * 2, timeout_s=1)
    assert buf.gather(kv, [(p.base, p.stride) for p in lay.planes[0]], lay.block_bytes, 16,
                      ids, slot) is None  # CPU: copied synchronously
    staged = buf.host[slot.offset:slot.offset + slot.nbytes].view(torch.float32)
    staged = staged.view(2, 3, -1)
    for p in range(2):
        for i, b in enumerate(ids.tolist()):
            assert torch.equal(staged[p, i], kv[p, b].reshape(-1))
    with pytest.raises(StagingError, match="no .* B of staging space"):
        buf.alloc(4 * lay.block_bytes, timeout_s=0.1)
    buf.free(slot)
    buf.free(buf.alloc(8 * lay.block_bytes, timeout_s=0.1))  # whole buffer again after free


def test_pipeline_gate_opens_on_started_and_on_silence() -> None:
    from mooncake_vllm.connector.pipeline_gate import GateReport, Gates

    rc = {"control": ["tcp://127.0.0.1:1"]}
    gates = Gates(silence_s=2.0, max_wait_s=10.0)
    # First ask: held back, and a watch goes to the workers (once).
    assert not gates.may_schedule("r1", "t1", rc, now=0.0)
    assert not gates.may_schedule("r2", "t2", rc, now=0.0)
    assert gates.take_watches() == [("t1", rc), ("t2", rc)] and not gates.has_pending()
    # P says t1 is still queued (alive), then started; t2 is never heard of again.
    gates.on_report(GateReport(alive={"t1"}), now=1.5)
    assert not gates.may_schedule("r1", "t1", rc, now=3.0)  # heard 1.5 s ago: still held
    gates.on_report(GateReport(started={"t1"}, alive={"t9"}), now=3.1)
    assert gates.may_schedule("r1", "t1", rc, now=3.2)
    assert gates.may_schedule("r2", "t2", rc, now=2.0)  # silent for 2 s: opens anyway
    # A live but never-started head is held for max_wait_s at most.
    assert not gates.may_schedule("r3", "t3", rc, now=0.0)
    for t in range(1, 10):
        gates.on_report(GateReport(alive={"t3"}), now=float(t))
        assert not gates.may_schedule("r3", "t3", rc, now=float(t))
    gates.on_report(GateReport(alive={"t3"}), now=10.0)
    assert gates.may_schedule("r3", "t3", rc, now=10.0)
    # A finished request's gate is gone: a later report for it changes nothing.
    gates.forget("r1")
    gates.on_report(GateReport(started={"t1"}), now=11.0)
    assert not gates.may_schedule("r1", "t1", rc, now=11.0)  # a new request would watch again
    merged = GateReport(started={"a"}).aggregate(GateReport(started={"b"}, alive={"c"}))
    assert merged.started == {"a", "b"} and merged.alive == {"c"}


def test_watch_and_started_records_round_trip() -> None:
    for msg in (m.Watch(m.PROTOCOL_VERSION, "t"), m.Started(m.PROTOCOL_VERSION, "t", False)):
        assert m.decode(m.encode(msg)) == msg


@pytest.mark.parametrize(("extra", "named"), [
    ({"hostname": "0.0.0.0"}, "hostname='0.0.0.0': a wildcard address"),
    ({"hostname": "::", "insecure": True}, "hostname='::': a wildcard address"),
    ({"advertise_url": "http://0.0.0.0:8000"}, "advertise_url='http://0.0.0.0:8000': a wildcard"),
    ({"metadata_server": "etcd://127.0.0.1:2379"}, "advertise_url is not set"),
    ({"metadata_server": "etcd://10.0.0.5:2379", "advertise_url": "http://10.0.0.7:8000"},
     "hostname='127.0.0.1' is a loopback address, but etcd (etcd://10.0.0.5:2379) is not"),
    ({"metadata_server": "etcd://etcd:2379", "hostname": "10.0.0.7", "insecure": True,
      "advertise_url": "http://localhost:8000"}, "advertise_url='http://localhost:8000' is a "
     "loopback address"),
])
def test_addresses_peers_cannot_use_are_refused_at_start(extra: dict, named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ConnectorConfig.from_sources(extra, env={})
    assert named in str(refused.value)


def test_addresses_peers_can_use_are_accepted() -> None:
    for extra in ({}, {"metadata_server": "etcd://127.0.0.1:2379",
                       "advertise_url": "http://127.0.0.1:8100"},
                  {"metadata_server": "etcds://etcd:2379", "hostname": "10.0.0.7",
                   "advertise_url": "http://10.0.0.7:8000", "insecure": True}):
        assert ConnectorConfig.from_sources(extra, env={}).reachability_refusal() is None


@pytest.mark.parametrize(("config", "expected"), [
    (None, ""),
    ({"enable_kv_cache_events": False, "publisher": "zmq", "endpoint": "tcp://*:5557"}, ""),
    ({"enable_kv_cache_events": True, "publisher": "null", "endpoint": "tcp://*:5557"}, ""),
    ({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557"},
     "tcp://p1.example:5557"),
    ({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://0.0.0.0:6000"},
     "tcp://p1.example:6000"),
    ({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://broker:7000"},
     "tcp://broker:7000"),
    ({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/ev"}, ""),
])
def test_the_kv_events_endpoint_peers_can_reach(config: dict | None, expected: str) -> None:
    """What an instance advertises for its KV cache events: a wildcard bind at its hostname."""
    from types import SimpleNamespace

    from mooncake_vllm.connector.registry import kv_events_endpoint

    vllm_config = SimpleNamespace(kv_events_config=SimpleNamespace(**config) if config else None)
    assert kv_events_endpoint(vllm_config, "p1.example") == expected
