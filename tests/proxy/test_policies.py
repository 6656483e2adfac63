"""Routing policies, the TTFT model and admission, as plain classes with real inputs."""

from __future__ import annotations

import pytest

from mooncake_vllm.proxy.admission import Admission
from mooncake_vllm.proxy.conductor import Conductor
from mooncake_vllm.proxy.config import ProxyConfig
from mooncake_vllm.proxy.metrics import ProxyMetrics
from mooncake_vllm.proxy.prompt import BadRequest, PromptHasher
from mooncake_vllm.proxy.routing import CacheAware, LeastLoaded, RoundRobin, make_policy
from mooncake_vllm.proxy.ttft_model import TtftModel
from mooncake_vllm.proxy.upstreams import PrefillTicket, Registry

SYSTEM = "You are a careful assistant that answers questions about the Python language. " * 8


def _registry(n: int = 2) -> Registry:
    reg = Registry(prefix_capacity_blocks=1024)
    for i in range(n):
        reg.upsert(f"p{i}", f"http://127.0.0.1:{9000 + i}", "prefill", "static")
    return reg


def test_prefix_hashes_chain_and_share_prefixes() -> None:
    h = PromptHasher(None, chars_per_block=64)
    a = h.key(False, {"prompt": SYSTEM + "What is a list?"})
    b = h.key(False, {"prompt": SYSTEM + "What is a dict comprehension?"})
    c = h.key(False, {"prompt": "Different start. " + SYSTEM})
    shared = len(SYSTEM.encode()) // 64
    assert a.block_hashes[:shared] == b.block_hashes[:shared]
    assert not set(a.block_hashes) & set(c.block_hashes)  # chained: a shifted prefix differs
    assert a.num_tokens > 0


def test_token_prompts_hash_by_token_blocks() -> None:
    h = PromptHasher(None, tokens_per_block=4)
    k = h.key(False, {"prompt": list(range(10))})
    assert k.num_tokens == 10 and len(k.block_hashes) == 2  # only full blocks
    k2 = h.key(False, {"prompt": [0, 1, 2, 3, 9, 9, 9, 9]})
    assert k.block_hashes[0] == k2.block_hashes[0] and k.block_hashes[1] != k2.block_hashes[1]


@pytest.mark.parametrize("chat,body,needle", [
    (False, {}, "missing field 'prompt'"),
    (False, {"prompt": 3}, "'prompt' must be"),
    (True, {"messages": "hi"}, "'messages' must be a non-empty list"),
    (True, {}, "missing field 'messages'"),
    (True, {"messages": [{"content": "x"}]}, "messages[0]"),
])
def test_bad_prompts_are_named(chat: bool, body: dict, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle.replace("[", r"\[").replace("]", r"\]")):
        PromptHasher(None).key(chat, body)


def test_round_robin_alternates() -> None:
    reg = _registry(3)
    pol = RoundRobin()
    key = PromptHasher(None).key(False, {"prompt": SYSTEM})
    picks = [pol.choose_prefill(list(reg), key).instance.instance_id for _ in range(6)]
    assert picks == ["p0", "p1", "p2", "p0", "p1", "p2"]


def test_least_loaded_prefers_short_queue() -> None:
    reg = _registry(2)
    p0 = reg.get("p0")
    assert p0 is not None
    PrefillTicket(p0, 500)
    key = PromptHasher(None).key(False, {"prompt": SYSTEM})
    assert LeastLoaded().choose_prefill(list(reg), key).instance.instance_id == "p1"


def test_cache_aware_follows_prefix_until_queue_outweighs_it() -> None:
    reg = _registry(2)
    p0, p1 = reg.get("p0"), reg.get("p1")
    assert p0 is not None and p1 is not None
    h = PromptHasher(None, chars_per_block=32)
    long_prefix = SYSTEM * 4
    first = h.key(False, {"prompt": long_prefix + "Q1"})
    pol = CacheAware()
    # p1 has the prefix, p0 has nothing: p1 wins although p0 sorts first.
    p1.prefix.insert(first.block_hashes)
    nxt = h.key(False, {"prompt": long_prefix + "Q2 is a different question"})
    choice = pol.choose_prefill([p0, p1], nxt)
    assert choice.instance is p1
    assert choice.cached_tokens >= len(long_prefix) // 4 - 8
    assert choice.predicted_ttft_s < pol.choose_prefill([p0], nxt).predicted_ttft_s
    # A deep queue on p1 costs more than recomputing the prefix on p0: p0 wins.
    PrefillTicket(p1, 50_000)
    assert pol.choose_prefill([p0, p1], nxt).instance is p0


