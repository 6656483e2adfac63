"""Early rejection against the two SLOs, and the score of how well predictions matched.

The plan (planner.py) predicts each request's TTFT and ITL on the path it takes; with a TTFT
SLO (admission on) a request predicted to miss it, or whose every path misses the ITL SLO, is
refused at once with 503 and Retry-After, when load is the cause: one that would miss on idle
instances too is admitted and counted (`mooncake_proxy_slo_unattainable`), since no retry
would meet the SLO. Every admitted request's observed TTFT, and for a
stream its observed ITL (the mean gap between relayed chunks), is paired with its prediction:
the pairs go to Prometheus (`mooncake_proxy_{ttft,itl}_prediction_error_seconds`,
`mooncake_proxy_slo_outcomes`, `mooncake_proxy_itl_slo_outcomes`) and the most recent ones to
`GET /admission` as JSON.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from .metrics import ProxyMetrics


@dataclass(frozen=True)
class Verdict:
    admit: bool
    predicted_ttft_s: float
    retry_after_s: int = 0
    reason: str = ""  # why refused: "ttft" or "itl"


@dataclass
class Outcome:
    at: float
    instance: str
    path: str
    predicted_ttft_s: float
    observed_ttft_s: float | None  # None: rejected, or failed before a first token
    admitted: bool
    predicted_itl_s: float | None = None
    observed_itl_s: float | None = None  # a stream's mean gap between chunks


def _mean_abs(pairs: list[tuple[float | None, float | None]]) -> float | None:
    errors = [abs(o - p) for p, o in pairs if p is not None and o is not None]
    return sum(errors) / len(errors) if errors else None


class Admission:
    def __init__(self, slo_ttft_s: float | None, metrics: ProxyMetrics,
                 slo_itl_s: float | None = None, keep: int = 1000) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.slo_itl_s = slo_itl_s
        self.metrics = metrics
        self.recent: deque[Outcome] = deque(maxlen=keep)

    def judge(self, instance: str, path: str, predicted_ttft_s: float,
              predicted_itl_s: float | None = None, planned_rejection: str = "",
              idle_ttft_s: float = 0.0) -> Verdict:
        """Admit or refuse; `planned_rejection` is the plan's ("itl": no path met the ITL
        SLO); `idle_ttft_s` the TTFT predicted on an idle instance. Counts the choice and its
        predictions."""
        m = self.metrics
        m.predicted_ttft.observe(predicted_ttft_s)
        if predicted_itl_s is not None:
            m.predicted_itl.observe(predicted_itl_s)
        reason = planned_rejection
        if self.slo_ttft_s is None:
            reason = ""
        elif predicted_ttft_s > self.slo_ttft_s >= idle_ttft_s:
            reason = "ttft"
        if not reason:
            m.paths.labels(path).inc()
            if self.slo_ttft_s is not None and predicted_ttft_s > self.slo_ttft_s:
                m.slo_unattainable.labels("ttft").inc()
            if (self.slo_itl_s is not None and predicted_itl_s is not None
                    and predicted_itl_s > self.slo_itl_s):
                m.slo_unattainable.labels("itl").inc()
            return Verdict(True, predicted_ttft_s)
        m.paths.labels("rejected").inc()
        # The queue ahead drains in roughly the excess over the SLO: come back then.
        excess = predicted_ttft_s - (self.slo_ttft_s or 0.0)
        retry = max(1, math.ceil(excess)) if reason == "ttft" else 1
        m.rejections.labels("slo" if reason == "ttft" else "slo_itl").inc()
        self.recent.append(Outcome(time.time(), instance, path, predicted_ttft_s, None, False,
                                   predicted_itl_s))
        return Verdict(False, predicted_ttft_s, retry, reason)

    def record(self, instance: str, predicted_ttft_s: float, observed_ttft_s: float,
               path: str = "", predicted_itl_s: float | None = None) -> Outcome:
        """An admitted request's first token; returns its outcome (record_itl completes it)."""
        self.metrics.prediction_error.observe(observed_ttft_s - predicted_ttft_s)
        if self.slo_ttft_s is not None:
            self.metrics.slo.labels(str(observed_ttft_s <= self.slo_ttft_s).lower()).inc()
        outcome = Outcome(time.time(), instance, path, predicted_ttft_s, observed_ttft_s, True,
                          predicted_itl_s)
        self.recent.append(outcome)
        return outcome

    def record_itl(self, outcome: Outcome, observed_itl_s: float) -> None:
        outcome.observed_itl_s = observed_itl_s
        m = self.metrics
        m.itl.observe(observed_itl_s)
        if outcome.predicted_itl_s is not None:
            m.itl_prediction_error.observe(observed_itl_s - outcome.predicted_itl_s)
        if self.slo_itl_s is not None:
            m.itl_slo.labels(str(observed_itl_s <= self.slo_itl_s).lower()).inc()

    def report(self) -> dict[str, Any]:
        recent = list(self.recent)
        paths: dict[str, int] = {}
        for o in recent:
            key = o.path if o.admitted else "rejected"
            paths[key] = paths.get(key, 0) + 1
        return {
            "slo_ttft_s": self.slo_ttft_s,
            "slo_itl_s": self.slo_itl_s,
            "admitted": sum(o.admitted for o in recent),
            "rejected": sum(not o.admitted for o in recent),
            "paths": paths,
            "mean_abs_error_s": _mean_abs([(o.predicted_ttft_s, o.observed_ttft_s)
                                           for o in recent]),
            "itl_mean_abs_error_s": _mean_abs([(o.predicted_itl_s, o.observed_itl_s)
                                               for o in recent]),
            "recent": [asdict(o) for o in recent[-200:]],
        }
