"""The two sides of the control protocol, driven message by message: no vLLM engine runs.

Each side gets a real transfer engine (TCP on loopback, real registered memory) and a `send`
that records what it would put on the wire; the test plays the network, delivering,
dropping, forging, duplicating and delaying messages. The failure rules under test are the
ones stated in prefill_side.py and decode_side.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import torch

from mooncake_vllm.config import ConfigError, ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.decode_side import DecodeSide
from mooncake_vllm.connector.layout import KVLayout, memory_regions
from mooncake_vllm.connector.prefill_side import MAX_EARLY, SLOW_TRANSFER_S, PrefillSide
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata, RecvSpec, SaveSpec
from mooncake_vllm.engine import TransferEngine

V = m.PROTOCOL_VERSION
BS, BLOCKS, LAYERS = 4, 16, 2
P_EP = "tcp://127.0.0.1:5999"  # where D believes P's control channel is
D_ID = b"decode-router-identity"


@dataclass
class Wire:
    """What a side sent, in order."""

    sent: list[tuple[bytes | str, m.Message]] = field(default_factory=list)

    def __call__(self, to: bytes | str, msg: m.Message) -> None:
        self.sent.append((to, msg))

    def take(self, kind: type) -> list[tuple[bytes | str, Any]]:
        out = [(to, msg) for to, msg in self.sent if isinstance(msg, kind)]
        self.sent = [(to, msg) for to, msg in self.sent if not isinstance(msg, kind)]
        return out


def _caches(fill: float) -> dict[str, torch.Tensor]:
    return {f"layer.{i}": torch.full((BLOCKS, 2, BS, 8), fill + i) for i in range(LAYERS)}


def _layout(caches: dict[str, torch.Tensor]) -> KVLayout:
    return KVLayout.from_caches(caches, BLOCKS, block_size=BS, num_kv_heads=2, head_size=4,
                                model="tiny")


@dataclass
class Pair:
    p: PrefillSide
    d: DecodeSide
    p_wire: Wire
    d_wire: Wire
    p_kv: dict[str, torch.Tensor]
    d_kv: dict[str, torch.Tensor]

    def register(self, tid: str, req: str, blocks: list[int], tokens: int,
                 sync: bool = False) -> m.Register:
        self.d.bind(MooncakeMetadata(recvs=[RecvSpec(req, tid, {"control": [P_EP]}, blocks, 0,
                                                     tokens, sync)]))
        [(to, reg)] = self.d_wire.take(m.Register)
        assert to == P_EP
        return reg

    def prefill(self, tid: str, req: str, blocks: list[int], tokens: int) -> None:
        """P runs the whole prompt in one step and the scheduler then holds its blocks."""
        meta = MooncakeMetadata(saves=[SaveSpec(req, tid, blocks, 0, tokens, tokens)])
        self.p.bind(meta, time.monotonic())
        for layer in range(LAYERS):
            self.p.save_layer(meta, layer)
        self.p.end_forward(meta, time.monotonic())
        self.p.bind(MooncakeMetadata(held={req: True}), time.monotonic())

    def p_replies(self, timeout_s: float = 10.0) -> list[tuple[bytes | str, Any]]:
        """Wait for P's Done/Released (the completion thread sends them)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.p.lock:
                out = self.p_wire.take(m.Done) + self.p_wire.take(m.Released)
            if out:
                return out
            time.sleep(0.01)
        raise AssertionError(f"P said nothing; it sent {self.p_wire.sent}")


def _config(**over: Any) -> ConnectorConfig:
    base: dict[str, Any] = {"transfer_timeout_s": 2.0, "engine_timeout_s": 2.0,
                            "registration_timeout_s": 2.0, "pipeline_silence_timeout_s": 1.0}
    base.update(over)
    return ConnectorConfig.from_sources(base, env={})


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from _make_pair(_config(), _config())


