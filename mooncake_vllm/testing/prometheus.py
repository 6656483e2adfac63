"""Reading a server's Prometheus `/metrics` from the demo and the benchmarks: every sample, and
the conductor's requests by the path it planned, so that a run can say what the conductor did."""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request


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
