"""`python -m mooncake_vllm.bench serve [--quick] [--json]`: goodput of disaggregated serving
against one vLLM instance on the same two cores (float32, the tiny model unless `--model`).

Systems: see `serve_systems.py` (single on both cores, single on one core as a reference,
ours with its defaults, ours always disaggregating, vLLM's built-in MooncakeConnector).

1. SLOs, fixed before anything is measured, by the rule in `goodput.py` (unloaded requests of
   the sweep's mix on the single two-core instance), and printed.
2. Fixed scenarios per system, each on the same random token-id prompts: `prompt_1900` and
   `prompt_1` (one request at a time), `concurrent8_500` (rounds of 8 requests of 500 tokens
   sent at once); TTFT p50 against the single two-core instance's.
3. The goodput sweep: at each `--rates` value, `--sweep-requests` Poisson arrivals with prompt
   lengths uniform in [`--prompt-min`, `--prompt-max`] and output lengths uniform in
   [`--output-min`, `--output-max`]; per rate: SLO attainment, goodput, rejected fraction,
   TTFT / ITL / TPOT p50 and p99.
4. The issue's bars, each with a verdict (`verdicts.py`); a PNG of goodput and ITL p99 against
   the request rate.
`--quick` is a short run for development; the full run is the default. With `--json` the run
is printed and kept (JSON and PNG) in the results folder (`results.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mooncake_vllm.bench import results, verdicts
from mooncake_vllm.bench.goodput import Slos, derive_slos, goodput
from mooncake_vllm.bench.host_load import ForeignLoad, combined
from mooncake_vllm.bench.serve_report import plot, text_report
from mooncake_vllm.bench.serve_systems import (
    BOTH_CORES,
    DECODE_CORES,
    PREFILL_CORES,
    SYSTEMS,
    conductor_flags,
    start_conductor,
    start_system,
)
from mooncake_vllm.bench.workload import (
    PromptMaker,
    Request,
    fixed_scenario,
    mixed_requests,
    poisson_arrivals,
    run_scenario,
    summarise,
)
from mooncake_vllm.testing.prometheus import (
    learned_speeds,
    path_counts,
    paths_between,
    prediction_accuracy,
)
from mooncake_vllm.testing.startup import Progress
from mooncake_vllm.testing.vllm_server import reset_prefix_caches

SCENARIOS = ("prompt_1900", "prompt_1", "concurrent8_500")
PARTS = ("scenarios", "sweep")  # what a system is measured on: the fixed scenarios, the sweep
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"rates": [2.0, 4.0, 6.0, 8.0, 12.0, 16.0], "sweep_requests": 48, "repeats": 8,
             "slo_probe_requests": 16},
    "quick": {"rates": [2.0, 8.0], "sweep_requests": 12, "repeats": 3,
              "slo_probe_requests": 8},
}
WARM_UP_SEED, PROBE_SEED = 10_007, 20_011  # prompts never reused by the measured requests


# ---------------------------------------------------------------------------- measuring
async def _warm_up(url: str, model: str, make: PromptMaker, timeout_s: float) -> None:
    """Pay the engines' one-off first-request costs, and wait until the front door routes."""
    deadline = time.monotonic() + 60
    while True:
        outcomes, _ = await run_scenario(url, model, [Request(make(64), 4, math.nan)], timeout_s)
        if not outcomes[0].error:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up through {url} failed: {outcomes[0].error}")
        await asyncio.sleep(1.0)
    await run_scenario(url, model, fixed_scenario(make, 1900, 1, 4, False), timeout_s)
    await run_scenario(url, model, fixed_scenario(make, 500, 8, 4, True), timeout_s)


def sweep_requests(make: PromptMaker, args: argparse.Namespace, rate: float,
                   seed: int) -> list[Request]:
    offsets = poisson_arrivals(rate, args.sweep_requests, seed)
    return mixed_requests(make, offsets, (args.prompt_min, args.prompt_max),
                          (args.output_min, args.output_max), seed)


