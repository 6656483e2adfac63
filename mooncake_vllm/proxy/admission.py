"""Early rejection: refuse at once what would miss the TTFT SLO, and keep score of how well the
predictions matched what happened.

The prediction comes from the routing choice (queued prefill work plus the request's uncached
tokens, through the chosen instance's fitted TTFT model, see ttft_model.py). Every admitted
request's observed TTFT is paired with its prediction: the pairs go to Prometheus
(`mooncake_proxy_ttft_prediction_error_seconds`, `mooncake_proxy_slo_outcomes`) and the most
recent ones to `GET /admission` as JSON.
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


@dataclass(frozen=True)
class Outcome:
    at: float
    instance: str
    predicted_ttft_s: float
    observed_ttft_s: float | None  # None: rejected, or failed before a first token
    admitted: bool


class Admission:
    def __init__(self, slo_ttft_s: float | None, metrics: ProxyMetrics, keep: int = 1000) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.metrics = metrics
        self.recent: deque[Outcome] = deque(maxlen=keep)

    def judge(self, instance: str, predicted_ttft_s: float) -> Verdict:
        self.metrics.predicted_ttft.observe(predicted_ttft_s)
        if self.slo_ttft_s is None or predicted_ttft_s <= self.slo_ttft_s:
            return Verdict(True, predicted_ttft_s)
        # The queue ahead drains in roughly the excess over the SLO: come back then.
        retry = max(1, math.ceil(predicted_ttft_s - self.slo_ttft_s))
        self.metrics.rejections.labels("slo").inc()
        self.recent.append(Outcome(time.time(), instance, predicted_ttft_s, None, False))
        return Verdict(False, predicted_ttft_s, retry)

    def record(self, instance: str, predicted_ttft_s: float, observed_ttft_s: float) -> None:
        self.metrics.prediction_error.observe(observed_ttft_s - predicted_ttft_s)
        if self.slo_ttft_s is not None:
            self.metrics.slo.labels(str(observed_ttft_s <= self.slo_ttft_s).lower()).inc()
        self.recent.append(Outcome(time.time(), instance, predicted_ttft_s, observed_ttft_s, True))

    def report(self) -> dict[str, Any]:
        done = [o for o in self.recent if o.observed_ttft_s is not None]
        errors = [o.observed_ttft_s - o.predicted_ttft_s for o in done  # type: ignore[operator]
                  if o.observed_ttft_s is not None]
        return {
            "slo_ttft_s": self.slo_ttft_s,
            "admitted": sum(o.admitted for o in self.recent),
            "rejected": sum(not o.admitted for o in self.recent),
            "mean_abs_error_s": (sum(map(abs, errors)) / len(errors)) if errors else None,
            "recent": [asdict(o) for o in list(self.recent)[-200:]],
        }
