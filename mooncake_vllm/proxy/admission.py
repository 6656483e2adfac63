"""Early rejection against the two SLOs, and the score of how well predictions matched.

The plan (planner.py) predicts each request's TTFT and ITL on the path it takes; with a TTFT
SLO (admission on) a request predicted to miss it, or whose every path misses the ITL SLO, is
refused at once with 503 and Retry-After, when load is the cause: one that would miss on idle
instances too is admitted and counted (`mooncake_proxy_slo_unattainable`), since no retry
would meet the SLO.

A predicted miss is trusted only while the SLO is being missed. Refusals need evidence: more
than one in ten of the last `EVIDENCE` admitted requests seen within `EVIDENCE_SLOS` TTFT SLOs
of now missed that SLO (TTFT; or a stream's ITL); for TTFT, counting those that met a queue
and could meet the SLO on idle instances, for ITL, streams during which no prefill of ours
ran on their decode instance. While the instances keep up, a predicted miss is a
burst they absorb or an error of the prediction, and serving it costs the requests behind it
little, where a refusal would lose it for certain. Under sustained overload the misses come,
and from then on what is predicted to miss is refused, until the admitted requests meet the
SLO again.

Every admitted request's observed TTFT, and for a stream its observed ITL (the mean gap
between relayed token events), is paired with its prediction: the pairs go to Prometheus
(`mooncake_proxy_{ttft,itl}_prediction_error_seconds`, `mooncake_proxy_slo_outcomes`,
`mooncake_proxy_itl_slo_outcomes`) and the most recent ones to `GET /admission` as JSON.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from .metrics import ProxyMetrics

EVIDENCE = 20  # recent admitted requests whose outcomes say whether the SLO is being missed
EVIDENCE_SLOS = 10.0  # ... seen within this many TTFT SLOs (at least a second) of now
MISSING = 0.1  # the share of misses among them from which predicted misses are refused


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
        # Of the last EVIDENCE admitted requests: when each one's TTFT (and stream ITL) was
        # seen (monotonic) and whether it met the SLO.
        self._ttft_met: deque[tuple[float, bool]] = deque(maxlen=EVIDENCE)
        self._itl_met: deque[tuple[float, bool]] = deque(maxlen=EVIDENCE)
        self.evidence_s = max(1.0, EVIDENCE_SLOS * (slo_ttft_s or 0.0))

    def missing(self, slo: str) -> bool:
        """Whether recent admitted requests miss the `slo` ("ttft" or "itl") often enough
        that a predicted miss is believed."""
        since = time.monotonic() - self.evidence_s
        met = [m for at, m in (self._ttft_met if slo == "ttft" else self._itl_met) if at >= since]
        return bool(met) and met.count(False) > MISSING * len(met)

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
        if reason and not self.missing(reason):
            # Load predicts a miss, but the admitted requests are meeting this SLO: served.
            m.paths.labels(path).inc()
            m.unproven_misses.labels(reason).inc()
            return Verdict(True, predicted_ttft_s)
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
               path: str = "", predicted_itl_s: float | None = None,
               idle_ttft_s: float = 0.0) -> Outcome:
        """An admitted request's first token; returns its outcome (record_itl completes it).
        `idle_ttft_s`: its TTFT predicted on idle instances. Evidence of whether load makes
        requests miss comes only from requests that met a queue (predicted above idle) and
        could meet the SLO on idle instances."""
        self.metrics.prediction_error.observe(observed_ttft_s - predicted_ttft_s)
        if self.slo_ttft_s is not None:
            met = observed_ttft_s <= self.slo_ttft_s
            if idle_ttft_s <= self.slo_ttft_s and predicted_ttft_s > idle_ttft_s + 1e-3:
                self._ttft_met.append((time.monotonic(), met))
            self.metrics.slo.labels(str(met).lower()).inc()
        outcome = Outcome(time.time(), instance, path, predicted_ttft_s, observed_ttft_s, True,
                          predicted_itl_s)
        self.recent.append(outcome)
        return outcome

    def record_itl(self, outcome: Outcome, observed_itl_s: float,
                   decode_only: bool = True) -> None:
        """A stream's mean ITL. `decode_only`: no prefill of ours ran on its decode instance
        while it streamed; only such streams are evidence that decode load misses the ITL
        SLO (a refusal does not relieve what prefills on D cost, the plan does)."""
        outcome.observed_itl_s = observed_itl_s
        m = self.metrics
        m.itl.observe(observed_itl_s)
        if outcome.predicted_itl_s is not None:
            m.itl_prediction_error.observe(observed_itl_s - outcome.predicted_itl_s)
        if self.slo_itl_s is not None:
            met = observed_itl_s <= self.slo_itl_s
            if decode_only:
                self._itl_met.append((time.monotonic(), met))
            m.itl_slo.labels(str(met).lower()).inc()

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
            "refusing_for": [slo for slo in ("ttft", "itl") if self.missing(slo)],
            "paths": paths,
            "mean_abs_error_s": _mean_abs([(o.predicted_ttft_s, o.observed_ttft_s)
                                           for o in recent]),
            "itl_mean_abs_error_s": _mean_abs([(o.predicted_itl_s, o.observed_itl_s)
                                               for o in recent]),
            "recent": [asdict(o) for o in recent[-200:]],
        }
