"""Per-instance TTFT model: seconds = overhead + tokens_to_prefill / rate, fitted online.

`tokens_to_prefill` is the prefill work queued on the instance when the request was sent plus
the request's own uncached tokens; the observed TTFT is what the client saw. A least-squares
fit with exponential forgetting follows an instance whose speed changes (load from elsewhere,
other prompt lengths), and a prior, entered as pseudo-observations, answers before the
instance has shown anything and keeps the fit sane while every observation has one size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TtftModel:
    prior_overhead_s: float = 0.05
    prior_tokens_per_s: float = 2000.0
    forget: float = 0.97  # weight kept by old observations per new one (~30-sample memory)
    prior_weight: float = 2.0

    def __post_init__(self) -> None:
        # Sufficient statistics of a weighted linear regression y = a + b x.
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.observations = 0
        # Prior: two pseudo-points on the prior line, at 0 and at 1000 tokens.
        for x in (0.0, 1000.0):
            self._add(x, self.prior_overhead_s + x / self.prior_tokens_per_s, self.prior_weight)

    def _add(self, x: float, y: float, w: float) -> None:
        self._w += w
        self._sx += w * x
        self._sy += w * y
        self._sxx += w * x * x
        self._sxy += w * x * y

    def observe(self, tokens: float, ttft_s: float) -> None:
        if tokens < 0 or not ttft_s >= 0:
            return
        f = self.forget
        self._w, self._sx, self._sy = self._w * f, self._sx * f, self._sy * f
        self._sxx, self._sxy = self._sxx * f, self._sxy * f
        self._add(float(tokens), float(ttft_s), 1.0)
        self.observations += 1

    def coefficients(self) -> tuple[float, float]:
        """(overhead_s, seconds_per_token), both kept non-negative."""
        mean_x, mean_y = self._sx / self._w, self._sy / self._w
        var_x = self._sxx / self._w - mean_x * mean_x
        if var_x < 1.0:  # all observations of one size: the slope is unknown
            slope = 1.0 / self.prior_tokens_per_s
        else:
            slope = (self._sxy / self._w - mean_x * mean_y) / var_x
        # A few noisy timings (a loaded host) can fit a flat or falling line, which would make
        # every prompt look free to prefill: the rate is held within 10x of the prior's.
        slope = max(slope, 0.1 / self.prior_tokens_per_s)
        return max(mean_y - slope * mean_x, 0.0), slope

    def predict(self, tokens: float) -> float:
        a, b = self.coefficients()
        return a + b * max(tokens, 0.0)
