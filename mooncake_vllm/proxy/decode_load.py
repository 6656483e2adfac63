"""The decode load a request meets: inter-token latency (ITL) on a decode instance as a function
of its batch and of the prefill tokens it computes in the same steps.

A decode step's time grows with the running batch, and a step that also prefills takes that
prefill's time on top: vLLM puts a prefill's tokens into the steps of the running decodes, so
every running request waits for it. So

    ITL(batch, prefill_tokens) = base(batch) + prefill_tokens x seconds_per_prefill_token

where base is a line fitted online (exponential forgetting, a prior as pseudo-observations) to
the gaps between chunks the conductor relays from the instance while it has no prefill of ours
to compute, and seconds_per_prefill_token comes from the instance's own TTFT model. A local or
pipelined prefill on D is thus charged to D's running decodes; a request that only decodes
there adds one to the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .online_fit import ForgettingLine


@dataclass
class ItlModel:
    prior_base_s: float = 0.02  # one decode step of a lone request
    prior_per_request_s: float = 0.001  # what each more running request adds to a step
    forget: float = 0.99  # weight kept by old gaps per new one (gaps come many per request)
    prior_weight: float = 5.0

    def __post_init__(self) -> None:
        self._line = ForgettingLine(self.forget)
        self.observations = 0
        for batch in (1.0, 33.0):
            self._line.add(batch, self.prior_base_s + (batch - 1) * self.prior_per_request_s,
                           self.prior_weight)

    def observe(self, batch: float, gap_s: float, count: int = 1) -> None:
        """`count` gaps of `gap_s` between token events relayed from the instance while
        `batch` requests ran."""
        if batch < 1 or not 0 <= gap_s < 60 or count < 1:
            return
        self._line.observe(float(batch), float(gap_s), count)
        self.observations += count

    def base(self, batch: float) -> float:
        """Predicted ITL with `batch` requests decoding and no prefill in their steps."""
        mean_x, mean_y, var_x, cov = self._line.moments()
        slope = cov / var_x if var_x > 1e-9 else 0.0
        slope = max(slope, 0.0)
        return max(mean_y + slope * (max(batch, 1.0) - mean_x), 0.0)

    def predict(self, batch: float, prefill_tokens: float, seconds_per_token: float) -> float:
        return self.base(batch) + max(prefill_tokens, 0.0) * max(seconds_per_token, 0.0)
