"""`python -m mooncake_vllm.bench pool --json`: the cluster KV pool on a multi-turn,
shared-document workload whose working set is larger than the instances' KV caches.

Set-up: the tiny model on CPU; 2 prefill + 1 decode instances with the MooncakeVllmConnector
(`pool=true`, etcd), each in a cpuset (prefill instances a core each, the decode instance
both cores on a two-core machine, as `bench routing` lays them out), with KV caches of
`--cache-blocks` blocks (`--num-gpu-blocks-override`; the decode instance
`--decode-cache-blocks`, enough for the requests it runs at once); the conductor as a user starts it
(`--metadata-server etcd://.. --namespace ..`, its defaults: it finds the instances and the
store nodes there). Three store nodes (`mooncake-vllm
store`) float over all cores.

Systems, side by side on the same instances (between systems every prefix cache is reset and
the stores are replaced):
- `no_pool`: no store node runs. The instances are the same, so their pool lookups find no
  store and answer at once (a miss); nothing else differs.
- `pool`: three store nodes with DRAM tiers.
- `pool_ssd`: three store nodes whose entries live in an SSD-tier file, each with a DRAM tier
  of `--ssd-dram-slots` slots only (a read is staged in DRAM, so the tier cannot be 0).

Workload (identical for every system): `--documents` long documents of random token ids and
`--conversations` conversations, each opening on one document (several conversations share
each) and going on for `--turns` turns; a turn's prompt is the document, the conversation so
far and a new question. Requests go turn by turn, `--concurrency` at a time, streaming.

Reported per system: TTFT p50/p99 as the client sees it; prefix tokens reused (local prefix
cache hits, `vllm:prefix_cache_hits`, plus blocks loaded from the pool times the block size,
over all instances); pool hit rate (lookups that found blocks, over lookups); and whether every
answer equals a single plain instance's greedy answer to the same prompt.
Bars (issue 13): with the pool, TTFT p50 at most 0.5x the no-pool p50 and reused tokens at
least 2x; outputs equal for every request, in every system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from mooncake_vllm.bench import results as kept
from mooncake_vllm.bench.routing import layout
from mooncake_vllm.bench.workload import FIRST_ORDINARY_TOKEN, percentile
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.etcd_server import EtcdServer
from mooncake_vllm.testing.store_process import StoreProcess
from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model
from mooncake_vllm.testing.vllm_server import VllmServer, free_port, reset_prefix_caches

SYSTEMS = ("no_pool", "pool", "pool_ssd")
NAMESPACE = "bench-pool"
BLOCK = 32


def build_trace(documents: int, conversations: int, turns: int, doc_tokens: int,
                seed: int) -> list[list[list[int]]]:
    """prompts[turn][conversation], token ids."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_TOKEN, 2048) for _ in range(n)]

    docs = [tokens(doc_tokens) for _ in range(documents)]
    history = [list(docs[c % documents]) for c in range(conversations)]
    trace = []
    for _ in range(turns):
        row = []
        for c in range(conversations):
            row.append(history[c] + tokens(48))  # a new question
            history[c] = row[-1] + tokens(24)  # and the answer, fixed in the history
        trace.append(row)
    return trace


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
               max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    ttft, text = None, []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {"status": r.status, "error": (await r.text())[:300]}
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            if ttft is None:
                ttft = time.monotonic() - t0
            text.append(json.loads(line[6:])["choices"][0]["text"])
    return {"status": 200, "ttft_s": ttft, "text": "".join(text)}


