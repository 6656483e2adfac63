"""Path shares over the last minutes: the gauge and the log line when they change."""

from __future__ import annotations

from mooncake_vllm.proxy.metrics import ProxyMetrics
from mooncake_vllm.proxy.path_shares import PathShares


def _gauge(metrics: ProxyMetrics, path: str) -> float:
    return metrics.registry.get_sample_value("mooncake_proxy_path_share", {"path": path})


def test_shares_cover_the_window_and_the_log_line_comes_when_they_change() -> None:
    now = [0.0]
    metrics = ProxyMetrics()
    shares = PathShares(metrics, window_s=300, clock=lambda: now[0])
    for path in ("disaggregated", "disaggregated", "pipelined", "rejected"):
        shares.count(path)
    assert _gauge(metrics, "disaggregated") == 0.5 and _gauge(metrics, "rejected") == 0.25
    line = shares.summary_if_changed()
    assert line == ("requests over the last 5 min by path: disaggregated 50%, pipelined 25%, "
                    "rejected 25% (4 requests)")
    assert shares.summary_if_changed() is None  # unchanged: not logged again
    now[0] = 200.0
    shares.count("local")  # a prefill instance went away: D prefills everything now
    now[0] = 301.0  # the first four left the window
    assert shares.summary_if_changed() == ("requests over the last 5 min by path: local 100% "
                                           "(1 requests)")
    assert _gauge(metrics, "disaggregated") == 0.0 and _gauge(metrics, "local") == 1.0
