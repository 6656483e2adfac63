"""A straight line y = a + b x fitted online by weighted least squares with exponential
forgetting: the shared core of the conductor's speed models (ttft_model.py, decode_load.py).

Only the weighted sums are kept, so an observation costs O(1) and memory is constant. Each new
observation first multiplies the old weights by `forget`, so the fit follows an instance whose
speed changes; priors are entered as weighted pseudo-observations by the models themselves.
"""

from __future__ import annotations


class ForgettingLine:
    def __init__(self, forget: float) -> None:
        self.forget = forget
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def add(self, x: float, y: float, weight: float = 1.0) -> None:
        """One point, without forgetting (for priors)."""
        self._w += weight
        self._sx += weight * x
        self._sy += weight * y
        self._sxx += weight * x * x
        self._sxy += weight * x * y

    def observe(self, x: float, y: float, count: int = 1) -> None:
        """`count` observations of the same point, each of weight 1 after the older ones have
        faded by `forget`: exactly as many calls would leave it, in O(1)."""
        f = self.forget
        fade = f ** count
        self._w, self._sx, self._sy = self._w * fade, self._sx * fade, self._sy * fade
        self._sxx, self._sxy = self._sxx * fade, self._sxy * fade
        self.add(x, y, float(count) if f == 1.0 else (1.0 - fade) / (1.0 - f))

    def moments(self) -> tuple[float, float, float, float]:
        """(mean x, mean y, variance of x, covariance of x and y); needs a point first."""
        mean_x, mean_y = self._sx / self._w, self._sy / self._w
        return (mean_x, mean_y, self._sxx / self._w - mean_x * mean_x,
                self._sxy / self._w - mean_x * mean_y)
