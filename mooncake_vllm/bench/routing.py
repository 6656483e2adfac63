"""`python -m mooncake_vllm.bench routing --json`: cache-aware vs round-robin (vs least-loaded)
routing on a replayed multi-turn workload with shared prefixes, measured in one run.

Set-up: the tiny model on CPU; `--mode pd` runs 2 prefill + 1 decode instances with the
MooncakeVllmConnector, `--mode both` 2 plain instances that each serve a request alone. Each
instance runs in a cpuset of its own, and the instances are equal (`layout`): each prefill
(or "both") instance has a core of its own; the decode instance has a third core, or, on a
two-core machine, both cores, so that it shares equally with each prefill instance. The same
instances serve every policy: between policies every instance's prefix cache is reset
(`POST /reset_prefix_cache`, vLLM's dev-mode endpoint) and a fresh conductor is started.

Workload (a replayed trace, identical for every policy): `--conversations` conversations, each
opening with its own long context (documentation text) and going on for `--turns` turns; turn
t's prompt is the whole conversation so far (context, earlier questions and fixed earlier
answers) plus a new question, so consecutive turns share everything but the tail. Requests are
issued turn by turn by `--concurrency` clients; every request streams, and TTFT is the time to
the first token as the client sees it.

Per policy: prefix-cache hit rate from the prefill instances' own counters (deltas of
`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`; the decode instance's apart, as
`decode_prefix_hit_rate`), TTFT p50/p99 of admitted requests,
the fraction refused by early rejection, and SLO attainment (requests answered within
`--slo-ttft-s`, over all requests, refused ones counted as misses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mooncake_vllm.bench import results as kept
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model
from mooncake_vllm.testing.vllm_server import VllmServer, reset_prefix_caches

POLICIES = ("cache_aware", "round_robin", "least_loaded")


@dataclass(frozen=True)
class Outcome:
    status: int
    ttft_s: float | None


def build_trace(conversations: int, turns: int, context_chars: int) -> list[list[str]]:
    """prompts[turn][conversation]."""
    from pydoc_data import topics

    text = "\n".join(str(v) for v in topics.topics.values())
    contexts = [text[i * context_chars * 2: i * context_chars * 2 + context_chars]
                for i in range(conversations)]
    trace: list[list[str]] = []
    history = [f"Context:\n{c}\n" for c in contexts]
    for t in range(turns):
        row = []
        for c in range(conversations):
            row.append(history[c] + f"User: question {t} about part {c}, please explain.\n"
                       "Assistant:")
            history[c] = row[-1] + f" Answer {t} for conversation {c}, in some detail.\n"
        trace.append(row)
    return trace


def layout(mode: str, cores: list[int]) -> dict[str, list[int]]:
    """Cores per instance, equal for the instances that compete: one core per prefill (or
    "both") instance; the decode instance gets a core of its own where there is a third,
    else every core (it then shares with each prefill instance alike, never with one)."""
    if len(cores) < 2:
        raise ValueError(f"the routing benchmark needs at least 2 cores, got {cores}")
    out = {f"{'prefill' if mode == 'pd' else 'both'}{i}": [cores[i]] for i in range(2)}
    if mode == "pd":
        out["decode0"] = [cores[2]] if len(cores) >= 3 else cores[:2]
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _counters(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    hits = queries = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:prefix_cache_hits_total":
                hits += s.value
            elif s.name == "vllm:prefix_cache_queries_total":
                queries += s.value
    return hits, queries


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
               max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return Outcome(r.status, None)
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {"):
                ttft = time.monotonic() - t0
        return Outcome(200, ttft)


async def replay(url: str, model: str, trace: list[list[str]], concurrency: int,
                 max_tokens: int) -> list[Outcome]:
    out: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sem = asyncio.Semaphore(concurrency)

        async def run(prompt: str) -> Outcome:
            async with sem:
                return await _one(session, url, model, prompt, max_tokens)

        for row in trace:  # a turn starts when the previous turn of every conversation is done
            out += await asyncio.gather(*(run(p) for p in row))
    return out


def run_policy(policy: str, prefill: list[VllmServer], decode: list[VllmServer], model: str,
               trace: list[list[str]], args: argparse.Namespace,
               conductor_cores: list[int]) -> dict[str, Any]:
    reset_prefix_caches([s.url for s in prefill + decode])
    before = [_counters(s.url) for s in prefill + decode]
    if decode:
        inst_args = [a for s in prefill for a in ("--prefill", s.url)]
        inst_args += [a for s in decode for a in ("--decode", s.url)]
    else:
        inst_args = [a for s in prefill for a in ("--both", s.url)]
    proxy_args = [*inst_args, "--policy", policy, "--tokenizer", model,
                  "--slo-ttft-s", str(args.slo_ttft_s), "--log-level", "WARNING"]
    with ConductorProcess(proxy_args, cpus=conductor_cores,
                          log_path=args.logdir / f"conductor-{policy}.log") as proxy:
        proxy.wait_healthy(timeout_s=60)
        time.sleep(1.0)  # a health round more: every instance's load known
        t0 = time.monotonic()
        outcomes = asyncio.run(replay(proxy.url, model, trace, args.concurrency,
                                      args.max_tokens))
        wall = time.monotonic() - t0
    after = [_counters(s.url) for s in prefill + decode]
    delta = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    hits = sum(h for h, _ in delta[:len(prefill)])
    queries = sum(q for _, q in delta[:len(prefill)])
    # The conductor may let the decode instance prefill a prompt itself: its hits are kept
    # apart, since on D a lookup also precedes every KV transfer.
    d_hits = sum(h for h, _ in delta[len(prefill):])
    d_queries = sum(q for _, q in delta[len(prefill):])
    ttfts = [o.ttft_s for o in outcomes if o.status == 200 and o.ttft_s is not None]
    rejected = sum(o.status == 503 for o in outcomes)
    failed = sum(o.status not in (200, 503) for o in outcomes)
    met = sum(t <= args.slo_ttft_s for t in ttfts)
    return {
        "prefix_hit_rate": hits / queries if queries else None,
        "decode_prefix_hit_rate": d_hits / d_queries if d_queries else None,
        "ttft_p50_s": _percentile(ttfts, 0.50),
        "ttft_p99_s": _percentile(ttfts, 0.99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "rejected_fraction": rejected / len(outcomes),
        "slo_attainment": met / len(outcomes),
        "requests": len(outcomes),
        "failed": failed,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench routing",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--mode", choices=("pd", "both"), default="pd",
                    help="pd: 2 prefill + 1 decode with the connector; both: 2 plain instances")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--conversations", type=int, default=5,
                    help="odd, so that round-robin over 2 instances does not pin a conversation")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-chars", type=int, default=6000, help="~4 chars per token")
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--slo-ttft-s", type=float, default=3.0)
    ap.add_argument("--model", default=None, help="model dir (default: the tiny test model)")
    kept.add_arguments(ap)
    args = ap.parse_args(argv)
    started, host = kept.started_at(), kept.host_info()
    policies = [p for p in args.policies.split(",") if p]
    model = args.model or str(make_tiny_model(default_model_dir()))
    trace = build_trace(args.conversations, args.turns, args.context_chars)

    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    args.logdir = logdir
    cores = sorted(os.sched_getaffinity(0))
    cores_of = layout(args.mode, cores)
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache

    def server(name: str, kv_role: str | None) -> VllmServer:
        kv = None if kv_role is None else {
            "kv_connector": "MooncakeVllmConnector", "kv_role": kv_role,
            "kv_connector_extra_config": {"metadata_server": "p2p"}}
        return VllmServer(model, name=name, cpus=cores_of[name], pin_process=True, env=env,
                          log_path=logdir / f"{name}.log", kv_transfer_config=kv)

    if args.mode == "pd":
        prefill = [server(f"prefill{i}", "kv_producer") for i in range(2)]
        decode = [server("decode0", "kv_consumer")]
    else:
        prefill = [server(f"both{i}", None) for i in range(2)]
        decode = []
    servers = prefill + decode
    results: dict[str, Any] = {}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout_s=600)
        # Warm-up (first-request costs), then the measured runs.
        confinement = {s.name: s.process.confinement_note if s.process else "not started"
                       for s in servers}
        run_policy("round_robin", prefill, decode, model, trace[:1], args, cores)
        for policy in policies:
            results[policy] = run_policy(policy, prefill, decode, model, trace, args, cores)
            if not args.json:
                print(f"{policy}: {json.dumps(results[policy])}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    report = {"mode": args.mode, "slo_ttft_s": args.slo_ttft_s, "cores": cores_of,
              "conductor_cores": cores, "confinement": confinement,
              "workload": {"conversations": args.conversations, "turns": args.turns,
                           "context_chars": args.context_chars,
                           "concurrency": args.concurrency, "max_tokens": args.max_tokens},
              "policies": results}
    if args.json:
        path = kept.write_result("routing", report, started, host, args.note, args.results_dir)
        print(json.dumps(report))
        print(f"kept in {path}", file=sys.stderr)
    else:
        for name, r in results.items():
            print(f"{name:13s} hit rate {r['prefix_hit_rate']:.3f}  TTFT p50 {r['ttft_p50_s']:.3f}s"
                  f"  p99 {r['ttft_p99_s']:.3f}s  rejected {r['rejected_fraction']:.2f}"
                  f"  SLO {r['slo_attainment']:.2f}")
    ca, rr = results.get("cache_aware"), results.get("round_robin")
    if ca and rr and not (ca["prefix_hit_rate"] > rr["prefix_hit_rate"]
                          and ca["ttft_p50_s"] < rr["ttft_p50_s"]):
        print("cache-aware did not beat round-robin on both hit rate and TTFT p50",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
