"""Connector statistics, carried by vLLM from the workers to its logger and Prometheus.

Counters add up; per-transfer times are kept as lists for one logging interval and then
summarised (vLLM aggregates the per-worker objects with `aggregate` and resets them).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from mooncake_vllm.connector.metric_names import (
    COUNTERS,
    SERIES,
    counter_name,
    histogram_name,
)

# Benchmark hook, not a setting (bench/layerwise.py sets it in a prefill instance's
# environment): after each overlapped transfer, P sends the same bytes again, all posted
# after the forward pass and before telling D "done" (so D's blocks are not in use yet), and
# reports how long that took as non_overlapped_s.
NON_OVERLAPPED_ENV = "MOONCAKE_VLLM_BENCH_NON_OVERLAPPED"


def measuring_non_overlapped() -> bool:
    return os.environ.get(NON_OVERLAPPED_ENV, "") == "1"


def _empty() -> dict[str, Any]:
    return {**{k: 0 for k in COUNTERS}, **{k: [] for k in SERIES}}


@dataclass
class MooncakeStats(KVConnectorStats):
    def __post_init__(self) -> None:
        base = _empty()
        base.update(self.data or {})
        self.data = base

    def reset(self) -> None:
        self.data = _empty()

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.data[k] += v

    def observe(self, key: str, value: float) -> None:
        self.data[key].append(float(value))

    def aggregate(self, other: KVConnectorStats) -> MooncakeStats:
        if not other.is_empty():
            for k in COUNTERS:
                self.data[k] += other.data.get(k, 0)
            for k in SERIES:
                self.data[k] = self.data[k] + list(other.data.get(k, []))
        return self

    def take(self) -> MooncakeStats | None:
        """A snapshot for vLLM, leaving this object empty; None when nothing happened."""
        if self.is_empty():
            return None
        snap = MooncakeStats(data=copy.deepcopy(self.data))
        self.reset()
        return snap

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data[k] for k in COUNTERS}
        for k in SERIES:
            xs = self.data[k]
            if xs:
                out[f"avg_{k}"] = round(sum(xs) / len(xs), 6)
                out[f"max_{k}"] = round(max(xs), 6)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS + SERIES)


_TIME_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class MooncakePromMetrics(KVConnectorPromMetrics):
    """`vllm:mooncake_*` series, one set per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            k: self._per_engine(self._counter_cls(
                name=counter_name(k), documentation=f"MooncakeVllmConnector: {k}",
                labelnames=labelnames))
            for k in COUNTERS
        }
        docs = {
            "transfer_s": "first write posted to last write complete, per request",
            "exposed_s": "end of the prefill forward pass to decode holding every layer",
            "non_overlapped_s": "the same bytes sent after the forward pass (benchmark mode)",
            "pool_lookup_s": "a prompt's KV pool lookup, from asking to every owner's answer",
            "pool_read_s": "reading a request's entries from the KV pool into the buffer",
        }
        self.histograms = {
            k: self._per_engine(self._histogram_cls(
                name=histogram_name(k),
                documentation=f"MooncakeVllmConnector: {docs[k]}",
                buckets=_TIME_BUCKETS, labelnames=labelnames))
            for k in SERIES
        }

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k in COUNTERS:
            v = transfer_stats_data.get(k, 0)
            if v:
                self.counters[k][engine_idx].inc(v)
        for k in SERIES:
            for x in transfer_stats_data.get(k, []):
                self.histograms[k][engine_idx].observe(x)
