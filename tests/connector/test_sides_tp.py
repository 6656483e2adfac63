"""Different tensor-parallel sizes, driven message by message (no vLLM), through real
transfer engines on loopback. Gather: two prefill ranks (TP 2, one KV head each) write into one
decode rank (TP 1, both heads), each its own head of every block; the decode rank's KV is in
only once both have answered, and one failing makes D stop the other. Split: one prefill rank
(TP 1) writes into two decode ranks (TP 2), each its head; P's blocks go back only once both
decode ranks are served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import torch

from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.decode_side import DecodeSide
from mooncake_vllm.connector.layout import KVLayout, memory_regions
from mooncake_vllm.connector.prefill_side import PrefillSide
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata, RecvSpec, SaveSpec
from mooncake_vllm.engine import TransferEngine

from .test_sides import Wire, _config

V = m.PROTOCOL_VERSION
BS, BLOCKS, LAYERS, HEADS, HEAD = 4, 16, 2, 2, 4
P_EPS = ["tcp://127.0.0.1:5901", "tcp://127.0.0.1:5902"]
D_ID = b"decode-rank-0"


def _caches(heads: int, fill: float) -> dict[str, torch.Tensor]:
    # vLLM's CPU layout: [blocks, heads, block, 2 * head]; each value names its layer.
    return {f"layer.{i}": torch.full((BLOCKS, heads, BS, 2 * HEAD), fill + i)
            for i in range(LAYERS)}


def _layout(caches: dict[str, torch.Tensor], heads: int, rank: int, tp: int) -> KVLayout:
    return KVLayout.from_caches(caches, BLOCKS, block_size=BS, num_kv_heads=heads,
                                head_size=HEAD, model="tiny", tp_rank=rank, tp_size=tp,
                                total_kv_heads=HEADS)


@dataclass
class Gather:
    ps: list[PrefillSide]
    d: DecodeSide
    p_wires: list[Wire]
    d_wire: Wire
    p_kv: list[dict[str, torch.Tensor]]
    d_kv: dict[str, torch.Tensor]

    def register(self, tid: str, blocks: list[int], tokens: int) -> None:
        """D registers with both prefill ranks; the test delivers each Register."""
        self.d.bind(MooncakeMetadata(recvs=[RecvSpec("r-d", tid, {"control": P_EPS}, blocks, 0,
                                                     tokens, False)]))
        regs = self.d_wire.take(m.Register)
        assert sorted(to for to, _ in regs) == P_EPS
        for to, reg in regs:
            self.ps[P_EPS.index(str(to))].on_message(D_ID, reg)

    def prefill(self, rank: int, tid: str, blocks: list[int], tokens: int) -> None:
        meta = MooncakeMetadata(saves=[SaveSpec("r-p", tid, blocks, 0, tokens, tokens)])
        p = self.ps[rank]
        p.bind(meta, time.monotonic())
        for layer in range(LAYERS):
            p.save_layer(meta, layer)
        p.end_forward(meta, time.monotonic())
        p.bind(MooncakeMetadata(held={"r-p": True}), time.monotonic())

    def reply(self, rank: int, timeout_s: float = 10.0) -> m.Message:
        """Wait for prefill rank `rank`'s Done/Released; hand it to D; return it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.ps[rank].lock:
                out = self.p_wires[rank].take(m.Done) + self.p_wires[rank].take(m.Released)
            if out:
                [(to, msg)] = out
                assert to == D_ID
                self.d.on_message(P_EPS[rank], msg)
                return msg
            time.sleep(0.01)
        raise AssertionError(f"prefill rank {rank} said nothing: {self.p_wires[rank].sent}")