def _make_pair(p_cfg: ConnectorConfig, d_cfg: ConnectorConfig) -> Iterator[Pair]:
    p_kv, d_kv = _caches(1.0), _caches(0.0)
    for t in d_kv.values():
        t.zero_()
    engines = [TransferEngine(hostname="127.0.0.1", protocol="tcp", timeout_s=2.0)
               for _ in range(2)]
    for eng, kv in zip(engines, (p_kv, d_kv), strict=True):
        for addr, n in memory_regions(kv):
            eng.register(addr, n)
    p_wire, d_wire = Wire(), Wire()
    p = PrefillSide(engine=engines[0], send=p_wire, config=p_cfg, layout=_layout(p_kv),
                    block_size=BS, tp_rank=0, stats=MooncakeStats(), lock=threading.RLock())
    d = DecodeSide(engine=engines[1], send=d_wire, config=d_cfg, layout=_layout(d_kv),
                   block_size=BS, tp_rank=0, engine_id="d", segment_name="d-seg",
                   descriptor=engines[1].descriptor(), stats=MooncakeStats(),
                   lock=threading.RLock())
    p.start()
    try:
        yield Pair(p, d, p_wire, d_wire, p_kv, d_kv)
    finally:
        p.stop()
        for eng in engines:
            eng.close()


def _blocks_equal(pair: Pair, p_blocks: list[int], d_blocks: list[int]) -> bool:
    return all(torch.equal(pair.p_kv[n][pb], pair.d_kv[n][db])
               for n in pair.p_kv for pb, db in zip(p_blocks, d_blocks, strict=True))


def test_transfer_lands_and_settles(pair: Pair) -> None:
    reg = pair.register("t1", "r-d", [5, 6, 7], 3 * BS)
    pair.p.on_message(D_ID, reg)  # early: P has not scheduled the request yet
    pair.prefill("t1", "r-p", [1, 2, 3], 3 * BS)
    [(to, done)] = pair.p_replies()
    assert to == D_ID and done.ok and done.blocks == 3 * LAYERS
    assert _blocks_equal(pair, [1, 2, 3], [5, 6, 7])
    assert pair.p.take_finished() == {"r-p"}  # P's blocks go back once D has its Done
    pair.d.on_message(P_EP, done)
    assert pair.d.get_finished(set()) == (set(), {"r-d"})
    assert not pair.d.take_load_errors()


def test_forged_replies_from_a_stranger_are_refused(pair: Pair, caplog) -> None:
    pair.register("t2", "r-d", [5], BS)
    for forged in (m.Done(V, "t2", True), m.Released(V, "t2"), m.Layers(V, "t2", 2),
                   m.Started(V, "t2", True)):
        pair.d.on_message("tcp://10.9.9.9:1", forged)
    assert pair.d.get_finished(set()) == (set(), set())  # nothing marked received
    assert not pair.d.take_gate_report()
    assert "refused Done for transfer t2 from 'tcp://10.9.9.9:1'" in caplog.text
    assert "t2" in pair.d.inc  # still waiting for the real P


def test_release_from_someone_else_than_the_registrant_is_refused(pair: Pair, caplog) -> None:
    reg = pair.register("t3", "r-d", [5, 6], 2 * BS)
    pair.p.on_message(D_ID, reg)
    pair.p.on_message(b"stranger", m.Release(V, "t3", "forged"))
    assert "refused a Release from b'stranger'" in caplog.text
    pair.prefill("t3", "r-p", [1, 2], 2 * BS)
    [(_, done)] = pair.p_replies()
    assert done.ok and _blocks_equal(pair, [1, 2], [5, 6])


def test_second_registration_for_a_transfer_never_redirects_it(pair: Pair, caplog) -> None:
    reg = pair.register("t4", "r-d", [5, 6], 2 * BS)
    pair.p.on_message(D_ID, reg)
    thief = msgspec.structs.replace(reg, block_ids=[9, 10])
    pair.p.on_message(b"thief", thief)  # before P schedules the request
    pair.prefill("t4", "r-p", [1, 2], 2 * BS)
    pair.p.on_message(b"thief", thief)  # and after
    [(to, done)] = pair.p_replies()
    assert to == D_ID and done.ok
    assert caplog.text.count("t4: duplicate registration refused") == 2
    assert not pair.d_kv["layer.0"][9:11].any()  # the thief's blocks were never written