def derive_slos_on(url: str, model: str, args: argparse.Namespace,
                   pgids: set[int]) -> tuple[Slos, dict[str, Any]]:
    """The rule of `goodput.py`, on the single instance at `url` (already warmed up); with
    what others used of the machine meanwhile."""
    make = PromptMaker(args.vocab_size, PROBE_SEED)
    one_at_a_time = [math.nan] * args.slo_probe_requests
    probe = mixed_requests(make, one_at_a_time, (args.prompt_min, args.prompt_max),
                           (args.output_min, args.output_max), PROBE_SEED)
    window = ForeignLoad(pgids).start()
    outcomes, _ = asyncio.run(run_scenario(url, model, probe, args.request_timeout))
    load = window.stop()
    return derive_slos(outcomes, args.slo_ttft_factor, args.slo_itl_factor,
                       args.slo_ttft_s, args.slo_itl_s), load


def bench_url(url: str, model: str, args: argparse.Namespace, slos: Slos, progress: Progress,
              system: str, pgids: set[int], parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Every scenario and the sweep (`parts`: either alone) through `url`; every system gets
    the same prompts."""
    make = PromptMaker(args.vocab_size, args.seed)
    scenarios: dict[str, list[list[Request]]] = {  # rounds, one after the other
        "prompt_1900": [fixed_scenario(make, 1900, args.repeats, args.output_len, False)],
        "prompt_1": [fixed_scenario(make, 1, args.repeats, args.output_len, False)],
        "concurrent8_500": [fixed_scenario(make, 500, 8, args.output_len, True)
                            for _ in range(max(1, args.repeats // 4))],
    }
    sweep = [sweep_requests(make, args, rate, args.seed * 1000 + i)
             for i, rate in enumerate(args.rates)]
    asyncio.run(_warm_up(url, model, PromptMaker(args.vocab_size, WARM_UP_SEED),
                         args.request_timeout))
    # Systems run one after the other: what others used of the machine meanwhile shows
    # whether it was as quiet for one as for the others.
    window = ForeignLoad(pgids).start()
    result: dict[str, Any] = {"load_average_before": list(os.getloadavg()), "scenarios": {},
                              "sweep": []}
    for name, rounds in scenarios.items():
        if name not in args.scenarios or "scenarios" not in parts:
            continue
        outcomes, span, before, started = [], 0.0, path_counts(url), time.time()
        for batch in rounds:
            o, s = asyncio.run(run_scenario(url, model, batch, args.request_timeout))
            outcomes += o
            span += s
        result["scenarios"][name] = summarise(outcomes, span)
        _add_paths(result["scenarios"][name], before, url, started)
        progress.say(f"{system} {name}: {_brief(result['scenarios'][name])}")
    for rate, reqs in zip(args.rates, sweep, strict=True) if "sweep" in parts else ():
        before, started = path_counts(url), time.time()
        outcomes, span = asyncio.run(run_scenario(url, model, reqs, args.request_timeout))
        point = {"rate": rate, **summarise(outcomes, span), **goodput(outcomes, rate, slos)}
        _add_paths(point, before, url, started)
        result["sweep"].append(point)
        progress.say(f"{system} rate {rate:g}/s: goodput {point['goodput_rps']:.2f}/s, "
                     f"SLOs met {point['met_slos']}/{point['requests']}, {_brief(point)}")
    result["load_average_after"] = list(os.getloadavg())
    result["host_load"] = window.stop()
    learned = learned_speeds(url)
    if learned:  # what our conductor's predictions were made of, by the end
        result["learned"] = {"+".join(parts): learned}
    return result


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's results measured through several conductors, as one."""
    out: dict[str, Any] = {"load_average_before": parts[0]["load_average_before"],
                           "scenarios": {}, "sweep": [],
                           "load_average_after": parts[-1]["load_average_after"],
                           "host_load": combined(p["host_load"] for p in parts)}
    for p in parts:
        out["scenarios"].update(p["scenarios"])
        out["sweep"] += p["sweep"]
        out.setdefault("learned", {}).update(p.get("learned", {}))
    return out


def _add_paths(summary: dict[str, Any], before: dict[str, float], url: str,
               started: float) -> None:
    """Our conductor's planned paths for these requests, and how its TTFT predictions for
    them compared with what they saw (a system without a conductor of ours has neither)."""
    paths = paths_between(before, path_counts(url))
    if paths:
        summary["paths"] = paths
    accuracy = prediction_accuracy(url, started)
    if accuracy:
        summary["predictions"] = accuracy


def _brief(s: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        v = s.get(key)
        return f"{v * 1e3:.1f}ms" if isinstance(v, float) and math.isfinite(v) else "n/a"

    return (f"TTFT p50 {ms('ttft_p50_s')} p99 {ms('ttft_p99_s')}, ITL p50 {ms('itl_p50_s')} "
            f"p99 {ms('itl_p99_s')}, rejected {s['rejected']}, failed "
            f"{s['failed']}/{s['requests']}"
            + (f", paths {s['paths']}" if s.get("paths") else ""))


# ---------------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _subset(known: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; known: {', '.join(known)}")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench serve",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true",
                    help="print the run as JSON on stdout and keep it in the results folder")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short run: {PRESETS['quick']} (flags given win)")
    ap.add_argument("--model", default=None, help="default: the hub-free tiny Llama")
    ap.add_argument("--systems", type=_subset(SYSTEMS), default=list(SYSTEMS),
                    help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--scenarios", type=_subset(SCENARIOS), default=list(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    full = PRESETS["full"]
    ap.add_argument("--rates", type=_floats, default=None,
                    help=f"requests/s, comma-separated (default {full['rates']})")
    ap.add_argument("--sweep-requests", type=int, default=None,
                    help=f"requests per rate (default {full['sweep_requests']})")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"requests per fixed scenario (default {full['repeats']})")
    ap.add_argument("--slo-probe-requests", type=int, default=None,
                    help="unloaded requests the SLOs are derived from "
                    f"(default {full['slo_probe_requests']})")
    ap.add_argument("--slo-ttft-factor", type=float, default=3.0)
    ap.add_argument("--slo-itl-factor", type=float, default=3.0)
    ap.add_argument("--slo-ttft-s", type=float, default=None, help="fix the TTFT SLO by hand")
    ap.add_argument("--slo-itl-s", type=float, default=None, help="fix the ITL SLO by hand")
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=1024)
    ap.add_argument("--output-min", type=int, default=8)
    ap.add_argument("--output-max", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=8, help="in the fixed scenarios")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for logs, serve.json and serve.png")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    results.add_arguments(ap)
    args = ap.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("sweep_requests", "repeats", "slo_probe_requests", "prompt_min", "output_min"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.prompt_max < args.prompt_min or args.output_max < args.output_min:
        ap.error(f"empty length range: prompts {args.prompt_min}..{args.prompt_max}, "
                 f"outputs {args.output_min}..{args.output_max}")
    if "single" not in args.systems and (args.slo_ttft_s is None or args.slo_itl_s is None):
        ap.error("the SLOs are derived on the single instance: run 'single' or give both "
                 "--slo-ttft-s and --slo-itl-s")
    # single first: the SLOs come from it, and our conductor is started with them
    args.systems = sorted(args.systems, key=lambda n: n != "single")
    return args


def _run_systems(args: argparse.Namespace, model: str, out_dir: Path,
                 progress: Progress, record: dict[str, Any]
                 ) -> tuple[Slos, dict[str, Any]]:
    """Run every system; `record` gets how each process was kept on its cores
    (`confinement`) and what others used of the machine while the SLOs were derived."""
    systems: dict[str, Any] = {}
    slos: Slos | None = None
    if args.slo_ttft_s is not None and args.slo_itl_s is not None:
        slos = derive_slos([], 1.0, 1.0, args.slo_ttft_s, args.slo_itl_s)
    for name in args.systems:
        progress.say(f"starting {name}")
        workdir = out_dir / name
        workdir.mkdir(exist_ok=True)
        try:
            with start_system(name, model, workdir, progress, args.startup_timeout) as running:
                record["confinement"][name] = running.confinement
                if running.url is not None:
                    if name == "single":
                        asyncio.run(_warm_up(running.url, model, PromptMaker(
                            args.vocab_size, WARM_UP_SEED), args.request_timeout))
                        if slos is None:
                            slos, probe_load = derive_slos_on(running.url, model, args,
                                                              running.pgids)
                            record["slo_probe_host_load"] = probe_load
                        progress.say(f"SLOs: TTFT {slos.ttft_s * 1e3:.1f} ms, ITL "
                                     f"{slos.itl_s * 1e3:.2f} ms ({slos.rule})")
                    assert slos is not None
                    systems[name] = bench_url(running.url, model, args, slos, progress, name,
                                              running.pgids)
                    continue
                assert slos is not None
                first = True
                for reported, flags_of in conductor_flags(slos).items():
                    parts = []
                    for part, flags in flags_of.items():
                        if not first:
                            reset_prefix_caches([s.url for s in running.servers])
                        first = False
                        log = workdir / f"{reported}-{part}-conductor.log"
                        with start_conductor(running, flags, log) as url:
                            parts.append(bench_url(url, model, args, slos, progress,
                                                   reported, running.pgids, (part,)))
                    systems[reported] = _merged(parts)
        except (RuntimeError, ImportError, TimeoutError, OSError,
                ValueError) as e:
            # Reported, never hidden; without the single instance there are no SLOs.
            systems[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            progress.say(f"{name} could not run: {str(e).splitlines()[0][:300]}")
            if slos is None:
                raise SystemExit(f"no SLOs: the single instance did not run: {e}") from e
    assert slos is not None
    return slos, systems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, host = results.started_at(), results.host_info()
    progress = Progress(stream=sys.stderr)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="mooncake-vllm-bench-serve-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    else:
        from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model

        model = str(make_tiny_model(default_model_dir()))
    record: dict[str, Any] = {"confinement": {}, "slo_probe_host_load": None}
    slos, systems = _run_systems(args, model, out_dir, progress, record)
    png = out_dir / "serve.png"
    plot(systems, slos, png)
    kept = results.result_path("serve", started, args.results_dir) if args.json else None
    result = {
        "model": model, "dtype": "float32", "mode": "quick" if args.quick else "full",
        "cores": {"single": BOTH_CORES, "single_1core": PREFILL_CORES,
                  "prefill": PREFILL_CORES, "decode": DECODE_CORES, "front_door": BOTH_CORES},
        **record,
        "noisy": sorted(n for n, d in systems.items() if d.get("host_load", {}).get("noisy"))
        + (["slo_probe"] if (record["slo_probe_host_load"] or {}).get("noisy") else []),
        "conductor_flags": conductor_flags(slos),
        "workload": {k: getattr(args, k) for k in (
            "rates", "sweep_requests", "prompt_min", "prompt_max", "output_min", "output_max",
            "output_len", "repeats", "slo_probe_requests", "seed", "scenarios")},
        "slos": slos.as_dict(),
        "systems": systems,
        "ttft_p50_vs_single": verdicts.fixed_ratios(systems),
        "verdicts": verdicts.fixed_verdicts(systems)
        + verdicts.sweep_verdicts(systems, slos.itl_s),
        "plot": kept.with_suffix(".png").name if kept else str(png),
    }
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2))
    print(text_report(result), file=sys.stderr)
    if kept:
        path = results.write_result("serve", result, started, host, args.note, args.results_dir)
        shutil.copyfile(png, path.with_suffix(".png"))
        print(json.dumps(result, indent=2))
        progress.say(f"kept {path} and {path.with_suffix('.png')}")
    progress.say(f"logs and serve.json in {out_dir}")
    # The built-in connector needs a package of its own: where it cannot run, its bars read
    # "not measured"; any other system that did not run fails the benchmark.
    failed = [n for n, d in systems.items() if "error" in d and n != "vllm_mooncake"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
