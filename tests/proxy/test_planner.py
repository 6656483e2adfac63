"""The per-request plan (local, pipelined, disaggregated or rejected) against the TTFT and ITL
SLOs, the ITL model, and what the conductor derives from a published model shape: plain
classes and functions with real inputs, no vLLM."""

from __future__ import annotations

import time

import pytest

from mooncake_vllm.metadata import InstanceInfo, MalformedValueError, ModelShape
from mooncake_vllm.proxy.admission import Admission
from mooncake_vllm.proxy.conductor import Conductor
from mooncake_vllm.proxy.config import ProxyConfig
from mooncake_vllm.proxy.decode_load import ItlModel
from mooncake_vllm.proxy.metrics import ProxyMetrics
from mooncake_vllm.proxy.model_shape import attention_tokens, shape_in_answer
from mooncake_vllm.proxy.planner import Prediction, choose, options
from mooncake_vllm.proxy.prompt import PromptHasher
from mooncake_vllm.proxy.ttft_model import TtftModel
from mooncake_vllm.proxy.upstreams import Instance, PrefillTicket

# The tiny test model (testing/tiny_model.py), fp32, vLLM blocks of 32 tokens.
TINY = ModelShape(num_layers=4, num_heads=8, head_dim=32, num_kv_heads=2, hidden_size=256,
                  intermediate_size=512, dtype="float32", block_size=32)


def _prediction(**kw: float) -> Prediction:
    """An idle P-D pair prefilling 4000 tokens a second with a 20 ms handoff."""
    spt = 1 / 4000
    n = int(kw.pop("prompt_tokens", 1))
    head = int(kw.pop("pipeline_tokens", 0))
    base = dict(p_prefill_s=0.01 + n * spt, handoff_s=0.02, d_prefill_s=0.01 + n * spt,
                d_base_itl_s=0.01, d_running=0.0, d_seconds_per_token=spt, prompt_tokens=n,
                pipeline_tokens=head, p_head_prefill_s=0.01 + head * spt,
                d_tail_prefill_s=0.01 + (n - head) * spt)
    base.update(kw)
    return Prediction(**base)  # type: ignore[arg-type]


def test_tiny_prompt_goes_local_because_of_the_handoff() -> None:
    plan = choose(options(_prediction(prompt_tokens=1)), None, 0.1)
    assert plan.option is not None and plan.option.path == "local"
    # A decode instance that has prompts of its own queued: P, despite the handoff.
    plan = choose(options(_prediction(prompt_tokens=1, d_prefill_s=0.5)), None, 0.1)
    assert plan.option is not None and plan.option.path == "disaggregated"


def test_long_prompt_on_an_idle_decode_is_pipelined() -> None:
    plan = choose(options(_prediction(prompt_tokens=1900, pipeline_tokens=1152)), None, 0.1)
    assert plan.option is not None and plan.option.path == "pipelined"
    assert plan.option.pipeline_tokens == 1152
    # Too short for the pipeline's overhead to pay off: local.
    plan = choose(options(_prediction(prompt_tokens=96, pipeline_tokens=64)), None, 0.1)
    assert plan.option is not None and plan.option.path == "local"


def test_itl_slo_keeps_prefill_off_a_busy_decode() -> None:
    """D is decoding: a prefill there costs its running requests the prefill's time in their
    steps. Within the ITL SLO it is allowed, past it the request is disaggregated; with no
    ITL SLO TTFT alone decides."""
    busy = {"d_running": 4.0, "d_base_itl_s": 0.02}
    small = choose(options(_prediction(prompt_tokens=100, **busy)), None, 0.1)
    assert small.option is not None and small.option.path == "local"  # +25 ms: within
    mid = _prediction(prompt_tokens=1200, pipeline_tokens=704, **busy)
    plan = choose(options(mid), None, 0.1)
    assert plan.option is not None and plan.option.path == "disaggregated" and plan.within_itl
    assert plan.option.predicted_itl_s == pytest.approx(0.02)
    plan = choose(options(mid), None, None)
    assert plan.option is not None and plan.option.path == "pipelined"
    # The same prompt on an idle D harms no one's ITL: pipelined.
    idle = _prediction(prompt_tokens=1200, pipeline_tokens=704)
    plan = choose(options(idle), None, 0.1)
    assert plan.option is not None and plan.option.path == "pipelined"


