"""`python -m mooncake_vllm.bench serve --json` end to end, small: the single instance and our
P/D pair (two `vllm serve` with the connector in cpusets of their own, conductors in turn)
serve every request; the SLOs are derived and printed before the sweep; the run is kept
in the results folder with its host; every bar of the issue has a verdict; the PNG is written.
Timing bars are the benchmark's to print, not this test's to assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_serve_bench_keeps_json_and_plot(tmp_path: Path) -> None:
    kept = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "mooncake_vllm.bench", "serve", "--quick", "--json",
         "--out", str(tmp_path / "run"), "--results-dir", str(kept), "--note", "test",
         "--systems", "single,mooncake_vllm", "--scenarios", "prompt_1,concurrent8_500",
         "--rates", "4", "--sweep-requests", "6", "--slo-probe-requests", "4",
         "--prompt-max", "600", "--output-max", "8"],
        capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(proc.stdout)
    (path,) = kept.glob("serve-*.json")
    record = json.loads(path.read_text())
    assert record["result"] == result and record["note"] == "test"
    assert record["host"]["cpus"] >= 2 and record["host"]["git_commit"]

    slos = result["slos"]
    assert slos["ttft_s"] > 0 and slos["itl_s"] > 0 and "p90" in slos["rule"]
    err = proc.stderr
    assert err.index("SLOs: TTFT") < err.index("single rate 4/s")  # fixed before the sweep

    systems = result["systems"]
    assert set(systems) == {"single", "mooncake_vllm", "mooncake_vllm_always_pd"}
    for name, data in systems.items():
        assert set(data["scenarios"]) == {"prompt_1", "concurrent8_500"}, name
        for scen, s in data["scenarios"].items():
            assert s["failed"] == 0 and s["requests"] > 0, (name, scen, s)
            assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"], (name, scen, s)
            # Our conductors say what they planned for every request; vLLM alone has no plan.
            if name == "single":
                assert "paths" not in s
            else:
                assert sum(s["paths"].values()) == s["requests"], (name, scen, s)
            if name == "mooncake_vllm_always_pd":
                assert set(s["paths"]) == {"disaggregated"}, s
        (point,) = data["sweep"]
        assert point["rate"] == 4 and point["failed"] == 0 and point["requests"] == 6, point
        assert 0 <= point["met_slos"] <= 6 and point["goodput_rps"] >= 0, point
        load = data["host_load"]  # what others used of the machine meanwhile
        assert load["window_s"] > 0 and min(load["foreign_cpu_share"], load["steal_share"]) >= 0
    confinement = result["confinement"]
    assert confinement["single"]["single"].startswith("cores 0,1 by "), confinement
    ours = confinement["mooncake_vllm"]
    assert ours["prefill"].startswith("cores 0 by ") and ours["decode"].startswith("cores 1 by ")
    assert ours["conductor"].startswith("cores 0,1 by "), confinement
    # Fixed scenarios: ours with no flag at all (no SLO, so no refusal), as for every system;
    # the sweep with the SLOs.
    flags = result["conductor_flags"]
    assert flags["mooncake_vllm"]["scenarios"] == []
    assert flags["mooncake_vllm"]["sweep"][:2] == ["--slo-ttft-s", f"{slos['ttft_s']:g}"]
    for part in ("scenarios", "sweep"):
        assert "--local-prefill-max-tokens" in flags["mooncake_vllm_always_pd"][part]
    for name in ("mooncake_vllm", "mooncake_vllm_always_pd"):
        assert all(s["rejected"] == 0 for s in systems[name]["scenarios"].values())

    # 3 TTFT bars, 3 below the built-in, 2 goodput bars, the ITL bar read two ways
    assert len(result["verdicts"]) == 10
    assert {v["verdict"] for v in result["verdicts"]} <= {"pass", "miss", "not measured"}
    builtin = [v for v in result["verdicts"] if "built-in" in v["bar"]]
    assert {v["verdict"] for v in builtin} == {"not measured"}  # not run here
    assert "bars (issue 12):" in err and "NOT MEASURED" in err

    png = path.with_suffix(".png")
    assert result["plot"] == png.name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
