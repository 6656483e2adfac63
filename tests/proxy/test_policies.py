"""Routing policies, the TTFT model and admission, as plain classes with real inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mooncake_vllm.proxy.admission import Admission
from mooncake_vllm.proxy.conductor import Conductor, pipeline_cut
from mooncake_vllm.proxy.config import ProxyConfig, ProxyConfigError
from mooncake_vllm.proxy.disagg import pipelinable
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


def test_chat_prompts_tokenized_with_the_chat_template(tiny_model: Path) -> None:
    """With a tokenizer, a chat prompt is the template's token ids (vLLM's own prompt), not
    the keys of the BatchEncoding that newer transformers return."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    msgs = [{"role": "user", "content": "Tell me about block tables " * 8}]
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = list(want.get("input_ids", want))
    key = PromptHasher(str(tiny_model), tokens_per_block=32).key(True, {"messages": msgs})
    assert key.token_ids == tuple(want) and key.num_tokens == len(want) > 32
    assert len(key.block_hashes) == len(want) // 32


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


@pytest.mark.parametrize("roles", [("both", "both"), ("prefill", "decode", "prefill", "decode")])
def test_asking_whether_to_pipeline_does_not_move_the_round_robin_turn(roles: tuple) -> None:
    """A text prompt makes the conductor plan once to see if its token ids are worth fetching:
    that plan must not take a turn, or two "both" instances get every request on one of them."""
    c = Conductor(ProxyConfig(both_urls=("http://127.0.0.1:8999",), policy="round_robin"))
    for i, role in enumerate(roles):
        c.registry.upsert(f"{role}{i}", f"http://127.0.0.1:{9000 + i}", role, "static")
    key = PromptHasher(None).key(False, {"prompt": "word " * 1900})
    picks = []
    for _ in range(4):
        c.would_pipeline(key)
        route = c.route(key, set())
        assert route is not None
        picks.append(route.prefill.instance.instance_id)
    assert len(set(picks)) == 2 and picks[:2] == picks[2:], picks


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
    adm = Admission(slo_ttft_s=1.0, metrics=metrics, slo_itl_s=0.1)
    ok = adm.judge("p0", "disaggregated", 0.4, 0.02)
    outcome = adm.record("p0", 0.4, 0.5, "disaggregated", 0.02)
    adm.record_itl(outcome, 0.05)
    adm.record("p0", 0.4, 1.5, "disaggregated")  # a miss: predicted misses are now believed
    no = adm.judge("p0", "disaggregated", 3.6, 0.02)
    assert ok.admit and not no.admit and no.retry_after_s == 3 and no.reason == "ttft"
    rep = adm.report()
    assert rep["admitted"] == 2 and rep["rejected"] == 1
    assert rep["paths"] == {"disaggregated": 2, "rejected": 1}
    assert rep["mean_abs_error_s"] == pytest.approx(0.6)
    assert rep["itl_mean_abs_error_s"] == pytest.approx(0.03)
    text = metrics.render().decode()
    assert 'mooncake_proxy_rejections_total{reason="slo"} 1.0' in text
    assert 'mooncake_proxy_slo_outcomes_total{met="true"} 1.0' in text
    assert 'mooncake_proxy_path_decisions_total{path="disaggregated"} 1.0' in text
    assert 'mooncake_proxy_itl_slo_outcomes_total{met="true"} 1.0' in text


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
    # 0: never by size: every prompt is disaggregated.
    route = _pd_conductor(local_prefill_max_tokens=0).route(short, set())
    assert route is not None and route.decode is not None and route.path == "disaggregated"


def test_burst_spills_prefill_onto_idle_decode_when_faster() -> None:
    c = _pd_conductor(local_prefill_max_tokens=0, local_prefill_when_faster=True)
    key = PromptHasher(None, tokens_per_block=32).key(False, {"prompt": [7] * 500})
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    tickets = [PrefillTicket(d, 500)]  # D has a prompt of its own to prefill: P
    route = c.route(key, set())
    assert route is not None and route.decode is d and route.prefill.instance is p
    tickets.append(PrefillTicket(p, 1000))  # P's queue is longer now: D prefills this one
    route = c.route(key, set())
    assert route is not None and route.decode is None and route.prefill.instance is d
    for t in tickets:
        t.close()
    # Without the flag a queue on P never moves prefill to D.
    c2 = _pd_conductor(local_prefill_max_tokens=0)
    PrefillTicket(c2.registry.get("p"), 5000)  # type: ignore[arg-type]
    route = c2.route(key, set())
    assert route is not None and route.decode is not None