def test_early_registrations_are_bounded(pair: Pair) -> None:
    reg = pair.register("t5", "r-d", [5], BS)
    for i in range(MAX_EARLY):
        pair.p.on_message(b"flood", msgspec.structs.replace(reg, transfer_id=f"junk-{i}"))
    pair.p.on_message(D_ID, reg)
    assert len(pair.p.early) == MAX_EARLY
    [(to, done)] = pair.p_wire.take(m.Done)
    assert to == D_ID and not done.ok and "too many registrations" in done.reason


def test_out_of_range_fields_are_refused_at_decode() -> None:
    layout = _layout(_caches(0.0)).info()
    good = m.Register(V, "t", "e", "s", None, layout, 0, [1], 4)
    for bad in (msgspec.structs.replace(good, block_ids=[1 << 40]),
                msgspec.structs.replace(good, first_block=-1),
                msgspec.structs.replace(good, transfer_id=""),
                msgspec.structs.replace(good, layout=msgspec.structs.replace(
                    layout, planes=[[(1 << 63, 64)]] * LAYERS))):
        with pytest.raises(m.BadMessage):
            m.decode(m.encode(bad))
    with pytest.raises(m.BadMessage, match="at most"):
        m.decode(b"\0" * (m.MAX_FRAME_BYTES + 1))


def test_block_outside_decode_memory_fails_the_transfer_only(pair: Pair) -> None:
    reg = pair.register("t6", "r-d", [5], BS)
    layout = msgspec.structs.replace(reg.layout, planes=[[(8, 64)]] * LAYERS)
    pair.p.on_message(D_ID, msgspec.structs.replace(reg, layout=layout))
    pair.prefill("t6", "r-p", [1], BS)
    [(_, done)] = pair.p_replies()
    assert not done.ok and "posting layer 0 failed" in done.reason
    assert pair.p.take_finished() == {"r-p"}
    # The side goes on: the next transfer is served.
    reg = pair.register("t7", "r-d2", [8], BS)
    pair.p.on_message(D_ID, reg)
    pair.prefill("t7", "r-p2", [2], BS)
    [(_, done)] = pair.p_replies()
    assert done.ok and _blocks_equal(pair, [2], [8])


def test_decode_keeps_lent_blocks_until_prefill_confirms(pair: Pair) -> None:
    """D's wait runs out: it asks P to stop, but the blocks come back only with P's word."""
    pair.register("t8", "r-d", [5, 6], 2 * BS)
    tr = pair.d.inc["t8"]
    pair.d.tick(tr.deadline + 0.01)
    [(to, rel)] = pair.d_wire.take(m.Release)
    assert to == P_EP and rel.reason == "decode timed out"
    pair.d.tick(tr.deadline + 5.0)  # long past the old 10 s abort ack... of a short config
    assert pair.d.get_finished(set()) == (set(), set())  # still lent
    pair.p.on_message(D_ID, rel)  # P never saw the request: it confirms at once
    [(to, released)] = pair.p_wire.take(m.Released)
    pair.d.on_message(P_EP, released)
    assert pair.d.get_finished(set()) == (set(), {"r-d"})
    assert pair.d.take_load_errors() == {5, 6}  # vLLM's failure policy applies


def test_decode_takes_blocks_back_at_the_write_horizon_without_an_answer(pair: Pair) -> None:
    pair.register("t9", "r-d", [5], BS)
    tr = pair.d.inc["t9"]
    cfg = pair.d.config
    assert tr.horizon - tr.deadline == pytest.approx(cfg.write_horizon_s - cfg.transfer_timeout_s)
    pair.d.tick(tr.horizon - 0.01)
    assert pair.d.get_finished(set()) == (set(), set())
    pair.d.tick(tr.horizon)
    assert pair.d.get_finished(set()) == (set(), {"r-d"})
    assert pair.d.take_load_errors() == {5}


