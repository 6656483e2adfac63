"""The bars of issue 12's "Done when", judged on one `bench serve` run: every bar gets a
verdict, "pass", "miss" or "not measured" (a system or scenario that did not run), never left
out.

Fixed scenarios, ours (defaults) against the single two-core instance's TTFT p50:
1900-token prompts within 1.1x, 1-token prompts within +10 ms, 8 x 500 concurrent within 1.5x,
and below vLLM's built-in MooncakeConnector on each; a fixed scenario in which ours refused a
request misses both (its TTFT p50 would be of the admitted requests only). Goodput sweep: ours
at least the single instance's goodput at every rate; at least 1.5x the built-in connector's
at the highest rate that either sustains (SLO attainment of at least `SUSTAINED_ATTAINMENT`);
ours' ITL p99 within the ITL SLO at every rate at which it admitted a request, judged over
every gap and over each request's mean gap (the SLO's own measure).
"""

from __future__ import annotations

import math
from typing import Any

OURS, SINGLE, BUILTIN = "mooncake_vllm", "single", "vllm_mooncake"
SUSTAINED_ATTAINMENT = 0.9
# scenario -> (how ours is compared with the single instance, the bar)
FIXED_BARS: dict[str, tuple[str, float]] = {
    "prompt_1900": ("ratio", 1.1),
    "prompt_1": ("plus_s", 0.010),
    "concurrent8_500": ("ratio", 1.5),
}


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _verdict(bar: str, value: Any, ok: bool | None, **detail: Any) -> dict[str, Any]:
    verdict = "not measured" if ok is None else "pass" if ok else "miss"
    return {"bar": bar, "value": value, "verdict": verdict, **detail}


def _ttft(systems: dict[str, Any], system: str, scenario: str) -> float | None:
    return _number(systems.get(system, {}).get("scenarios", {}).get(scenario, {})
                   .get("ttft_p50_s"))


def fixed_ratios(systems: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Every system's TTFT p50 against the single two-core instance's: a ratio, or a
    difference in seconds for 1-token prompts (their TTFT is mostly fixed overhead)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in systems:
        if name == SINGLE:
            continue
        per: dict[str, float | None] = {}
        for scen, (kind, _) in FIXED_BARS.items():
            mine, base = _ttft(systems, name, scen), _ttft(systems, SINGLE, scen)
            if mine is None or base is None:
                per[scen] = None
            else:
                per[scen] = round(mine / base if kind == "ratio" else mine - base, 4)
        out[name] = per
    return out


def _refused(systems: dict[str, Any], scenario: str) -> int:
    return int(systems.get(OURS, {}).get("scenarios", {}).get(scenario, {}).get("rejected", 0))


def fixed_verdicts(systems: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = fixed_ratios(systems).get(OURS, {})
    out = []
    for scen, (kind, bar) in FIXED_BARS.items():
        value, refused = ratios.get(scen), _refused(systems, scen)
        text = (f"{scen}: TTFT p50 of ours <= {bar:g}x the single instance's" if kind == "ratio"
                else f"{scen}: TTFT p50 of ours <= the single instance's + {bar * 1e3:g} ms")
        out.append(_verdict(text, value, None if value is None else value <= bar and not refused,
                            rejected=refused))
    for scen in FIXED_BARS:
        mine, peer = _ttft(systems, OURS, scen), _ttft(systems, BUILTIN, scen)
        refused = _refused(systems, scen)
        ok = None if mine is None or peer is None else mine < peer and not refused
        out.append(_verdict(f"{scen}: TTFT p50 of ours below the built-in connector's",
                            [mine, peer], ok, rejected=refused))
    return out


def _sweep(systems: dict[str, Any], name: str) -> dict[float, dict[str, Any]]:
    return {p["rate"]: p for p in systems.get(name, {}).get("sweep") or []}


def sweep_verdicts(systems: dict[str, Any], itl_slo_s: float | None) -> list[dict[str, Any]]:
    ours, single, peer = (_sweep(systems, n) for n in (OURS, SINGLE, BUILTIN))
    out = []

    shared = sorted(set(ours) & set(single))
    per_rate = {r: [ours[r].get("goodput_rps"), single[r].get("goodput_rps")] for r in shared}
    ok = None
    if shared:
        pairs = [(_number(a), _number(b)) for a, b in per_rate.values()]
        ok = all(a is not None and b is not None and a >= b for a, b in pairs)
    out.append(_verdict("goodput of ours >= the single instance's at every rate",
                        per_rate, ok))

    rates = sorted(set(ours) & set(peer))
    sustained = [r for r in rates
                 if max(_number(ours[r].get("slo_attainment")) or 0.0,
                        _number(peer[r].get("slo_attainment")) or 0.0) >= SUSTAINED_ATTAINMENT]
    if sustained:
        r = sustained[-1]
        mine, theirs = _number(ours[r].get("goodput_rps")), _number(peer[r].get("goodput_rps"))
        ok = mine is not None and theirs is not None and mine >= 1.5 * theirs
        out.append(_verdict("goodput of ours >= 1.5x the built-in connector's at the highest "
                            "rate either sustains", [mine, theirs], ok, rate=r))
    else:
        out.append(_verdict("goodput of ours >= 1.5x the built-in connector's at the highest "
                            "rate either sustains", None, None,
                            why="built-in connector not run" if not peer
                            else "neither sustained any rate"))

    # The ITL bar, read two ways: the p99 of every gap between tokens, and the p99 of
    # each request's mean gap, the measure the ITL SLO itself is set on and goodput counts.
    for bar, key in (("ITL p99 of ours within the ITL SLO at every rate it admits",
                      "admitted_itl_p99_s"),
                     ("ITL p99 of ours, each request's mean gap (the SLO's measure), within "
                      "the ITL SLO at every rate it admits", "tpot_p99_s")):
        admitted = {r: p.get(key) for r, p in ours.items()
                    if p.get("rejected", 0) < p.get("requests", 0)}
        ok = None
        if admitted and itl_slo_s is not None:
            ok = all((v := _number(x)) is not None and v <= itl_slo_s
                     for x in admitted.values())
        out.append(_verdict(bar, admitted, ok, itl_slo_s=itl_slo_s))
    return out
