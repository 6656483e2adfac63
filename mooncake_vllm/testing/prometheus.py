"""Reading a server's Prometheus `/metrics` from the demo and the benchmarks: every sample, and
the conductor's requests by the path it planned, so that a run can say what the conductor did;
and its `/admission` view: how its predictions compared with what requests then saw."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import urllib.error
import urllib.request
from typing import Any


def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Prometheus text from `url`/metrics: each sample (name with its labels) and its value."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[sample] = float(value)
    return out


PATH_SAMPLE = re.compile(r'^mooncake_proxy_path_decisions_total\{path="([^"]+)"\}$')


def path_counts(conductor_url: str) -> dict[str, float]:
    """The conductor's requests so far by the path it planned (disaggregated, local, ...,
    rejected); empty for a server that is no conductor of ours."""
    try:
        samples = scrape(conductor_url)
    except (OSError, urllib.error.URLError):
        return {}
    counts = {}
    for sample, value in samples.items():
        m = PATH_SAMPLE.match(sample)
        if m:
            counts[m[1]] = value
    return counts


def paths_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Requests per path planned between two `path_counts` readings."""
    return {p: int(v - before.get(p, 0.0)) for p, v in sorted(after.items())
            if v > before.get(p, 0.0)}


def chosen_path(before: dict[str, float], after: dict[str, float]) -> str:
    """The path of the one request planned between two readings ("a+b" if several)."""
    return "+".join(paths_between(before, after)) or "?"


def learned_speeds(conductor_url: str) -> dict[str, Any]:
    """What the conductor has learned of its instances (`/instances`): per instance its TTFT
    line and decode step, and the measured handoff per P-D pair. Empty for a server that is no
    conductor of ours."""
    try:
        with urllib.request.urlopen(f"{conductor_url}/instances", timeout=10.0) as resp:
            view = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    keys = ("role", "ttft_overhead_s", "ttft_tokens_per_s", "itl_base_s")
    return {"instances": {i["instance_id"]: {k: i.get(k) for k in keys}
                          for i in view.get("instances", [])},
            "handoff_s": view.get("handoff_s", {})}


def prediction_accuracy(conductor_url: str, since: float) -> dict[str, Any]:
    """The conductor's TTFT predictions for requests decided after `since` (its clock, Unix
    time): for admitted ones, observed minus predicted (p50, p90); for rejected ones, what was
    predicted (p50) against the TTFT SLO. Empty for a server that is no conductor of ours."""
    try:
        with urllib.request.urlopen(f"{conductor_url}/admission", timeout=10.0) as resp:
            report = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    recent = [o for o in report.get("recent", []) if o.get("at", 0) >= since]
    errors = sorted(o["observed_ttft_s"] - o["predicted_ttft_s"] for o in recent
                    if o.get("admitted") and o.get("observed_ttft_s") is not None)
    refused = sorted(o["predicted_ttft_s"] for o in recent if not o.get("admitted"))
    out: dict[str, Any] = {"slo_ttft_s": report.get("slo_ttft_s")}
    if errors:
        out["ttft_error_p50_s"] = statistics.median(errors)
        out["ttft_error_p90_s"] = errors[int(0.9 * (len(errors) - 1))]
    if refused:
        out["rejected_predicted_ttft_p50_s"] = statistics.median(refused)
    return out