def test_prefill_posts_nothing_after_decodes_wait(pair: Pair) -> None:
    reg = pair.register("t10", "r-d", [5], BS)
    pair.p.on_message(D_ID, reg)
    arrived = pair.p.early[("t10", 0)][2]
    pair.p.early[("t10", 0)] = (D_ID, reg, arrived - reg.wait_s - 1)  # it arrived long ago
    pair.prefill("t10", "r-p", [1], BS)
    [(_, done)] = pair.p_replies()
    assert not done.ok and "wait of 2.0s" in done.reason
    assert not pair.d_kv["layer.0"][5].any()


def test_a_slow_transfer_is_logged_once_with_where_it_stands(pair: Pair, caplog) -> None:
    """A transfer still unfinished seconds after D registered says how far the forward pass
    and the writes got, and what each thread is doing, once (a stall seen under load left
    nothing in P's log for 46 s)."""
    reg = pair.register("t11", "r-d", [5, 6], 2 * BS)
    pair.p.on_message(D_ID, reg)
    meta = MooncakeMetadata(saves=[SaveSpec("r-p", "t11", [1, 2], 0, 2 * BS, 2 * BS)])
    pair.p.bind(meta, time.monotonic())
    pair.p.save_layer(meta, 0)  # the forward pass stops after layer 0
    registered = pair.p.out["t11"][0].registered_at
    caplog.set_level(logging.WARNING, logger="vllm.mooncake_vllm.connector")
    pair.p.tick(registered + SLOW_TRANSFER_S - 0.5)
    assert "still not done" not in caplog.text
    pair.p.tick(registered + SLOW_TRANSFER_S + 0.1)
    pair.p.tick(registered + SLOW_TRANSFER_S + 1.0)
    [line] = [r.getMessage() for r in caplog.records if "still not done" in r.getMessage()]
    assert f"computed per layer [{2 * BS}, 0]" in line and "blocks posted per layer [2, 0]" \
        in line, line
    assert "[MainThread]" in line and "test_sides.py" in line, line  # every thread's stack


def test_mismatched_engine_timeouts_are_refused_naming_both() -> None:
    gen = _make_pair(_config(engine_timeout_s=30.0), _config())
    pair = next(gen)
    try:
        reg = pair.register("t11", "r-d", [5], BS)
        pair.p.on_message(D_ID, reg)
        pair.prefill("t11", "r-p", [1], BS)
        [(_, done)] = pair.p_replies()
        assert not done.ok and "engine_timeout_s=30 here" in done.reason
    finally:
        gen.close()


def test_pipelined_blocks_freed_only_after_the_transfer_settles(pair: Pair) -> None:
    """A pipelined request that finishes (here: failed by its forward pass) while P may still
    write has its blocks freed late: reported in finished_sending only after P's Released."""
    pair.register("t12", "r-d", [5, 6], 2 * BS, sync=True)
    meta = MooncakeMetadata(recvs=[RecvSpec("r-d", "t12", {"control": [P_EP]}, [5, 6], 0,
                                            2 * BS, True)])
    pair.d.wait_layer(meta, 0)  # nobody answers: silence timeout (1 s) gives it up
    assert pair.d.take_load_errors() == {5, 6}
    # The scheduler hears of it: no preemption (which frees blocks at once) meanwhile.
    report = pair.d.take_gate_report()
    assert report is not None and report.unsettled == {("r-d", 0)} and not report.settled
    [(_, rel)] = pair.d_wire.take(m.Release)
    assert pair.d.get_finished({"r-d"}) == (set(), set())  # finished in vLLM: still lent
    pair.d.on_message(P_EP, m.Released(V, "t12"))
    assert pair.d.get_finished(set()) == ({"r-d"}, set())
    report = pair.d.take_gate_report()
    assert report is not None and report.settled == {("r-d", 0)}
    assert rel.transfer_id == "t12"