@pytest.fixture
def gather() -> Iterator[Gather]:
    p_kv = [_caches(1, 10.0 * (r + 1)) for r in range(2)]
    d_kv = {n: t.zero_() for n, t in _caches(HEADS, 0.0).items()}
    engines = [TransferEngine(hostname="127.0.0.1", protocol="tcp", timeout_s=2.0)
               for _ in range(3)]
    for eng, kv in zip(engines, [*p_kv, d_kv], strict=True):
        for addr, n in memory_regions(kv):
            eng.register(addr, n)
    p_wires, d_wire = [Wire(), Wire()], Wire()
    ps = [PrefillSide(engine=engines[r], send=p_wires[r], config=_config(),
                      layout=_layout(p_kv[r], 1, r, 2), block_size=BS, tp_rank=r,
                      stats=MooncakeStats(), lock=threading.RLock()) for r in range(2)]
    d = DecodeSide(engine=engines[2], send=d_wire, config=_config(),
                   layout=_layout(d_kv, HEADS, 0, 1), block_size=BS, tp_rank=0,
                   engine_id="d", segment_name="d-seg", descriptor=engines[2].descriptor(),
                   stats=MooncakeStats(), lock=threading.RLock())
    for p in ps:
        p.start()
    try:
        yield Gather(ps, d, p_wires, d_wire, p_kv, d_kv)
    finally:
        for p in ps:
            p.stop()
        for eng in engines:
            eng.close()


def test_each_prefill_rank_writes_its_head_and_d_waits_for_both(gather: Gather) -> None:
    gather.register("t1", [5, 6, 7], 3 * BS)
    gather.prefill(0, "t1", [1, 2, 3], 3 * BS)
    assert gather.reply(0).ok
    assert gather.d.get_finished(set()) == (set(), set())  # rank 1's head is still to come
    gather.prefill(1, "t1", [8, 9, 10], 3 * BS)
    assert gather.reply(1).ok
    assert gather.d.get_finished(set()) == (set(), {"r-d"})
    for layer in range(LAYERS):
        got = gather.d_kv[f"layer.{layer}"]
        for rank, p_blocks in ((0, [1, 2, 3]), (1, [8, 9, 10])):
            assert torch.equal(got[[5, 6, 7], rank], gather.p_kv[rank][f"layer.{layer}"][
                p_blocks, 0]), (layer, rank)
        assert not got[[0, 4, 8]].any()  # nothing else written


def test_one_rank_failing_stops_the_other_and_fails_the_load(gather: Gather) -> None:
    gather.register("t2", [5, 6], 2 * BS)
    gather.ps[1].on_message(D_ID, m.Release(V, "t2", "test: rank 1 gives up"))  # as if failed
    gather.prefill(1, "t2", [3, 4], 2 * BS)
    failed = gather.reply(1)
    assert isinstance(failed, m.Released)
    # D asks rank 0 to stop too; its blocks come back only once rank 0 answers.
    [(to, rel)] = gather.d_wire.take(m.Release)
    assert to == P_EPS[0] and "another prefill rank failed" in rel.reason
    assert gather.d.get_finished(set()) == (set(), set())
    gather.ps[0].on_message(D_ID, rel)
    assert isinstance(gather.reply(0), m.Released)
    assert gather.d.get_finished(set()) == (set(), {"r-d"})
    assert gather.d.take_load_errors() == {5, 6}


def test_prefill_ranks_holding_none_of_the_heads_are_told_at_once(gather: Gather) -> None:
    """TP 4 over 2 KV heads replicates each head on two ranks: a decode of TP 1 takes each
    head from one of them, and the other two ranks are released so they free their blocks."""
    eps = [f"tcp://127.0.0.1:{5910 + r}" for r in range(4)]
    gather.d.bind(MooncakeMetadata(recvs=[RecvSpec("r-d", "t4", {"control": eps}, [5], 0, BS,
                                                   False)]))
    assert sorted(to for to, _ in gather.d_wire.take(m.Register)) == [eps[0], eps[2]]
    assert sorted(to for to, _ in gather.d_wire.take(m.Release)) == [eps[1], eps[3]]


