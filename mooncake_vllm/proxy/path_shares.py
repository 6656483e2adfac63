"""How requests were served over the last minutes: no silent fallback.

Every request the conductor finishes is counted once under how it ended: the path that
served it (disaggregated, pipelined, local, alone), or rejected (early rejection), failed
(every attempt failed upstream) or unavailable (no instance could take it). The share of
each over the last WINDOW_S is the gauge `mooncake_proxy_path_share{path}`, and the
conductor logs the shares every LOG_INTERVAL_S when they changed, so that a deployment that
quietly stopped disaggregating (a prefill instance gone, a misconfigured pair) says so in its
log as well as its metrics. (The instances count their side: `vllm:mooncake_remote_prefills`,
`..._pipelined_prefills`, `..._failed_loads_{recomputed,failed}`.)
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

from .metrics import ProxyMetrics

WINDOW_S = 300.0
LOG_INTERVAL_S = 60.0


class PathShares:
    def __init__(self, metrics: ProxyMetrics, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics, self.window_s, self.clock = metrics, window_s, clock
        self._seen: deque[tuple[float, str]] = deque()
        self._counts: Counter[str] = Counter()
        self._logged = ""

    def count(self, path: str) -> None:
        self._seen.append((self.clock(), path))
        self._counts[path] += 1
        self.update()

    def update(self) -> dict[str, float]:
        """Drop what left the window; set the gauges; the shares by path."""
        horizon = self.clock() - self.window_s
        while self._seen and self._seen[0][0] < horizon:
            _, path = self._seen.popleft()
            self._counts[path] -= 1
        total = len(self._seen)
        shares = {p: (n / total if total else 0.0) for p, n in self._counts.items()}
        for path, share in shares.items():
            self.metrics.path_share.labels(path).set(share)
        return {p: s for p, s in shares.items() if s > 0}

    def summary_if_changed(self) -> str | None:
        """A log line of the shares (whole percents) when they differ from the last one."""
        shares = self.update()
        text = ", ".join(f"{p} {round(100 * s)}%" for p, s in
                         sorted(shares.items(), key=lambda kv: -kv[1]))
        line = (f"requests over the last {self.window_s / 60:g} min by path: "
                f"{text or 'none'} ({len(self._seen)} requests)")
        key = text or "none"
        if key == self._logged:
            return None
        self._logged = key
        return line