def test_secure_by_default() -> None:
    exposed = ConnectorConfig.from_sources({"hostname": "10.1.2.3"}, env={})
    assert "not a loopback address and no cluster_token" in (exposed.exposure_refusal() or "")
    assert ConnectorConfig.from_sources({"hostname": "127.0.0.1"}, env={}).exposure_refusal() \
        is None
    assert ConnectorConfig.from_sources({"hostname": "10.1.2.3", "insecure": True},
                                        env={}).exposure_refusal() is None
    assert ConnectorConfig.from_sources({"hostname": "10.1.2.3"},
                                        env={"MOONCAKE_VLLM_CLUSTER_TOKEN": "x" * 32}
                                        ).exposure_refusal() is None
    with pytest.raises(ConfigError, match="cluster_token: too short"):
        ConnectorConfig.from_sources({"cluster_token": "abc"}, env={})
    with pytest.raises(ConfigError, match="abort_ack_timeout_s' was removed"):
        ConnectorConfig.from_sources({"abort_ack_timeout_s": 3}, env={})


def test_transfer_params_need_the_conductors_signature() -> None:
    from mooncake_vllm.connector.scheduler import params_refusal
    from mooncake_vllm.security import sign_transfer_params

    token = "t" * 32
    rc = {"control": ["tcp://127.0.0.1:5600"]}
    params = {"do_remote_prefill": True, "transfer_id": "x1", "remote_control": rc}
    assert params_refusal(params, None) is None  # no token: nothing to check but the shape
    assert "no conductor signature" in (params_refusal(params, token) or "")
    signed = sign_transfer_params(token, params)
    assert params_refusal(signed, token) is None
    assert "not valid" in (params_refusal({**signed, "transfer_id": "x2"}, token) or "")
    assert "not valid" in (params_refusal(sign_transfer_params("u" * 32, params), token) or "")
    old = sign_transfer_params(token, params, now=time.time() - 3600)
    assert "expired" in (params_refusal(old, token) or "")
    for bad_rc, why in (({"control": [7]}, "not a non-empty string"),
                        ({"control": ["http://x:1"]}, "scheme 'http' is not tcp"),
                        ({"control": ["tcp://x:70000"]}, "port is not a number in 1..65535"),
                        ({"control": []}, "'control' is not a non-empty list"),
                        ("x", "not an object")):
        assert why in (params_refusal({**params, "remote_control": bad_rc}, None) or "")


def test_health_probe_record_round_trips() -> None:
    pong = m.Pong(V, "probe-1", False, "the engine refused a transfer to itself", 1)
    assert m.decode(m.encode(pong)) == pong


logging.getLogger("vllm.mooncake_vllm.connector").setLevel(logging.INFO)


def test_preempted_prefill_request_fails_its_transfer(pair: Pair) -> None:
    """vLLM frees a preempted request's blocks at once: what was read from them for D may
    belong to another request by the time it is sent, so D must never use it."""
    reg = pair.register("t13", "r-d", [5, 6], 2 * BS)
    pair.p.on_message(D_ID, reg)
    first = MooncakeMetadata(saves=[SaveSpec("r-p", "t13", [1, 2], 0, BS, 2 * BS)])
    pair.p.bind(first, time.monotonic())
    for layer in range(LAYERS):
        pair.p.save_layer(first, layer)  # the first chunk's block goes out
    pair.p.bind(MooncakeMetadata(preempted=["t13"]), time.monotonic())
    [(to, done)] = pair.p_replies()
    assert to == D_ID and not done.ok and "preempted" in done.reason
    pair.d.on_message(P_EP, done)
    assert pair.d.get_finished(set()) == (set(), {"r-d"})
    assert pair.d.take_load_errors() == {5, 6}


def test_two_requests_under_one_transfer_id_never_share_it(pair: Pair, caplog) -> None:
    """The second decode request fails at once (its blocks are never lent); on P, a second
    request's saves never touch the first one's transfer."""
    reg = pair.register("t14", "r-d1", [5], BS)
    pair.d.bind(MooncakeMetadata(recvs=[RecvSpec("r-d2", "t14", {"control": [P_EP]}, [6], 0,
                                                 BS)]))
    assert not pair.d_wire.take(m.Register)  # only the first registration went out
    assert pair.d.get_finished(set()) == (set(), {"r-d2"})
    assert pair.d.take_load_errors() == {6}
    assert "transfer id already in use here by request r-d1" in caplog.text
    pair.p.on_message(D_ID, reg)
    # Both P requests run in one step; the first one scheduled owns the transfer.
    both = MooncakeMetadata(saves=[SaveSpec("r-p1", "t14", [1], 0, BS, BS),
                                   SaveSpec("r-p2", "t14", [3], 0, BS, BS)])
    pair.p.bind(both, time.monotonic())
    for layer in range(LAYERS):
        pair.p.save_layer(both, layer)
    pair.p.end_forward(both, time.monotonic())
    pair.p.bind(MooncakeMetadata(held={"r-p1": True, "r-p2": True}), time.monotonic())
    [(_, done)] = pair.p_replies()
    assert done.ok and done.blocks == LAYERS and _blocks_equal(pair, [1], [5])


