"""Per-instance TTFT model: seconds = overhead + tokens_to_prefill / rate, fitted online.

`tokens_to_prefill` is the prefill work queued on the instance when the request was sent plus
the request's own uncached tokens; the observed TTFT is what the client saw. A least-squares
fit with exponential forgetting follows an instance whose speed changes (load from elsewhere,
other prompt lengths), and a prior, entered as pseudo-observations, answers before the
instance has shown anything and keeps the fit sane while every observation has one size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .online_fit import ForgettingLine


@dataclass
class TtftModel:
    prior_overhead_s: float = 0.05
    prior_tokens_per_s: float = 2000.0
    forget: float = 0.97  # weight kept by old observations per new one (~30-sample memory)
    prior_weight: float = 2.0

    def __post_init__(self) -> None:
        self._line = ForgettingLine(self.forget)
        self.observations = 0
        # Prior: two pseudo-points on the prior line, at 0 and at 1000 tokens.
        for x in (0.0, 1000.0):
            self._line.add(x, self.prior_overhead_s + x / self.prior_tokens_per_s,
                           self.prior_weight)

    def observe(self, tokens: float, ttft_s: float) -> None:
        if tokens < 0 or not ttft_s >= 0:
            return
        self._line.observe(float(tokens), float(ttft_s))
        self.observations += 1

    def coefficients(self) -> tuple[float, float]:
        """(overhead_s, seconds_per_token), both kept non-negative."""
        mean_x, mean_y, var_x, cov = self._line.moments()
        # All observations of one size: the slope is unknown, the prior's stands.
        slope = 1.0 / self.prior_tokens_per_s if var_x < 1.0 else cov / var_x
        # A few noisy timings (a loaded host) can fit a flat or falling line, which would make
        # every prompt look free to prefill: the rate is held within 10x of the prior's.
        slope = max(slope, 0.1 / self.prior_tokens_per_s)
        return max(mean_y - slope * mean_x, 0.0), slope

    def predict(self, tokens: float) -> float:
        a, b = self.coefficients()
        return a + b * max(tokens, 0.0)