def test_a_stall_on_d_is_spread_over_the_gaps_of_its_running_decodes() -> None:
    """The ITL SLO bounds each request's mean gap: a 300 ms prefill on D stalls each running
    decode once, which a decode of 31 gaps spreads to 10 ms; counted whole, it is refused.
    Prefill queued on D stalls them too, and a D that has been prefilling steps slower."""
    busy = {"d_running": 4.0, "d_base_itl_s": 0.02}
    mid = _prediction(prompt_tokens=1200, pipeline_tokens=704, **busy)
    assert choose(options(mid), None, 0.05).option.path == "disaggregated"  # type: ignore
    spread = _prediction(prompt_tokens=1200, pipeline_tokens=704, d_itl_gaps=31.0, **busy)
    plan = choose(options(spread), None, 0.05)
    assert plan.option is not None and plan.option.path == "pipelined"
    assert plan.option.predicted_itl_s == pytest.approx(0.02 + (1200 - 704) / 4000 / 31)
    queued = _prediction(prompt_tokens=1200, pipeline_tokens=704, d_itl_gaps=31.0,
                         d_queued_prefill_s=1.0, **busy)
    assert choose(options(queued), None, 0.05).option.path == "disaggregated"  # type: ignore
    # D prefilled 60% of the last seconds: its decode steps come 2.5 times as far apart,
    # and one more prefill there is too many.
    shared = _prediction(prompt_tokens=1200, pipeline_tokens=704, d_itl_gaps=31.0,
                         d_prefill_share=0.6, **busy)
    plan = choose(options(shared), None, 0.05)
    assert plan.option is not None and plan.option.path == "disaggregated"
    assert plan.option.predicted_itl_s == pytest.approx(0.02)  # no prefill of its own on D
    assert max(o.predicted_itl_s for o in options(shared)) > 0.05
    # A share measured at or past 1 stays finite.
    assert all(o.predicted_itl_s < 1.0 for o in options(
        _prediction(prompt_tokens=1200, d_prefill_share=3.0, **busy)))


def test_a_decodes_gaps_are_learned_from_the_streams_relayed() -> None:
    d = Instance("d", "http://127.0.0.1:1", "decode", "static")
    assert d.itl_gaps() == 1.0  # nothing seen: a stall counts whole
    for _ in range(50):
        d.observe_output(33)
    assert d.itl_gaps() == pytest.approx(32.0)
    d.observe_output(1)  # a one-token answer moves the average, not a stall's whole weight
    assert 28.0 < d.itl_gaps() < 32.0


def test_prefill_started_on_an_instance_is_remembered_for_a_decodes_lifetime() -> None:
    d = Instance("d", "http://127.0.0.1:1", "decode", "static")
    before = time.monotonic()
    PrefillTicket(d, 300).close()  # done already: it stalled the decodes running then
    PrefillTicket(d, 200)
    assert d.prefill_tokens_since(before) == 500
    assert d.prefill_tokens_since(time.monotonic() + 1) == 0


def test_a_pipelined_tail_holds_a_busy_decode_for_the_head() -> None:
    """D's step that computes a pipelined tail waits, layer by layer, for the head's KV: its
    running decodes wait for P's queue and the head too, not only for the tail's compute. A
    small tail behind a queued P is thus kept off a busy D; on an idle D, or gated on P's
    start, the tail alone counts."""
    busy = {"d_running": 2.0, "d_base_itl_s": 0.01}
    # 800 tokens, 640 of them on P: the tail is 40 ms of compute, within a 0.1 s ITL SLO...
    quick = _prediction(prompt_tokens=800, pipeline_tokens=640, pipeline_hold_s=0.17, **busy)
    pipelined = [o for o in options(quick) if o.path == "pipelined"][0]
    assert pipelined.predicted_itl_s == pytest.approx(0.01 + 0.17)
    # ... but P has 0.3 s of work queued ahead of the head: held that long, so not on D.
    queued = _prediction(prompt_tokens=800, pipeline_tokens=640, pipeline_hold_s=0.33,
                         p_prefill_s=0.51, p_head_prefill_s=0.33, **busy)
    plan = choose(options(queued), None, 0.1)
    assert plan.option is not None and plan.option.path == "disaggregated"
    gated = _prediction(prompt_tokens=800, pipeline_tokens=640, pipeline_hold_s=0.0, **busy)
    pipelined = [o for o in options(gated) if o.path == "pipelined"][0]
    assert pipelined.predicted_itl_s == pytest.approx(0.01 + 160 / 4000)