async def replay(url: str, model: str, trace: list[list[list[int]]], concurrency: int,
                 max_tokens: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def run(prompt: list[int]) -> dict[str, Any]:
            async with sem:
                return await _one(session, url, model, prompt, max_tokens)

        for row in trace:
            out += await asyncio.gather(*(run(p) for p in row))
    return out


def _sums(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    want = {"vllm:prefix_cache_hits", "vllm:mooncake_pool_blocks_loaded",
            "vllm:mooncake_pool_lookups", "vllm:mooncake_pool_hits"}
    sums = dict.fromkeys(want, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name.removesuffix("_total")
            if name in want:
                sums[name] += s.value
    return sums


def _stores(etcd: EtcdServer, system: str, workdir: Path, args: argparse.Namespace
            ) -> list[StoreProcess]:
    if system == "no_pool":
        return []
    stores = []
    for i in range(3):
        ssd = system == "pool_ssd"
        stores.append(StoreProcess(
            etcd.url, name=f"{system}-{i}", slot_bytes=args.slot_bytes,
            dram_mib=(args.ssd_dram_slots * args.slot_bytes / 2**20) if ssd else args.store_mib,
            ssd_path=workdir / f"{system}-{i}.ssd" if ssd else None,
            ssd_mib=args.store_mib if ssd else 0, args=["--namespace", NAMESPACE],
            log_path=workdir / f"store-{system}-{i}.log"))
    return stores


def run_system(system: str, etcd: EtcdServer, servers: list[VllmServer], conductor_url: str,
               model: str, trace: list[list[list[int]]], args: argparse.Namespace
               ) -> dict[str, Any]:
    reset_prefix_caches([s.url for s in servers])
    stores = _stores(etcd, system, args.logdir, args)
    with contextlib.ExitStack() as stack:
        for st in stores:
            stack.enter_context(st)
        time.sleep(args.settle_s)  # the stores in every worker's etcd view (or gone from it)
        before = [_sums(s.url) for s in servers]
        t0 = time.monotonic()
        outcomes = asyncio.run(replay(conductor_url, model, trace, args.concurrency,
                                      args.max_tokens))
        wall = time.monotonic() - t0
        time.sleep(1.0)
        for s in servers:  # one more step each: the workers' last counts reach the metrics
            urllib.request.urlopen(urllib.request.Request(
                s.url + "/v1/completions", data=json.dumps(
                    {"model": model, "prompt": [5], "max_tokens": 1}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
        after = [_sums(s.url) for s in servers]
        store_status = [st.status() for st in stores]
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in after[0]}
    ttfts = [o["ttft_s"] for o in outcomes if o.get("ttft_s") is not None]
    lookups = delta["vllm:mooncake_pool_lookups"]
    return {
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "reused_tokens": int(delta["vllm:prefix_cache_hits"]
                             + delta["vllm:mooncake_pool_blocks_loaded"] * BLOCK),
        "local_hit_tokens": int(delta["vllm:prefix_cache_hits"]),
        "pool_loaded_tokens": int(delta["vllm:mooncake_pool_blocks_loaded"] * BLOCK),
        "pool_hit_rate": delta["vllm:mooncake_pool_hits"] / lookups if lookups else None,
        "requests": len(outcomes),
        "failed": sum(o["status"] != 200 for o in outcomes),
        "wall_s": round(wall, 3),
        "stores": [{"tiers": s["tiers"], "pool": s["pool"], "node": s["node"]}
                   for s in store_status],
        "texts": [o.get("text") for o in outcomes],
    }


def reference_texts(model: str, trace: list[list[list[int]]], max_tokens: int,
                    max_model_len: int, logdir: Path) -> list[str | None]:
    """Every prompt on one plain instance, one at a time."""
    with VllmServer(model, name="reference", log_path=logdir / "reference.log",
                    extra_args=["--max-model-len", str(max_model_len)]) as ref:
        out = asyncio.run(replay(ref.url, model, trace, 1, max_tokens))
    return [o.get("text") for o in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench pool", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--documents", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1536)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--cache-blocks", type=int, default=81,
                    help="KV cache blocks per instance (32 tokens each): below the working "
                    "set, and one more than --max-model-len tokens fill (vLLM keeps one)")
    ap.add_argument("--max-model-len", type=int, default=2560)
    ap.add_argument("--decode-cache-blocks", type=int, default=160,
                    help="the decode instance's: enough for --concurrency requests at once "
                    "(it holds the running requests' KV), still below the working set")
    ap.add_argument("--store-mib", type=float, default=64, help="per store node")
    ap.add_argument("--ssd-dram-slots", type=int, default=8)
    ap.add_argument("--slot-bytes", type=int, default=1 << 17)
    ap.add_argument("--settle-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--model", default=None, help="model dir (default: the tiny test model)")
    kept.add_arguments(ap)
    args = ap.parse_args(argv)
    started, host = kept.started_at(), kept.host_info()
    systems = [s for s in args.systems.split(",") if s]
    model = args.model or str(make_tiny_model(default_model_dir()))
    trace = build_trace(args.documents, args.conversations, args.turns, args.doc_tokens,
                        args.seed)
    args.logdir = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    cores = sorted(os.sched_getaffinity(0))
    cores_of = layout("pd", cores)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(EtcdServer(args.logdir / "etcd"))
        ports = {name: free_port() for name in cores_of}

        def server(name: str, role: str) -> VllmServer:
            blocks = args.decode_cache_blocks if role == "kv_consumer" else args.cache_blocks
            return VllmServer(
                model, name=name, port=ports[name], cpus=cores_of[name], pin_process=True,
                env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=args.logdir / f"{name}.log",
                extra_args=["--num-gpu-blocks-override", str(blocks),
                            "--max-model-len", str(args.max_model_len)],
                kv_transfer_config={
                    "kv_connector": "MooncakeVllmConnector", "kv_role": role,
                    "kv_connector_extra_config": {
                        "metadata_server": etcd.url, "namespace": NAMESPACE, "pool": True,
                        "advertise_url": f"http://127.0.0.1:{ports[name]}"}})

        servers = [server("prefill0", "kv_producer"), server("prefill1", "kv_producer"),
                   server("decode0", "kv_consumer")]
        for s in servers:
            stack.callback(s.stop)
            s.start()
        for s in servers:
            s.wait_ready(timeout_s=600)
        # Discovery through etcd: the conductor then also sees the pool's members, and counts
        # what the pool holds in its routing cost.
        flags = ["--metadata-server", etcd.url, "--namespace", NAMESPACE,
                 "--log-level", "WARNING"]
        conductor = stack.enter_context(ConductorProcess(
            flags, cpus=cores, log_path=args.logdir / "conductor.log"))
        conductor.wait_healthy(timeout_s=60)
        # Warm-up: the whole trace once, unmeasured and with no store, so that no system pays
        # an engine's first-request costs (kernel selection and allocator growth for each
        # prompt length) for the others; every system then starts from empty caches.
        asyncio.run(replay(conductor.url, model, trace, args.concurrency, 1))
        for system in systems:
            results[system] = run_system(system, etcd, servers, conductor.url, model, trace,
                                         args)
            if not args.json:
                short = {k: v for k, v in results[system].items() if k not in ("texts",
                                                                              "stores")}
                print(f"{system}: {json.dumps(short)}", file=sys.stderr)
        confinement = {s.name: s.process.confinement_note if s.process else "?"
                       for s in servers}
    reference = reference_texts(model, trace, args.max_tokens, args.max_model_len, args.logdir)
    for r in results.values():
        texts = r.pop("texts")
        r["outputs_equal"] = sum(t == ref for t, ref in zip(texts, reference, strict=True))
    verdicts = _verdicts(results)
    report = {"cores": cores_of, "confinement": confinement, "cache_blocks": args.cache_blocks,
              "decode_cache_blocks": args.decode_cache_blocks,
              "workload": {k: getattr(args, k) for k in (
                  "documents", "doc_tokens", "conversations", "turns", "concurrency",
                  "max_tokens", "seed", "max_model_len")},
              "systems": results, "verdicts": verdicts, "logs": str(args.logdir)}
    if args.json:
        path = kept.write_result("pool", report, started, host, args.note, args.results_dir)
        print(json.dumps(report))
        print(f"kept in {path}", file=sys.stderr)
    for bar, verdict in verdicts.items():
        print(f"{verdict:12s} {bar}", file=sys.stderr)
    return 0 if all(v == "pass" for v in verdicts.values()) else 1


def _verdicts(results: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    base, pool = results.get("no_pool"), results.get("pool")
    if base and pool and base["ttft_p50_s"] and pool["ttft_p50_s"]:
        ratio = pool["ttft_p50_s"] / base["ttft_p50_s"]
        out[f"pool TTFT p50 <= 0.5x no-pool ({ratio:.2f}x)"] = "pass" if ratio <= 0.5 else "miss"
        gain = pool["reused_tokens"] / max(1, base["reused_tokens"])
        out[f"pool reused tokens >= 2x no-pool ({gain:.2f}x)"] = "pass" if gain >= 2 else "miss"
    for name, r in results.items():
        out[f"{name}: outputs equal a single instance ({r['outputs_equal']}/{r['requests']})"] = (
            "pass" if r["outputs_equal"] == r["requests"] and not r["failed"] else "miss")
    return out


if __name__ == "__main__":
    sys.exit(main())
