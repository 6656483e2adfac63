"""`bench serve`'s human-readable outputs: the text report and the PNG (goodput and ITL p99
against the request rate, one line per system)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mooncake_vllm.bench.goodput import Slos
from mooncake_vllm.bench.host_load import NOISY_SHARE


def _ms(v: Any, digits: int = 1) -> str:
    return f"{v * 1e3:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def text_report(result: dict[str, Any]) -> str:
    systems: dict[str, Any] = result["systems"]
    slos = result["slos"]
    lines = [f"SLOs: TTFT {_ms(slos['ttft_s'])} ms, ITL {_ms(slos['itl_s'], 2)} ms "
             f"({slos['rule']})", ""]
    names = list(systems)
    lines.append("TTFT p50, ms (vs single on two cores: ratio, or +ms for 1-token prompts)")
    lines.append(f"{'scenario':16s}" + "".join(f"{n:>26s}" for n in names))
    ratios = result["ttft_p50_vs_single"]
    for scen in result["workload"]["scenarios"]:
        row = f"{scen:16s}"
        for n in names:
            s = systems[n].get("scenarios", {}).get(scen, {})
            rel = ratios.get(n, {}).get(scen)
            rel_text = "" if rel is None else (
                f" ({rel * 1e3:+.1f} ms)" if scen == "prompt_1" else f" ({rel:.2f}x)")
            row += f"{_ms(s.get('ttft_p50_s')) + rel_text:>26s}"
        lines.append(row)
    lines += ["", "goodput, requests/s meeting both SLOs (SLO attainment, rejected fraction, "
              "ITL p99 ms of admitted requests)"]
    lines.append(f"{'rate':>6s}" + "".join(f"{n:>32s}" for n in names))
    rates = sorted({p["rate"] for d in systems.values() for p in d.get("sweep") or []})
    for rate in rates:
        row = f"{rate:6g}"
        for n in names:
            p = next((p for p in systems[n].get("sweep") or [] if p["rate"] == rate), None)
            cell = "-" if p is None else (
                f"{p['goodput_rps']:.2f} ({p['slo_attainment']:.2f}, "
                f"{p['rejected_fraction']:.2f}, {_ms(p['admitted_itl_p99_s'])})")
            row += f"{cell:>32s}"
        lines.append(row)
    lines.append("share of the machine others used (other processes + steal) while each was "
                 "measured: " + ", ".join(
                     f"{n} {d['host_load']['foreign_cpu_share']:.0%} + "
                     f"{d['host_load']['steal_share']:.0%}"
                     for n, d in systems.items() if "host_load" in d))
    for n in names:
        if "error" in systems[n]:
            lines.append(f"{n} did not run: {systems[n]['error'].splitlines()[0][:200]}")
    if result.get("noisy"):
        lines += ["", f"NOISY: others used more than {NOISY_SHARE:.0%} of the machine while "
                  f"measuring {', '.join(result['noisy'])}: the ratios and verdicts below "
                  "compare systems measured under different load"]
    lines += ["", "bars (issue 12):"]
    for v in result["verdicts"]:
        lines.append(f"  {v['verdict'].upper():13s} {v['bar']}: {v['value']}")
    return "\n".join(lines)


def plot(systems: dict[str, Any], slos: Slos, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (good, itl) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates: set[float] = set()
    for name, data in systems.items():
        sweep = data.get("sweep") or []
        if not sweep:
            continue
        xs = [p["rate"] for p in sweep]
        rates.update(xs)
        good.plot(xs, [p["goodput_rps"] for p in sweep], marker="o", label=name)
        itl.plot(xs, [p["admitted_itl_p99_s"] * 1e3 for p in sweep], marker="o", label=name)
    if rates:
        top = max(rates)
        good.plot([0, top], [0, top], color="grey", linestyle=":", label="offered load")
    itl.axhline(slos.itl_s * 1e3, color="red", linestyle="--", label="ITL SLO")
    good.set_xlabel("request rate (requests/s, Poisson)")
    good.set_ylabel("goodput (requests/s meeting both SLOs)")
    good.set_title(f"goodput (TTFT SLO {slos.ttft_s * 1e3:.0f} ms, "
                   f"ITL SLO {slos.itl_s * 1e3:.1f} ms)")
    itl.set_xlabel("request rate (requests/s, Poisson)")
    itl.set_ylabel("ITL p99 of admitted requests (ms)")
    itl.set_yscale("log")
    itl.set_title("inter-token latency p99")
    for ax in (good, itl):
        ax.grid(True, which="both", alpha=0.3)
    good.legend(fontsize=8, loc="upper left")
    itl.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