def test_decodes_waiting_for_a_prefill_window_count_as_coming_to_d(
        monkeypatch: pytest.MonkeyPatch) -> None:
    c = _pd(slo_ttft_s=None)
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    ids = PromptHasher(None, tokens_per_block=32)
    key = ids.key(False, {"prompt": list(range(10, 90))})
    route = c.route(key, set())
    assert route is not None and route.path == "local"  # D idle: no one's ITL to cost
    # three requests wait for P's window, then decode on D
    monkeypatch.setattr(type(p.window), "waiting", property(lambda _: 3))
    route = c.route(key, set())
    assert route is not None and route.predicted_itl_s > d.itl.base(1)


def test_rejections_only_with_a_ttft_slo() -> None:
    queued = _prediction(prompt_tokens=500, p_prefill_s=3.0, d_prefill_s=3.0)
    assert choose(options(queued), None, 0.1).option is not None  # admission off
    plan = choose(options(queued), 1.0, 0.1)
    assert plan.option is None and plan.rejected_for == "ttft"
    # D so loaded that even one more decode misses the ITL SLO: refused for ITL with a TTFT
    # SLO, disaggregated (the least harm) without one.
    overloaded = _prediction(prompt_tokens=10, d_base_itl_s=0.3, d_running=40.0)
    plan = choose(options(overloaded), 1.0, 0.1)
    assert plan.option is None and plan.rejected_for == "itl"
    plan = choose(options(overloaded), None, 0.1)
    assert plan.option is not None and plan.option.path == "disaggregated"
    assert not plan.within_itl


def test_only_load_is_a_reason_to_refuse() -> None:
    """A request that would miss an SLO on idle instances too is served (and counted): a retry
    would miss it just the same, so refusing it would only lose it."""
    long_ = _prediction(prompt_tokens=8000)  # 2 s of compute on an idle pair
    plan = choose(options(long_), 1.0, 0.1, idle_ttft_s=2.0)
    assert plan.option is not None and plan.option.predicted_ttft_s > 1.0
    slow_steps = _prediction(prompt_tokens=10, d_base_itl_s=0.3)  # D alone steps in 0.3 s
    plan = choose(options(slow_steps), 1.0, 0.1, idle_ttft_s=0.01, idle_itl_s=0.3)
    assert plan.option is not None and not plan.within_itl
    # Through the conductor: a prompt too long for the SLO on idle instances is admitted;
    # the same-sized prompt behind a queue that makes it miss is refused.
    c = _pd(slo_ttft_s=0.5)
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    ids = PromptHasher(None, tokens_per_block=32)
    route = c.route(ids.key(False, {"prompt": list(range(10, 4010))}), set())  # ~1 s alone
    assert route is not None and not route.rejected_for and route.idle_ttft_s > 0.5
    verdict = c.admission.judge("p", route.path, route.predicted_ttft_s, route.predicted_itl_s,
                                route.rejected_for, route.idle_ttft_s)
    assert verdict.admit
    assert 'slo_unattainable_total{slo="ttft"} 1.0' in c.metrics.render().decode()
    c.admission.record("p", 0.3, 0.9)  # the SLO is being missed: predicted misses are believed
    tickets = [PrefillTicket(p, 4000), PrefillTicket(d, 4000)]  # a second of work queued each
    route = c.route(ids.key(False, {"prompt": list(range(10, 1010))}), set())  # 0.26 s alone
    assert route is not None and route.rejected_for == "ttft"
    assert not c.admission.judge("p", route.path, route.predicted_ttft_s, route.predicted_itl_s,
                                 route.rejected_for, route.idle_ttft_s).admit
    for t in tickets:
        t.close()