def test_long_token_prompts_pipelined_in_whole_blocks() -> None:
    c = _pd_conductor(pipeline_prefill_min_tokens=256, pipeline_prefill_share=0.5,
                      local_prefill_max_tokens=0)
    ids = PromptHasher(None, tokens_per_block=32)
    text = PromptHasher(None, tokens_per_block=32, chars_per_block=128)
    long_ = ids.key(False, {"prompt": list(range(10, 1910))})
    route = c.route(long_, set(), pipelinable=True)
    assert route is not None and route.decode is not None
    # Half of 1900 is 950: P's head is 30 blocks (960 tokens), and P is assessed for it alone.
    assert route.pipeline_tokens == 960 and route.prefill.new_tokens == 960
    assert long_.head(960).token_ids == tuple(range(10, 970))
    assert long_.head(960).block_hashes == long_.block_hashes[:30]
    # Not pipelined: below the threshold, a request that cannot be cut, or text hashed
    # without a tokenizer (no exact token ids to cut at).
    for key, cut in ((ids.key(False, {"prompt": [5] * 255}), True), (long_, False),
                     (text.key(False, {"prompt": "word " * 2000}), True)):
        route = c.route(key, set(), pipelinable=cut)
        assert route is not None and route.decode is not None and route.pipeline_tokens == 0
    # The head always leaves D at least one token, in whole blocks.
    p = c.registry.get("p")
    assert p is not None
    assert c.pipeline_head(ids.key(False, {"prompt": [5] * 257}), p) == 128
    c = _pd_conductor(pipeline_prefill_min_tokens=64, pipeline_prefill_share=0.99)
    assert c.pipeline_head(ids.key(False, {"prompt": [5] * 256}), p) == 224


@pytest.mark.parametrize("path,body,ok", [
    ("/v1/completions", {"prompt": "text"}, True),
    ("/v1/completions", {"prompt": [1, 2, 3], "n": 1}, True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, False),
    ("/v1/completions", {"prompt": ["a", "b"]}, False),
    ("/v1/completions", {"prompt": "text", "echo": True}, False),
    ("/v1/completions", {"prompt": "text", "n": 2}, False),
    ("/v1/completions", {"prompt": "text", "prompt_logprobs": 1}, False),
])
def test_which_requests_can_be_cut(path: str, body: dict, ok: bool) -> None:
    assert pipelinable(path, body) is ok


def test_pipeline_share_is_validated() -> None:
    with pytest.raises(ProxyConfigError, match="pipeline_prefill_share=1.0"):
        _pd_conductor(pipeline_prefill_share=1.0)


def test_pipeline_cut_balances_compute_not_tokens() -> None:
    """The tail's tokens attend over more context than the head's: with C set, the head
    gets more tokens, exactly enough for an equal share of n + n^2 / 2C."""
    def cost(n: float, c: float) -> float:
        return n + n * n / (2 * c)

    for t, c in ((1900, 1088.0), (500, 1088.0), (8000, 26600.0)):
        cut = pipeline_cut(t, 0.5, c)
        assert t / 2 < cut < t and cost(cut, c) == pytest.approx(cost(t, c) / 2)
    assert pipeline_cut(1900, 0.5, 0) == 950
    c = _pd_conductor(pipeline_prefill_min_tokens=256, pipeline_attention_tokens=1088,
                      pipeline_prefill_share=0.5)
    p = c.registry.get("p")
    assert p is not None
    assert c.pipeline_head(PromptHasher(None, 32).key(False, {"prompt": [9] * 1900}), p) == 1152


def test_a_prefix_in_the_pool_counts_for_every_candidate_at_its_fetch_cost() -> None:
    from mooncake_vllm.metadata import ModelShape
    from mooncake_vllm.proxy.pool_view import FETCH_BYTES_PER_S, identity_of
    from mooncake_vllm.proxy.routing import assess

    reg = _registry(2)
    shape = ModelShape(num_layers=32, num_heads=32, head_dim=128, num_kv_heads=8,
                       hidden_size=4096, intermediate_size=14336, dtype="bfloat16",
                       block_size=16)
    identity = identity_of({"pool": {"space": "ab" * 32, "shard": "cd" * 32}})
    p0, p1 = reg.get("p0"), reg.get("p1")
    assert p0 is not None and p1 is not None
    for p in (p0, p1):
        p.model_shape, p.pool_identity = shape, identity
        p.ttft = TtftModel(prior_overhead_s=0.01, prior_tokens_per_s=2000)
    h = PromptHasher(None, tokens_per_block=16)
    key = h.key(False, {"prompt": list(range(4000))})
    p0.prefix.insert(key.block_hashes[:50])  # p0 holds 800 tokens itself
    plain = assess(p1, key)
    assert plain.cached_tokens == 0 and plain.new_tokens == 4000
    pooled = dataclasses.replace(key, pool_tokens=((identity, 3200),))
    a0, a1 = assess(p0, pooled), assess(p1, pooled)
    assert a0.cached_tokens == a1.cached_tokens == 3200 and a1.new_tokens == 800
    per_token = 2 * 32 * 8 * 128 * 2
    fetch1 = 3200 * per_token / FETCH_BYTES_PER_S
    assert a1.predicted_ttft_s == pytest.approx(p1.ttft.predict(800) + fetch1)
    # p0 fetches only what it lacks, so it is predicted faster; the pool made both beat
    # recomputing.
    assert a0.predicted_ttft_s < a1.predicted_ttft_s < plain.predicted_ttft_s
    # Where recomputing is faster than fetching (1 GB/s for 128 KiB per token here), the
    # prediction says so: the pool is a cost, not a free hit.
    p1.ttft = TtftModel(prior_overhead_s=0.01, prior_tokens_per_s=20_000)
    assert assess(p1, pooled).predicted_ttft_s > assess(p1, key).predicted_ttft_s
    # An instance of another KV space gets nothing from this pool.
    p1.pool_identity = identity_of({"pool": {"space": "ef" * 32, "shard": "cd" * 32}})
    assert assess(p1, pooled).cached_tokens == 0
    with pytest.raises(ValueError, match="extra.pool.shard"):
        identity_of({"pool": {"space": "ab" * 32, "shard": "xyz"}})