def test_decode_choice_by_load() -> None:
    reg = Registry()
    d0 = reg.upsert("d0", "http://127.0.0.1:1", "decode", "static")
    d1 = reg.upsert("d1", "http://127.0.0.1:2", "decode", "static")
    d0.running, d0.kv_usage = 3, 0.1
    d1.running, d1.kv_usage = 1, 0.9  # fewer requests but KV nearly full
    assert make_policy("cache_aware").choose_decode([d0, d1]) is d0
    d0.running = 12
    assert make_policy("least_loaded").choose_decode([d0, d1]) is d1


def test_ttft_model_learns_rate_and_overhead() -> None:
    m = TtftModel(prior_overhead_s=0.05, prior_tokens_per_s=100_000.0)
    for i in range(60):
        tokens = 100 + (i % 10) * 200
        m.observe(tokens, 0.2 + tokens / 1000.0)  # truth: 0.2 s + 1000 tokens/s
    a, b = m.coefficients()
    assert abs(a - 0.2) < 0.03 and abs(1.0 / b - 1000.0) < 100.0
    assert abs(m.predict(3000) - 3.2) < 0.2


def test_admission_rejects_over_slo_with_retry_after_and_exports() -> None:
    metrics = ProxyMetrics()
    adm = Admission(slo_ttft_s=1.0, metrics=metrics)
    ok = adm.judge("p0", 0.4)
    no = adm.judge("p0", 3.6)
    assert ok.admit and not no.admit and no.retry_after_s == 3
    adm.record("p0", 0.4, 0.5)
    rep = adm.report()
    assert rep["admitted"] == 1 and rep["rejected"] == 1
    assert rep["mean_abs_error_s"] == pytest.approx(0.1)
    text = metrics.render().decode()
    assert 'mooncake_proxy_rejections_total{reason="slo"} 1.0' in text
    assert 'mooncake_proxy_slo_outcomes_total{met="true"} 1.0' in text


def test_ticket_closes_once() -> None:
    reg = _registry(1)
    p0 = reg.get("p0")
    assert p0 is not None
    t1 = PrefillTicket(p0, 100)
    t2 = PrefillTicket(p0, 50)
    assert t2.queued_ahead == 100 and t2.work_tokens == 150
    t1.close()
    t1.close()
    assert p0.queued_prefill_tokens == 50 and p0.inflight == 1


def _pd_conductor(**cfg: object) -> Conductor:
    c = Conductor(ProxyConfig(prefill_urls=("http://127.0.0.1:9000",),
                              decode_urls=("http://127.0.0.1:9100",), **cfg))  # type: ignore[arg-type]
    c.registry.upsert("p", "http://127.0.0.1:9000", "prefill", "static")
    c.registry.upsert("d", "http://127.0.0.1:9100", "decode", "static")
    return c


def test_short_prompts_routed_to_decode_alone() -> None:
    c = _pd_conductor(local_prefill_max_tokens=32)
    h = PromptHasher(None, tokens_per_block=32)
    short, long_ = h.key(False, {"prompt": [5] * 32}), h.key(False, {"prompt": [5] * 33})
    route = c.route(short, set())
    assert route is not None and route.decode is None
    assert route.prefill.instance.instance_id == "d"
    route = c.route(long_, set())
    assert route is not None and route.decode is not None
    assert (route.prefill.instance.instance_id, route.decode.instance_id) == ("p", "d")
    # Off by default: every prompt is disaggregated.
    route = _pd_conductor().route(short, set())
    assert route is not None and route.decode is not None


def test_burst_spills_prefill_onto_idle_decode_when_faster() -> None:
    c = _pd_conductor(local_prefill_when_faster=True)
    key = PromptHasher(None, tokens_per_block=32).key(False, {"prompt": [7] * 500})
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    route = c.route(key, set())  # both idle: the prefill instance, disaggregated
    assert route is not None and route.decode is d and route.prefill.instance is p
    tickets = [PrefillTicket(p, 500)]  # P now has a prompt queued; D computes nothing
    route = c.route(key, set())
    assert route is not None and route.decode is None and route.prefill.instance is d
    tickets.append(PrefillTicket(d, 500))  # equal queues again: back to P
    route = c.route(key, set())
    assert route is not None and route.decode is d
    for t in tickets:
        t.close()
    # Without the flag a queue on P never moves prefill to D.
    c2 = _pd_conductor()
    PrefillTicket(c2.registry.get("p"), 5000)  # type: ignore[arg-type]
    route = c2.route(key, set())
    assert route is not None and route.decode is not None