def test_a_predicted_miss_is_refused_only_while_the_slo_is_being_missed() -> None:
    """Refusals need evidence: while the admitted requests meet the SLO, a request that load
    predicts to miss is served (a burst they absorb, or a prediction error); once more than
    one in ten of the last twenty miss it, such a request is refused; when they meet it again,
    served again."""
    adm = Admission(slo_ttft_s=0.2, metrics=ProxyMetrics(), slo_itl_s=0.05)

    def verdict() -> bool:  # 0.3 s predicted, 0.1 s on idle instances: load is the cause
        return adm.judge("p", "disaggregated", 0.3, 0.01, "", idle_ttft_s=0.1).admit

    assert verdict()  # no outcome yet: no evidence of a miss
    for _ in range(19):
        adm.record("p", 0.1, 0.15)
    adm.record("p", 0.1, 0.4)  # 1 miss in 20: within what a healthy cluster shows
    assert verdict() and adm.report()["refusing_for"] == []
    adm.record("p", 0.1, 0.4)
    adm.record("p", 0.1, 0.4)  # 3 in the last 20
    assert not verdict() and adm.report()["refusing_for"] == ["ttft"]
    for _ in range(18):
        adm.record("p", 0.1, 0.15)  # the last 20 hold 2 misses: no longer more than 1 in 10
    assert verdict()
    for _ in range(3):
        adm.record("p", 0.1, 0.4)
    assert not verdict()
    adm.evidence_s = 0.05  # evidence grows old: a past overload is no reason to refuse now
    time.sleep(0.1)
    assert verdict()
    for _ in range(20):  # requests that miss on idle instances too are no evidence of load,
        adm.record("p", 0.3, 0.4, idle_ttft_s=0.25)
        adm.record("p", 0.1, 0.4, idle_ttft_s=0.1)  # nor those that met no queue
    assert verdict()
    # ITL: a plan with no path within the ITL SLO is refused only while streams miss it, and
    # only streams with no prefill of ours on D while they ran say so (those were held by
    # the prefill, which a refusal does not relieve).
    assert adm.judge("p", "disaggregated", 0.1, 0.08, "itl", idle_ttft_s=0.1).admit
    for _ in range(3):
        adm.record_itl(adm.record("p", 0.1, 0.1, "local", 0.01), 0.09, decode_only=False)
    assert adm.judge("p", "disaggregated", 0.1, 0.08, "itl", idle_ttft_s=0.1).admit
    for _ in range(3):
        adm.record_itl(adm.record("p", 0.1, 0.1, "disaggregated", 0.01), 0.09)
    assert not adm.judge("p", "disaggregated", 0.1, 0.08, "itl", idle_ttft_s=0.1).admit
    text = adm.metrics.render().decode()
    assert 'mooncake_proxy_unproven_misses_total{slo="ttft"} 5.0' in text
    assert 'mooncake_proxy_unproven_misses_total{slo="itl"} 2.0' in text


def test_itl_model_learns_batch_cost_and_charges_prefill() -> None:
    m = ItlModel()
    for _ in range(200):
        for batch in (1, 3, 5):
            m.observe(batch, 0.010 + 0.005 * (batch - 1))  # truth: 10 ms + 5 ms per request
    assert m.base(1) == pytest.approx(0.010, abs=0.002)
    assert m.base(9) == pytest.approx(0.050, abs=0.004)
    assert m.predict(3, 400, 1 / 4000) == pytest.approx(0.020 + 0.1, abs=0.003)
    m.observe(0, 5.0)  # nothing was decoding: not a decode gap
    m.observe(2, -1.0)
    assert m.observations == 600


def test_decode_gaps_that_waited_for_a_prefill_are_not_decode_load() -> None:
    """A gap of a running request that spanned a local prefill on D ends about when that
    prefill's own first token arrives; taken as decode load it would inflate D's predicted ITL
    and reject requests that D could serve."""
    c = _pd()
    d = c.registry.get("d")
    assert d is not None
    gap_start = time.monotonic()
    ticket = PrefillTicket(d, 800)  # a local prefill starts on D
    assert not d.prefill_free_since(gap_start)
    ticket.close()  # its first token: the prefill is over
    assert not d.prefill_free_since(gap_start)  # the gap that spanned it is left out
    assert d.prefill_free_since(time.monotonic())  # later gaps are decode steps alone