def test_a_registration_whose_heads_do_not_fit_is_refused_naming_both_layouts(
        gather: Gather) -> None:
    """Rank 1 of a TP 2 prefill asked by a decode that claims other heads in all."""
    d_info = _layout(gather.d_kv, HEADS, 0, 1).info()
    bad = m.Register(V, "t5", "d", "d-seg", None, m.LayoutInfo(
        **{**{f: getattr(d_info, f) for f in d_info.__struct_fields__}, "total_kv_heads": 4}),
        0, [5], BS)
    gather.ps[1].on_message(D_ID, bad)
    gather.prefill(1, "t5", [3], BS)
    done = gather.reply(1)
    assert isinstance(done, m.Done) and not done.ok
    assert "the models' KV heads differ: prefill TP 2 with 1 KV heads per rank (2 in all), " \
        "decode TP 1 with 2 KV heads per rank (4 in all)" in done.reason


@dataclass
class Split:
    p: PrefillSide
    ds: list[DecodeSide]
    p_wire: Wire
    d_wires: list[Wire]
    p_kv: dict[str, torch.Tensor]
    d_kv: list[dict[str, torch.Tensor]]

    def register(self, rank: int, tid: str, blocks: list[int], tokens: int) -> m.Register:
        self.ds[rank].bind(MooncakeMetadata(recvs=[RecvSpec(f"r-d{rank}", tid,
                                                            {"control": P_EPS[:1]}, blocks, 0,
                                                            tokens, False)]))
        [(to, reg)] = self.d_wires[rank].take(m.Register)
        assert to == P_EPS[0]
        return reg

    def prefill(self, tid: str, blocks: list[int], tokens: int) -> None:
        meta = MooncakeMetadata(saves=[SaveSpec("r-p", tid, blocks, 0, tokens, tokens)])
        self.p.bind(meta, time.monotonic())
        for layer in range(LAYERS):
            self.p.save_layer(meta, layer)
        self.p.end_forward(meta, time.monotonic())
        self.p.bind(MooncakeMetadata(held={"r-p": True}), time.monotonic())

    def replies(self, n: int, timeout_s: float = 10.0) -> dict[bytes | str, m.Message]:
        deadline = time.monotonic() + timeout_s
        got: dict[bytes | str, m.Message] = {}
        while time.monotonic() < deadline and len(got) < n:
            with self.p.lock:
                got.update(self.p_wire.take(m.Done) + self.p_wire.take(m.Released))
            time.sleep(0.01)
        assert len(got) == n, f"P answered {got}; it sent {self.p_wire.sent}"
        return got


D_IDS = [b"decode-rank-0", b"decode-rank-1"]


@pytest.fixture
def split() -> Iterator[Split]:
    p_kv = _caches(HEADS, 10.0)
    d_kv = [{n: t.zero_() for n, t in _caches(1, 0.0).items()} for _ in range(2)]
    engines = [TransferEngine(hostname="127.0.0.1", protocol="tcp", timeout_s=2.0)
               for _ in range(3)]
    for eng, kv in zip(engines, [p_kv, *d_kv], strict=True):
        for addr, n in memory_regions(kv):
            eng.register(addr, n)
    p_wire, d_wires = Wire(), [Wire(), Wire()]
    p = PrefillSide(engine=engines[0], send=p_wire, config=_config(),
                    layout=_layout(p_kv, HEADS, 0, 1), block_size=BS, tp_rank=0,
                    stats=MooncakeStats(), lock=threading.RLock())
    ds = [DecodeSide(engine=engines[1 + r], send=d_wires[r], config=_config(),
                     layout=_layout(d_kv[r], 1, r, 2), block_size=BS, tp_rank=r,
                     engine_id="d", segment_name=f"d-seg-{r}",
                     descriptor=engines[1 + r].descriptor(), stats=MooncakeStats(),
                     lock=threading.RLock()) for r in range(2)]
    p.start()
    try:
        yield Split(p, ds, p_wire, d_wires, p_kv, d_kv)
    finally:
        p.stop()
        for eng in engines:
            eng.close()


