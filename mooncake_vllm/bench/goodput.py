"""Goodput under a TTFT SLO and an ITL SLO, and the rule that fixes the SLOs before a run.

The rule (`derive_slos`): the single two-core instance serves `--slo-probe-requests` requests
of the sweep's own mix one at a time (unloaded); the TTFT SLO is `--slo-ttft-factor` times
the 90th percentile of their TTFTs, the ITL SLO `--slo-itl-factor` times the 90th percentile of
their mean inter-token latencies. `--slo-ttft-s` / `--slo-itl-s` fix either by hand instead.

A request meets the SLOs when it was answered without error, its TTFT is within the TTFT
SLO, and its mean inter-token latency (time per output token after the first) is within the
ITL SLO. Rejected (503) and failed requests miss. Goodput at a rate is the requests per second
that met both SLOs out of those offered: the rate times the share that met them. (Counting
per second of makespan instead would let the latency of a run's last request decide between
two systems that both met every SLO.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mooncake_vllm.bench.workload import Outcome, percentile, rounded

SLO_QUANTILE = 90


@dataclass(frozen=True)
class Slos:
    ttft_s: float
    itl_s: float
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_slos(unloaded: Sequence[Outcome], ttft_factor: float, itl_factor: float,
                ttft_s: float | None = None, itl_s: float | None = None) -> Slos:
    """The SLOs from unloaded outcomes of the single instance (see the module's rule); a value
    given by hand wins over the derived one."""
    for name, value in (("--slo-ttft-factor", ttft_factor), ("--slo-itl-factor", itl_factor),
                        ("--slo-ttft-s", ttft_s), ("--slo-itl-s", itl_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    failed = [o.error for o in unloaded if o.error]
    if failed:
        raise ValueError(f"{len(failed)} of {len(unloaded)} unloaded requests failed, so no "
                         f"SLO can be derived from them; first error: {failed[0]}")
    ttfts = [o.ttft_s for o in unloaded]
    itls = [o.mean_itl_s for o in unloaded if o.output_tokens > 1]
    parts = []
    if ttft_s is None:
        if not ttfts:
            raise ValueError("no unloaded request to derive the TTFT SLO from")
        base = percentile(ttfts, SLO_QUANTILE)
        ttft_s = ttft_factor * base
        parts.append(f"TTFT SLO = {ttft_factor:g} x unloaded single-instance TTFT "
                     f"p{SLO_QUANTILE} ({base * 1e3:.1f} ms, {len(ttfts)} requests)")
    else:
        parts.append("TTFT SLO given by hand")
    if itl_s is None:
        if not itls:
            raise ValueError("no unloaded request with two or more output tokens to derive "
                             "the ITL SLO from")
        base = percentile(itls, SLO_QUANTILE)
        itl_s = itl_factor * base
        parts.append(f"ITL SLO = {itl_factor:g} x unloaded single-instance mean ITL "
                     f"p{SLO_QUANTILE} ({base * 1e3:.2f} ms)")
    else:
        parts.append("ITL SLO given by hand")
    return Slos(round(ttft_s, 6), round(itl_s, 6), "; ".join(parts))


def meets_slos(outcome: Outcome, slos: Slos) -> bool:
    if outcome.error or not outcome.ttft_s <= slos.ttft_s:
        return False
    return outcome.output_tokens < 2 or outcome.mean_itl_s <= slos.itl_s


def goodput(outcomes: Sequence[Outcome], rate: float, slos: Slos) -> dict[str, Any]:
    """SLO attainment and goodput of one sweep point offered at `rate` requests/s; admitted
    requests' ITL p99 beside."""
    met = sum(meets_slos(o, slos) for o in outcomes)
    admitted = [o for o in outcomes if not o.rejected]
    attainment = met / len(outcomes) if outcomes else math.nan
    return rounded({
        "met_slos": met,
        "slo_attainment": attainment,
        "goodput_rps": rate * attainment,
        "rejected_fraction": (len(outcomes) - len(admitted)) / len(outcomes)
        if outcomes else math.nan,
        "admitted_itl_p99_s": percentile([x for o in admitted for x in o.itl_s], 99),
    })