def _pd(**cfg: object) -> Conductor:
    c = Conductor(ProxyConfig(prefill_urls=("http://127.0.0.1:9000",),
                              decode_urls=("http://127.0.0.1:9100",), **cfg))  # type: ignore[arg-type]
    c.registry.upsert("p", "http://127.0.0.1:9000", "prefill", "static", model_shape=TINY)
    c.registry.upsert("d", "http://127.0.0.1:9100", "decode", "static", model_shape=TINY)
    for name in ("p", "d"):  # both warmed up: 10 ms + 4000 tokens a second (warmup.py)
        inst = c.registry.get(name)
        assert inst is not None
        inst.ttft = TtftModel(prior_overhead_s=0.01, prior_tokens_per_s=4000.0)
    return c


def test_plain_conductor_routes_each_prompt_by_prediction() -> None:
    """No flag: a 1-token prompt is prefilled on D, a long token-id prompt pipelined with the
    cut from the published shape, the same prompt disaggregated while D decodes others."""
    c = _pd()
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    ids = PromptHasher(None, tokens_per_block=32)
    route = c.route(ids.key(False, {"prompt": [5]}), set(), pipelinable=True)
    assert route is not None and route.path == "local" and route.prefill.instance is d
    long_ = ids.key(False, {"prompt": list(range(10, 1910))})
    route = c.route(long_, set(), pipelinable=True)
    assert route is not None and route.path == "pipelined" and route.decode is d
    # C = 1088 from the shape, share 0.55 of 1900 + 1900^2 / 2C: 1248 tokens, 39 blocks.
    assert route.pipeline_tokens == 1248 and route.prefill.instance is p
    # A text prompt that long would be pipelined: worth asking /tokenize for its ids.
    text = PromptHasher(None).key(False, {"prompt": "word " * 1900})
    assert c.would_pipeline(text) and not c.would_pipeline(
        PromptHasher(None).key(False, {"prompt": "word"}))
    d.running = 3.0  # D decodes three requests: a prefill there would cost them ITL
    route = c.route(long_, set(), pipelinable=True)
    assert route is not None and route.path == "disaggregated" and route.prefill.instance is p
    route = c.route(ids.key(False, {"prompt": [5]}), set(), pipelinable=True)
    assert route is not None and route.path == "local"  # one token: within the ITL SLO
    # The overrides still hold: never local, never pipelined.
    c2 = _pd(local_prefill_max_tokens=0, pipeline_prefill_min_tokens=0)
    for key in (ids.key(False, {"prompt": [5]}), long_):
        route = c2.route(key, set(), pipelinable=True)
        assert route is not None and route.path == "disaggregated"


def test_plain_conductor_sizes_the_prefill_window_from_p_speed() -> None:
    c = _pd()
    p = c.registry.get("p")
    assert p is not None
    assert c.window_limit(p) == pytest.approx(0.15 * 4000, rel=0.05)  # 0.15 s of P's prefill
    assert _pd(prefill_window_tokens=0).window_limit(p) == 0
    assert _pd(prefill_window_tokens=576).window_limit(p) == 576
    # The window is P's queue: D's prefill work is counted apart from it.
    ticket = PrefillTicket(p, 500)
    assert p.queued_prefill_tokens == 500
    ticket.close()


def test_attention_tokens_from_the_shape() -> None:
    assert attention_tokens(TINY) == 1088  # the value README gave by hand
    llama3_8b = ModelShape(num_layers=32, num_heads=32, head_dim=128, num_kv_heads=8,
                           hidden_size=4096, intermediate_size=14336, dtype="bfloat16",
                           block_size=16)
    assert attention_tokens(llama3_8b) == pytest.approx(26624)
    c = _pd()
    p = c.registry.get("p")
    assert p is not None
    assert c.attention_tokens(p) == 1088
    assert _pd(pipeline_attention_tokens=0).attention_tokens(p) == 0  # override
    p.model_shape = None
    assert c.attention_tokens(p) == 0  # no shape: tokens split evenly