def test_parameters_checked_once_per_request() -> None:
    """A signature that expires while its request runs does not turn it into a plain request
    half-way (P would free blocks its writes still read; the scheduler would crash)."""
    from types import SimpleNamespace

    from mooncake_vllm.connector.scheduler import MooncakeScheduler
    from mooncake_vllm.security import sign_transfer_params

    token = "k" * 32
    sched = MooncakeScheduler.__new__(MooncakeScheduler)
    sched.config = _config(cluster_token=token)
    sched._checked = {}
    params = sign_transfer_params(token, {"do_remote_decode": True, "transfer_id": "t"},
                                  ttl_s=2.0)
    req = SimpleNamespace(request_id="r1", kv_transfer_params=params)
    assert sched._params(req)["transfer_id"] == "t"  # type: ignore[arg-type]
    time.sleep(3.0)  # expires_at is whole seconds: at most 2 s away
    assert sched._params(req)["transfer_id"] == "t"  # type: ignore[arg-type]
    late = SimpleNamespace(request_id="r2", kv_transfer_params=params)
    assert sched._params(late) == {}  # type: ignore[arg-type]


def test_decode_counts_each_load_by_path_and_each_failure_by_policy(pair: Pair) -> None:
    """No silent fallback: a disaggregated and a pipelined load are counted by path, and a
    load that fails is counted by what vLLM's kv_load_failure_policy does with it."""
    stats = pair.d.stats.data
    reg = pair.register("c1", "r1", [5], BS)
    pair.p.on_message(D_ID, reg)
    pair.prefill("c1", "p1", [1], BS)
    [(_, done)] = pair.p_replies()
    pair.d.on_message(P_EP, done)
    pair.register("c2", "r2", [6], BS, sync=True)
    assert (stats["remote_prefills"], stats["pipelined_prefills"]) == (1, 1)
    pair.d.tick(pair.d.inc["c2"].horizon)  # P never answered the pipelined load: it failed
    assert (stats["failed_loads_failed"], stats["failed_loads_recomputed"]) == (1, 0)
    pair.d.recompute_failed_loads = True
    pair.register("c3", "r3", [7], BS)
    pair.d.tick(pair.d.inc["c3"].horizon)
    assert (stats["failed_loads_failed"], stats["failed_loads_recomputed"]) == (1, 1)
    assert stats["remote_prefills"] == 2 and stats["failures"] == 2


def test_a_prefill_with_another_cluster_token_fails_its_transfers_at_once(pair: Pair) -> None:
    """Its refusal notice (control.py) fails every transfer registered with it, naming the
    cause, and gives the blocks back: it holds no engine connection to write with. Another
    reason (one malformed frame) fails nothing early."""
    pair.register("n1", "r-d", [5, 6], 2 * BS)
    pair.d.peer_refused(P_EP, "malformed")
    assert "n1" in pair.d.inc and pair.d.get_finished(set()) == (set(), set())
    pair.d.peer_refused("tcp://10.9.9.9:1", "cluster-token")  # another peer: not ours
    assert "n1" in pair.d.inc
    pair.d.peer_refused(P_EP, "cluster-token")
    assert "n1" not in pair.d.inc
    assert pair.d.get_finished(set()) == (set(), {"r-d"})
    assert pair.d.take_load_errors() == {5, 6}
    assert pair.d.stats.data["failed_loads_failed"] == 1
