"""`bench serve`'s arithmetic: the Poisson schedule, the SLO rule, goodput, and the verdicts
on the issue's bars. Pure functions on hand-made outcomes, no servers."""

from __future__ import annotations

import math
import statistics

import pytest

from mooncake_vllm.bench import verdicts
from mooncake_vllm.bench.goodput import Slos, derive_slos, goodput, meets_slos
from mooncake_vllm.bench.workload import (
    Outcome,
    PromptMaker,
    mixed_requests,
    poisson_arrivals,
    summarise,
)


def answered(ttft_s: float, itl_s: float, tokens: int) -> Outcome:
    gaps = [itl_s] * (tokens - 1)
    return Outcome(status=200, ttft_s=ttft_s, itl_s=gaps, output_tokens=tokens,
                   latency_s=ttft_s + sum(gaps))


def test_poisson_arrivals_have_the_rate_and_are_reproducible() -> None:
    offsets = poisson_arrivals(4.0, 4000, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    # exponential gaps: the standard deviation equals the mean (a fixed spacing would give 0)
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.1)
    assert poisson_arrivals(4.0, 50, seed=3) == offsets[:50]
    assert poisson_arrivals(4.0, 50, seed=4) != offsets[:50]
    with pytest.raises(ValueError, match="rate must be positive, got 0"):
        poisson_arrivals(0.0, 5, seed=1)


def test_mixed_requests_draw_lengths_within_their_ranges() -> None:
    offsets = poisson_arrivals(2.0, 200, seed=1)
    reqs = mixed_requests(PromptMaker(2048, 0), offsets, (64, 1024), (8, 48), seed=5)
    assert [r.send_at_s for r in reqs] == offsets
    lengths = [len(r.prompt) for r in reqs]
    outputs = [r.max_tokens for r in reqs]
    assert min(lengths) >= 64 and max(lengths) <= 1024 and len(set(lengths)) > 100
    assert min(outputs) >= 8 and max(outputs) <= 48 and len(set(outputs)) > 30
    again = mixed_requests(PromptMaker(2048, 0), offsets, (64, 1024), (8, 48), seed=5)
    assert again == reqs  # every system is sent the same prompts


def test_slos_are_factors_of_the_unloaded_p90() -> None:
    # ten unloaded requests: TTFT 10..100 ms, mean ITL 1..10 ms
    unloaded = [answered(0.01 * i, 0.001 * i, 5) for i in range(1, 11)]
    slos = derive_slos(unloaded, ttft_factor=3, itl_factor=2)
    assert slos.ttft_s == pytest.approx(3 * 0.091)  # p90 of 10..100 ms (interpolated)
    assert slos.itl_s == pytest.approx(2 * 0.0091)
    assert "3 x unloaded single-instance TTFT p90" in slos.rule
    by_hand = derive_slos(unloaded, 3, 2, ttft_s=0.5)
    assert by_hand.ttft_s == 0.5 and by_hand.itl_s == slos.itl_s
    assert "TTFT SLO given by hand" in by_hand.rule


def test_slos_refuse_bad_input_naming_it() -> None:
    with pytest.raises(ValueError, match="1 of 2 unloaded requests failed.*HTTP 500"):
        derive_slos([answered(0.1, 0.01, 4), Outcome(status=500, error="HTTP 500: boom")], 3, 3)
    with pytest.raises(ValueError, match="--slo-itl-factor must be a positive number, got 0"):
        derive_slos([answered(0.1, 0.01, 4)], 3, 0)
    with pytest.raises(ValueError, match="--slo-ttft-s must be a positive number, got -1"):
        derive_slos([answered(0.1, 0.01, 4)], 3, 3, ttft_s=-1)
    with pytest.raises(ValueError, match="two or more output tokens"):
        derive_slos([answered(0.1, 0.0, 1)], 3, 3)


def test_goodput_counts_only_requests_meeting_both_slos() -> None:
    slos = Slos(ttft_s=0.2, itl_s=0.02, rule="test")
    outcomes = [
        answered(0.1, 0.01, 10),  # meets both
        answered(0.1, 0.01, 1),  # one token: no ITL to miss
        answered(0.3, 0.01, 10),  # TTFT missed
        answered(0.1, 0.05, 10),  # ITL missed
        Outcome(status=503, error="HTTP 503: overloaded"),  # rejected: a miss
        Outcome(status=0, error="TimeoutError: "),  # failed: a miss
    ]
    assert [meets_slos(o, slos) for o in outcomes] == [True, True, False, False, False, False]
    point = goodput(outcomes, rate=3.0, slos=slos)
    assert point["met_slos"] == 2
    assert point["goodput_rps"] == pytest.approx(1.0, abs=1e-5)  # 3/s offered, a third met
    assert point["slo_attainment"] == pytest.approx(2 / 6, abs=1e-6)
    assert point["rejected_fraction"] == pytest.approx(1 / 6, abs=1e-6)
    assert point["admitted_itl_p99_s"] == pytest.approx(0.05)  # the ITL-missing request's gaps
    summary = summarise(outcomes, 4.0)
    assert (summary["requests"], summary["rejected"], summary["failed"]) == (6, 1, 1)