@pytest.mark.parametrize("change,why", [
    ({"num_layers": 0}, "num_layers must be an integer >= 1"),
    ({"num_heads": 10**6}, "num_heads 1000000 is above 4096"),
    ({"head_dim": "128"}, "head_dim must be an integer"),
    ({"num_kv_heads": 16}, "num_kv_heads 16 is above num_heads 8"),
    ({"dtype": "complex64"}, "dtype 'complex64' is not one of"),
    ({"block_size": True}, "block_size must be an integer"),
])
def test_model_shape_from_the_network_is_checked(change: dict, why: str) -> None:
    raw = {**TINY.to_dict(), **change}
    with pytest.raises(MalformedValueError, match=why):
        ModelShape.from_dict(raw)
    assert shape_in_answer("p", {"model_shape": raw}) is None  # logged, not used
    assert shape_in_answer("p", {"model_shape": TINY.to_dict()}) == TINY
    assert shape_in_answer("p", {"remote_control": {}}) is None


def test_instance_record_carries_the_shape() -> None:
    info = InstanceInfo("p0", "prefill", "http://h:1", "tcp://h:2", "m", model_shape=TINY)
    assert InstanceInfo.from_json(info.to_json()).model_shape == TINY
    bare = InstanceInfo("p0", "prefill", "http://h:1", "tcp://h:2", "m")
    assert InstanceInfo.from_json(bare.to_json()).model_shape is None  # older writers
    bad = info.to_json().replace(b'"head_dim":32', b'"head_dim":-1')
    with pytest.raises(MalformedValueError, match="head_dim"):
        InstanceInfo.from_json(bad)


def test_slow_decode_steps_alone_do_not_move_prefill_off_an_idle_decode() -> None:
    """When every path misses the ITL SLO because D's steps are slow (a loaded host), a D
    with nothing running still prefills a tiny prompt: that costs no one's ITL."""
    slow = _prediction(prompt_tokens=1, d_base_itl_s=0.3)
    plan = choose(options(slow), None, 0.1)
    assert plan.option is not None and plan.option.path == "local" and not plan.within_itl


def test_noisy_timings_never_make_prefill_look_free() -> None:
    """Timings that fall with prompt size (a loaded host) fit a falling line; the rate stays
    within 10x of the warm-up's, so a long prompt is never predicted to cost nothing."""
    m = TtftModel(prior_overhead_s=0.01, prior_tokens_per_s=4000.0)
    for _ in range(20):
        m.observe(100, 0.5)
        m.observe(1900, 0.2)
    assert m.coefficients()[1] == pytest.approx(0.1 / 4000.0)
    assert m.predict(1900) > m.predict(1)


def test_a_handoff_that_waited_for_a_prefill_on_d_is_not_learned() -> None:
    """D's first token after P's answer measures the handoff only while D computes no prefill
    of ours: behind a local prefill it also waits for D's queue (which the plan counts apart),
    and learned as the handoff it would make every later disaggregation look slow."""
    from aiohttp.test_utils import make_mocked_request

    from mooncake_vllm.proxy.conductor import Route
    from mooncake_vllm.proxy.disagg import RequestRun
    from mooncake_vllm.proxy.routing import assess

    c = _pd()
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    key = PromptHasher(None, tokens_per_block=32).key(False, {"prompt": list(range(10, 500))})
    route = Route(assess(p, key), d, path="disaggregated")

    def handoff(local_prefill_on_d: bool) -> float | None:
        c.handoff_s.clear()
        run = RequestRun(c, make_mocked_request("POST", "/v1/completions"), route, key,
                         "/v1/completions", {}, True, time.monotonic() - 0.3)
        run._prefill_done = 0.1  # P answered 0.1 s in; D's first token now, 0.2 s later
        local = PrefillTicket(d, 400) if local_prefill_on_d else None
        run.first_output()
        run.close_tickets()
        if local is not None:
            local.close()
        return c.handoff_s.get((p.instance_id, d.instance_id))

    assert handoff(False) == pytest.approx(0.2, abs=0.05)
    assert handoff(True) is None