def test_one_prefill_rank_writes_each_decode_rank_its_head(split: Split) -> None:
    """Decode rank 1 registers before P has the request, rank 0 after P's forward pass:
    P's blocks stay held until both are served."""
    split.p.on_message(D_IDS[1], split.register(1, "t1", [5, 6, 7], 3 * BS))
    split.prefill("t1", [1, 2, 3], 3 * BS)
    first = split.replies(1)
    assert list(first) == [D_IDS[1]] and first[D_IDS[1]].ok
    assert split.p.take_finished() == set()  # rank 0 has its part to come
    split.p.on_message(D_IDS[0], split.register(0, "t1", [9, 10, 11], 3 * BS))
    second = split.replies(1)
    assert list(second) == [D_IDS[0]] and second[D_IDS[0]].ok
    assert split.p.take_finished() == {"r-p"}
    for rank, d_blocks in ((0, [9, 10, 11]), (1, [5, 6, 7])):
        split.ds[rank].on_message(P_EPS[0], (first | second)[D_IDS[rank]])
        assert split.ds[rank].get_finished(set()) == (set(), {f"r-d{rank}"})
        for layer in range(LAYERS):
            assert torch.equal(split.d_kv[rank][f"layer.{layer}"][d_blocks, 0],
                               split.p_kv[f"layer.{layer}"][[1, 2, 3], rank]), (rank, layer)


def test_a_registration_from_another_decode_instance_is_refused(split: Split) -> None:
    """Once decode rank 0 of one instance has registered, rank 1's part is that instance's:
    another instance's claim to it is refused and never written."""
    split.p.on_message(D_IDS[0], split.register(0, "t2", [5], BS))
    split.prefill("t2", [1], BS)
    thief = split.register(1, "t2", [6], BS)
    split.p.on_message(b"thief", msgspec.structs.replace(thief, engine_id="other"))
    got = split.replies(2)
    assert got[D_IDS[0]].ok and not got[b"thief"].ok
    assert "writes into no decode rank 1" in got[b"thief"].reason
    assert not split.d_kv[1]["layer.0"][6].any()


def test_when_the_first_rank_is_refused_the_next_hears_why_at_once(split: Split) -> None:
    """Decode rank 0's registration is refused (it claims other heads in all): rank 1's,
    coming next, is answered at once instead of waiting out its deadline."""
    reg0 = split.register(0, "t3", [5], BS)
    split.p.on_message(D_IDS[0], msgspec.structs.replace(
        reg0, layout=msgspec.structs.replace(reg0.layout, total_kv_heads=4)))
    split.p.on_message(D_IDS[1], split.register(1, "t3", [6], BS))
    split.prefill("t3", [1], BS)
    got = split.replies(2)
    assert not got[D_IDS[0]].ok and not got[D_IDS[1]].ok
    assert "KV heads differ" in got[D_IDS[1]].reason
    assert split.p.take_finished() == {"r-p"}


def test_an_idle_ranks_release_answer_is_no_stranger(gather: Gather,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    eps = [f"tcp://127.0.0.1:{5920 + r}" for r in range(4)]
    gather.d.bind(MooncakeMetadata(recvs=[RecvSpec("r-d", "t6", {"control": eps}, [5], 0, BS,
                                                   False)]))
    gather.d_wire.take(m.Register)
    for ep in (eps[1], eps[3]):
        gather.d.on_message(ep, m.Released(V, "t6"))
    assert "refused" not in caplog.text
    gather.d.on_message("tcp://10.9.9.9:1", m.Released(V, "t6"))
    assert "refused Released for transfer t6" in caplog.text


def test_a_layout_claiming_too_many_kv_heads_is_refused_before_any_plan() -> None:
    """The head plan walks every head: a registration may not make it walk millions."""
    info = _layout(_caches(HEADS, 0.0), HEADS, 0, 1).info()
    frame = m.encode(m.Register(V, "t", "d", "s", None, msgspec.structs.replace(
        info, total_kv_heads=m.MAX_KV_HEADS + 1), 0, [1], BS))
    with pytest.raises(m.BadMessage, match="total_kv_heads"):
        m.decode(frame)