def _system(scenarios: dict[str, float], sweep: list[dict[str, float]] | None = None
            ) -> dict[str, object]:
    return {"scenarios": {k: {"ttft_p50_s": v} for k, v in scenarios.items()},
            "sweep": sweep or []}


def test_fixed_verdicts_are_the_issue_bars() -> None:
    systems = {
        "single": _system({"prompt_1900": 0.200, "prompt_1": 0.010, "concurrent8_500": 0.200}),
        "mooncake_vllm": _system({"prompt_1900": 0.219, "prompt_1": 0.021,
                                  "concurrent8_500": 0.310}),
    }
    by_bar = {v["bar"]: v for v in verdicts.fixed_verdicts(systems)}
    assert by_bar["prompt_1900: TTFT p50 of ours <= 1.1x the single instance's"]["verdict"] \
        == "pass"
    one = by_bar["prompt_1: TTFT p50 of ours <= the single instance's + 10 ms"]
    assert one["verdict"] == "miss" and one["value"] == pytest.approx(0.011)
    assert by_bar["concurrent8_500: TTFT p50 of ours <= 1.5x the single instance's"][
        "verdict"] == "miss"
    # the built-in connector did not run: its bars say so, they are not left out
    below = [v for v in by_bar.values() if "built-in" in v["bar"]]
    assert len(below) == 3 and {v["verdict"] for v in below} == {"not measured"}
    systems["vllm_mooncake"] = _system({"prompt_1900": 0.4, "prompt_1": 0.02,
                                        "concurrent8_500": 0.5})
    below = [v for v in verdicts.fixed_verdicts(systems) if "built-in" in v["bar"]]
    assert [v["verdict"] for v in below] == ["pass", "miss", "pass"]
    # A p50 of the admitted requests alone is no pass: a scenario with a refusal misses.
    systems["mooncake_vllm"]["scenarios"]["prompt_1900"]["rejected"] = 1
    by_bar = {v["bar"]: v for v in verdicts.fixed_verdicts(systems)}
    for bar in ("prompt_1900: TTFT p50 of ours <= 1.1x the single instance's",
                "prompt_1900: TTFT p50 of ours below the built-in connector's"):
        assert by_bar[bar]["verdict"] == "miss" and by_bar[bar]["rejected"] == 1


def _point(rate: float, good: float, attain: float, itl_p99: float = 0.01,
           rejected: int = 0, tpot_p99: float = 0.01) -> dict[str, float]:
    return {"rate": rate, "goodput_rps": good, "slo_attainment": attain, "requests": 10,
            "rejected": rejected, "admitted_itl_p99_s": itl_p99, "tpot_p99_s": tpot_p99}


def test_sweep_verdicts() -> None:
    systems = {
        "single": _system({}, [_point(1, 1.0, 1.0), _point(4, 2.0, 0.5), _point(8, 1.0, 0.1)]),
        "mooncake_vllm": _system({}, [_point(1, 1.0, 1.0), _point(4, 3.8, 0.95),
                                      _point(8, 2.5, 0.3, itl_p99=0.05)]),
        "vllm_mooncake": _system({}, [_point(1, 1.0, 1.0), _point(4, 2.0, 0.5),
                                      _point(8, 0.5, 0.05)]),
    }
    got = {v["bar"]: v for v in verdicts.sweep_verdicts(systems, itl_slo_s=0.02)}
    assert got["goodput of ours >= the single instance's at every rate"]["verdict"] == "pass"
    builtin = got["goodput of ours >= 1.5x the built-in connector's at the highest rate "
                  "either sustains"]
    assert builtin["rate"] == 4 and builtin["verdict"] == "pass"  # 3.8 >= 1.5 x 2.0
    itl = got["ITL p99 of ours within the ITL SLO at every rate it admits"]
    assert itl["verdict"] == "miss"  # 50 ms at 8/s against 20 ms
    mean_gap = got["ITL p99 of ours, each request's mean gap (the SLO's measure), within the "
                   "ITL SLO at every rate it admits"]
    assert mean_gap["verdict"] == "pass"  # every request's mean gap 10 ms
    systems["mooncake_vllm"]["sweep"][1] = _point(4, 3.8, 0.95, tpot_p99=0.03)
    assert {v["bar"]: v for v in verdicts.sweep_verdicts(systems, itl_slo_s=0.02)}[
        mean_gap["bar"]]["verdict"] == "miss"
    # a rate at which ours rejected everything has no ITL to judge
    systems["mooncake_vllm"]["sweep"][2] = _point(8, 0.0, 0.0, itl_p99=math.nan, rejected=10)
    got = {v["bar"]: v for v in verdicts.sweep_verdicts(systems, itl_slo_s=0.02)}
    assert got["ITL p99 of ours within the ITL SLO at every rate it admits"]["verdict"] \
        == "pass"
    assert got["goodput of ours >= the single instance's at every rate"]["verdict"] == "miss"
    del systems["vllm_mooncake"]
    got = {v["bar"]: v for v in verdicts.sweep_verdicts(systems, itl_slo_s=0.02)}
    builtin = got["goodput of ours >= 1.5x the built-in connector's at the highest rate "
                  "either sustains"]
    assert builtin["verdict"] == "not measured" and builtin["why"] == \
        "built-in connector not run"