def test_itl_is_per_token_event_when_reads_merge_them() -> None:
    """On a busy host the conductor's reads of D's stream merge several token events: the gap
    is spread over them, or a merged read would count as one long step, and streams that met
    the ITL SLO would count as missing it (the evidence that turns refusals on)."""
    from aiohttp.test_utils import make_mocked_request

    from mooncake_vllm.proxy.conductor import Route
    from mooncake_vllm.proxy.disagg import RequestRun, token_events
    from mooncake_vllm.proxy.routing import assess

    assert token_events(b'data: {"a": 1}\n\ndata: {"a": 2}\n\n') == 2
    assert token_events(b"data: [DONE]\n\n") == 0
    # "data:" in the generated text (JSON, no raw newline) is no event
    assert token_events(b'data: {"text": "data: x data: [DONE]"}\n\n') == 1
    c = _pd(slo_ttft_s=1.0, slo_itl_s=0.05)
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    key = PromptHasher(None, tokens_per_block=32).key(False, {"prompt": list(range(10, 50))})
    run = RequestRun(c, make_mocked_request("POST", "/v1/completions"),
                     Route(assess(p, key), d, path="disaggregated"), key, "/v1/completions",
                     {}, True, time.monotonic())
    run.first_output()
    time.sleep(0.08)
    run.on_chunk(b'data: {"t": 1}\n\ndata: {"t": 2}\n\ndata: {"t": 3}\n\ndata: {"t": 4}\n\n')
    run.on_chunk(b"data: [DONE]\n\n")
    run.stream_ended()
    run.close_tickets()
    (outcome,) = c.admission.recent
    assert outcome.observed_itl_s is not None and 0.015 < outcome.observed_itl_s < 0.05


def test_a_refused_plan_names_the_path_it_judged() -> None:
    """When the only paths within the ITL SLO miss the TTFT SLO the plan refuses, and the route
    admission sees is that path: served anyway (no evidence yet of misses), the request must
    not take a faster path that the ITL SLO ruled out (a prefill on a busy D)."""
    busy = {"d_running": 3.0, "d_base_itl_s": 0.02}
    queued = _prediction(prompt_tokens=1000, p_prefill_s=0.6, d_prefill_s=0.26, **busy)
    plan = choose(options(queued), 0.3, 0.05, idle_ttft_s=0.28)
    assert plan.option is None and plan.rejected_for == "ttft"
    assert plan.judged is not None and plan.judged.path == "disaggregated"
    c = _pd(slo_ttft_s=0.3, slo_itl_s=0.05)
    p, d = c.registry.get("p"), c.registry.get("d")
    assert p is not None and d is not None
    ticket = PrefillTicket(p, 2000)  # half a second of work queued on P
    d.inflight_decode = 3  # and D decoding
    route = c.route(PromptHasher(None, tokens_per_block=32).key(
        False, {"prompt": list(range(10, 1010))}), set())
    ticket.close()
    assert route is not None and route.rejected_for == "ttft"
    assert route.path == "disaggregated" and route.decode is d
    assert c.admission.judge("p", route.path, route.predicted_ttft_s, route.predicted_itl_s,
                             route.rejected_for, route.idle_ttft_s).admit  # unproven


def test_a_point_observed_n_times_at_once_fits_as_n_observations() -> None:
    """ITL gaps come several to a read: one weighted observation must leave the line exactly
    where that many observations would (the relay does it in O(1), not in a loop)."""
    from mooncake_vllm.proxy.online_fit import ForgettingLine

    one_by_one, at_once = ForgettingLine(0.9), ForgettingLine(0.9)
    for line in (one_by_one, at_once):
        line.add(1.0, 0.02, 5.0)
        line.observe(2.0, 0.03)
    for _ in range(7):
        one_by_one.observe(4.0, 0.05)
    at_once.observe(4.0, 0.05, 7)
    assert at_once.moments() == pytest.approx(one_by_one.moments(), rel=1e-9, abs=1e-12)
