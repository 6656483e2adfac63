"""`python -m mooncake_vllm.bench serve` end to end, small: the single instance and our P/D
stack (etcd, two `vllm serve` with the connector, the conductor with pipelining and the prefill
window) serve every request, and the JSON and the PNG plot are written. Timing bars are the
benchmark's to print, not this test's to assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.etcd, pytest.mark.timeout(900)]


def test_serve_bench_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "mooncake_vllm.bench", "serve", "--json", "--out", str(out),
         "--systems", "single,mooncake_vllm", "--scenarios", "prompt_1,concurrent8_500",
         "--repeats", "4", "--output-len", "4", "--rates", "4", "--sweep-requests", "6",
         "--prompt-min", "64", "--prompt-max", "600", "--output-max", "8"],
        capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((out / "serve.json").read_text())
    systems = result["systems"]
    assert set(systems) == {"single", "mooncake_vllm", "mooncake_vllm_always_pd"}
    for name, data in systems.items():
        assert set(data["scenarios"]) == {"prompt_1", "concurrent8_500"}, name
        for scen, s in data["scenarios"].items():
            assert s["failed"] == 0 and s["requests"] > 0, (name, scen, s)
            assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"], (name, scen, s)
        (point,) = data["sweep"]
        assert point["rate"] == 4 and point["failed"] == 0 and point["requests"] == 6, point
    for name in ("mooncake_vllm", "mooncake_vllm_always_pd"):
        verdict = result["criteria"][name]
        assert set(verdict) == {"prompt_1", "concurrent8_500"}
        assert all(isinstance(v["met"], bool) for v in verdict.values())
    assert "--prefill-window-tokens" in result["conductor"]["mooncake_vllm"]
    png = Path(result["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
