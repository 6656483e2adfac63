"""`python -m mooncake_vllm.bench serve --json`: disaggregated serving vs one vLLM instance.

Systems, each given the same two cores (float32, the tiny model unless `--model`):
- `single`: one `vllm serve` on cores 0 and 1;
- `single_1core`: one `vllm serve` on core 0 alone, a reference and not a bar: the compute
  each of P and D has. A prefill on one core takes about twice as long as on two, so the
  ratio to it shows what disaggregation itself costs, apart from the halved prefill core;
- `mooncake_vllm`: prefill on core 0 and decode on core 1 with MooncakeVllmConnector, etcd,
  and the conductor in front, with conditional disaggregation (`--local-prefill-max-tokens`,
  `--local-prefill-when-faster`): short prompts, and prompts that would queue behind others
  on P while D is idle, are prefilled on D; and pipelined prefill
  (`--pipeline-prefill-min-tokens`, the cut balanced for the model's attention cost): long
  prompts are prefilled by P and D together, one layer apart;
- `mooncake_vllm_always_pd`: the same servers behind a second conductor that disaggregates
  every request (what the connector alone achieves);
- `vllm_mooncake`: the same pair with vLLM's built-in MooncakeConnector, where its transfer
  engine package (`mooncake-transfer-engine-non-cuda`) is installed; see `builtin_mooncake.py`.

Scenarios, each on a fresh set of random token-id prompts (no prefix-cache hits):
- `prompt_1900`, `prompt_1`: one request at a time, 1900-token and 1-token prompts;
- `concurrent8_500`: 8 requests of 500 tokens sent at once;
- a load sweep: Poisson arrivals at each `--rates` value, prompt lengths uniform in
  [`--prompt-min`, `--prompt-max`], output lengths uniform in [`--output-min`, `--output-max`].
Per scenario: TTFT, inter-token latency (per streamed event) and time per output token
p50/p99, output-token and request throughput.
The JSON goes to stdout (`--json`) and `--out`/serve.json; the plot (TTFT against request rate,
one line per system) to `--out`/serve_ttft.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mooncake_vllm.demo import Conductor, Progress, StartupError, wait_all_ready
from mooncake_vllm.testing.vllm_server import VllmServer, free_port

SYSTEMS = ("single", "single_1core", "mooncake_vllm", "vllm_mooncake")
SCENARIOS = ("prompt_1900", "prompt_1", "concurrent8_500")
FIRST_ORDINARY_TOKEN = 4  # the tiny model's special tokens are ids 0..3


# ---------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    send_at_s: float = 0.0  # offset from the scenario's start


@dataclass
class Outcome:
    ttft_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency_s: float = math.nan
    error: str = ""


class PromptMaker:
    """Random token-id prompts of exact lengths; a fresh first token per prompt keeps any two
    prompts from sharing a cached prefix."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab_size

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(FIRST_ORDINARY_TOKEN, self.vocab) for _ in range(n)]


def fixed_scenario(make: PromptMaker, prompt_len: int, count: int, max_tokens: int,
                   concurrent: bool) -> list[Request]:
    # Sequential requests are sent one after another (send_at_s=nan means "after the last").
    at = 0.0 if concurrent else math.nan
    return [Request(make(prompt_len), max_tokens, at) for _ in range(count)]


def poisson_scenario(make: PromptMaker, rate: float, count: int, prompt_range: tuple[int, int],
                     output_range: tuple[int, int], seed: int) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        out.append(Request(make(rng.randint(*prompt_range)), rng.randint(*output_range), t))
        t += rng.expovariate(rate)
    return out


# ---------------------------------------------------------------------------- client
async def one_request(session: aiohttp.ClientSession, url: str, model: str, req: Request,
                      timeout_s: float) -> Outcome:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    out = Outcome()
    start = time.perf_counter()
    last = start
    chunks = usage_tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return out
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data:"))
                if "error" in event:
                    out.error = str(event["error"])[:300]
                    return out
                if event.get("usage"):
                    usage_tokens = int(event["usage"].get("completion_tokens") or 0)
                if not any(c.get("text") for c in event.get("choices", [])):
                    continue
                # One SSE event may carry several tokens (an API server that falls behind its
                # engine merges them): ITL is per event, as vLLM's own benchmark counts it;
                # TPOT below is per token.
                now = time.perf_counter()
                if chunks == 0:
                    out.ttft_s = now - start
                else:
                    out.itl_s.append(now - last)
                last = now
                chunks += 1
    except (aiohttp.ClientError, TimeoutError) as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency_s = time.perf_counter() - start
    out.output_tokens = usage_tokens or chunks
    return out


async def run_scenario(url: str, model: str, requests: Sequence[Request],
                       timeout_s: float) -> tuple[list[Outcome], float]:
    """Send `requests` (at their offsets, or one after another) and return the outcomes and
    the makespan."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        outcomes: list[Outcome] = []
        tasks: list[asyncio.Task[Outcome]] = []
        for req in requests:
            if math.isnan(req.send_at_s):
                outcomes.append(await one_request(session, url, model, req, timeout_s))
                continue
            delay = t0 + req.send_at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, model, req, timeout_s)))
        outcomes += await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - t0


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile; nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(outcomes: Sequence[Outcome], makespan_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if not o.error]
    ttft = [o.ttft_s for o in ok]
    itl = [x for o in ok for x in o.itl_s]
    tokens = sum(o.output_tokens for o in ok)
    tpot = [(o.latency_s - o.ttft_s) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    summary: dict[str, Any] = {
        "requests": len(outcomes), "failed": len(outcomes) - len(ok),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "output_tokens_per_s": tokens / makespan_s if makespan_s > 0 else math.nan,
        "requests_per_s": len(ok) / makespan_s if makespan_s > 0 else math.nan,
        "makespan_s": makespan_s,
    }
    if len(ok) < len(outcomes):
        summary["errors"] = sorted({o.error for o in outcomes if o.error})[:3]
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in summary.items()}


# ---------------------------------------------------------------------------- systems
@contextlib.contextmanager
def start_system(name: str, model: str, workdir: Path, progress: Progress,
                 startup_timeout_s: float, conductor_args: Sequence[str] = ()
                 ) -> Iterator[dict[str, str]]:
    """Start one system; yields {reported name: URL clients send requests to} (ours is
    reported twice over the same servers: with `conductor_args`, and disaggregating every
    request); stops it all on exit."""
    stack = contextlib.ExitStack()
    try:
        if name in ("single", "single_1core"):
            server = VllmServer(model, cpus=[0, 1] if name == "single" else [0],
                                pin_process=True, name=name, log_path=workdir / f"{name}.log")
            stack.callback(server.stop)
            wait_all_ready([server.start()], progress, startup_timeout_s)
            yield {name: server.url}
        elif name == "mooncake_vllm":
            from mooncake_vllm.testing.etcd_server import EtcdServer

            etcd = EtcdServer(workdir / "etcd").start()
            stack.callback(etcd.stop)
            servers = []
            for role, kv_role, core in (("prefill", "kv_producer", 0),
                                        ("decode", "kv_consumer", 1)):
                port = free_port()
                kv = {"kv_connector": "MooncakeVllmConnector", "kv_role": kv_role,
                      "kv_connector_extra_config": {
                          "metadata_server": etcd.url,
                          "advertise_url": f"http://127.0.0.1:{port}"}}
                server = VllmServer(model, port=port, kv_transfer_config=kv, cpus=[core],
                                    pin_process=True, name=role, log_path=workdir / f"{role}.log")
                stack.callback(server.stop)
                servers.append(server.start())
            wait_all_ready(servers, progress, startup_timeout_s)
            urls = {}
            for reported, flags in (("mooncake_vllm", list(conductor_args)),
                                    ("mooncake_vllm_always_pd", [])):
                conductor = Conductor(["--metadata-server", etcd.url, *flags],
                                      workdir / f"{reported}-conductor.log")
                stack.callback(conductor.stop)
                conductor.wait_ready(timeout_s=60)
                urls[reported] = conductor.url
            yield urls
        elif name == "vllm_mooncake":
            from mooncake_vllm.bench.builtin_mooncake import start_builtin_pair

            yield {name: start_builtin_pair(model, workdir, stack, progress, startup_timeout_s)}
        else:
            raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    finally:
        stack.close()


async def _warm_up(url: str, model: str, make: PromptMaker, timeout_s: float) -> None:
    """Pay the engines' one-off first-request costs, and wait until the front door routes
    (a conductor may still be discovering its instances)."""
    deadline = time.monotonic() + 60
    while True:
        outcomes, _ = await run_scenario(url, model, [Request(make(64), 4, math.nan)], timeout_s)
        if not outcomes[0].error:
            break
        if time.monotonic() > deadline:
            raise StartupError(f"warm-up through {url} failed: {outcomes[0].error}")
        await asyncio.sleep(1.0)
    await run_scenario(url, model, fixed_scenario(make, 1900, 1, 4, False), timeout_s)
    await run_scenario(url, model, fixed_scenario(make, 500, 8, 4, True), timeout_s)


def bench_system(url: str, model: str, args: argparse.Namespace, seed: int,
                 progress: Progress, system: str) -> dict[str, Any]:
    make = PromptMaker(args.vocab_size, seed)
    asyncio.run(_warm_up(url, model, make, args.request_timeout))
    scenarios: dict[str, list[Request]] = {
        "prompt_1900": fixed_scenario(make, 1900, args.repeats, args.output_len, False),
        "prompt_1": fixed_scenario(make, 1, args.repeats, args.output_len, False),
        "concurrent8_500": [r for _ in range(max(1, args.repeats // 4))
                            for r in fixed_scenario(make, 500, 8, args.output_len, True)],
    }
    scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios}
    result: dict[str, Any] = {"scenarios": {}, "sweep": []}
    for name, reqs in scenarios.items():
        if name == "concurrent8_500":  # rounds of 8 at once, one round after the other
            rounds = [reqs[i:i + 8] for i in range(0, len(reqs), 8)]
            outcomes, span = [], 0.0
            for batch in rounds:
                o, s = asyncio.run(run_scenario(url, model, batch, args.request_timeout))
                outcomes += o
                span += s
        else:
            outcomes, span = asyncio.run(run_scenario(url, model, reqs, args.request_timeout))
        result["scenarios"][name] = summarise(outcomes, span)
        progress.say(f"{system} {name}: {_brief(result['scenarios'][name])}")
    for i, rate in enumerate(args.rates):
        reqs = poisson_scenario(make, rate, args.sweep_requests,
                                (args.prompt_min, args.prompt_max),
                                (args.output_min, args.output_max), seed + i)
        outcomes, span = asyncio.run(run_scenario(url, model, reqs, args.request_timeout))
        point = {"rate": rate, **summarise(outcomes, span)}
        result["sweep"].append(point)
        progress.say(f"{system} rate {rate}/s: {_brief(point)}")
    return result


def _brief(s: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        v = s.get(key)
        return f"{v * 1e3:.1f}ms" if isinstance(v, float) and math.isfinite(v) else "n/a"

    return (f"TTFT p50 {ms('ttft_p50_s')} p99 {ms('ttft_p99_s')}, ITL p50 {ms('itl_p50_s')}, "
            f"TPOT p50 {ms('tpot_p50_s')}, {s.get('output_tokens_per_s', 0):.1f} tok/s, "
            f"failed {s['failed']}/{s['requests']}")


# ---------------------------------------------------------------------------- verdicts, plot
# The bars: P/D TTFT p50 against the single instance's, per scenario.
CRITERIA: dict[str, tuple[str, float]] = {
    "prompt_1900": ("ratio", 1.1),
    "prompt_1": ("plus_s", 0.010),
    "concurrent8_500": ("ratio", 1.5),
}


def verdicts(systems: dict[str, Any]) -> dict[str, Any]:
    single = systems.get("single", {}).get("scenarios")
    out: dict[str, Any] = {}
    if not single:
        return out
    one_core = systems.get("single_1core", {}).get("scenarios") or {}
    for name, data in systems.items():
        if name.startswith("single") or "scenarios" not in data:
            continue
        per: dict[str, Any] = {}
        for scen, (kind, bar) in CRITERIA.items():
            if scen not in data["scenarios"] or scen not in single:
                continue  # not run (--scenarios)
            ours, base = data["scenarios"][scen]["ttft_p50_s"], single[scen]["ttft_p50_s"]
            if not (isinstance(ours, float) and isinstance(base, float)):
                per[scen] = {"error": "no TTFT measured"}
                continue
            value = ours / base if kind == "ratio" else ours - base
            per[scen] = {kind: round(value, 4), "bar": bar, "met": value <= bar}
            ref = one_core.get(scen, {}).get("ttft_p50_s")
            if isinstance(ref, float) and ref > 0:
                per[scen]["vs_single_1core"] = round(
                    ours / ref if kind == "ratio" else ours - ref, 4)
        out[name] = per
    peer = systems.get("vllm_mooncake", {}).get("scenarios")
    for name in ("mooncake_vllm", "mooncake_vllm_always_pd"):
        ours = out.get(name)
        if ours and peer:
            for scen in ours:
                if scen not in peer:
                    continue
                mine = systems[name]["scenarios"][scen]["ttft_p50_s"]
                ours[scen]["below_vllm_mooncake"] = bool(mine < peer[scen]["ttft_p50_s"])
    return out


def plot(systems: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name, data in systems.items():
        sweep = data.get("sweep") or []
        if not sweep:
            continue
        rates = [p["rate"] for p in sweep]
        line = ax.plot(rates, [p["ttft_p50_s"] * 1e3 for p in sweep], marker="o",
                       label=f"{name} p50")[0]
        ax.plot(rates, [p["ttft_p99_s"] * 1e3 for p in sweep], marker="x", linestyle="--",
                color=line.get_color(), label=f"{name} p99")
    ax.set_xlabel("request rate (requests/s, Poisson)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title("TTFT vs load: disaggregated (P: core 0, D: core 1) vs single (cores 0-1)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:  # beside the plot: inside it, it hides the lines
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench serve",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--model", default=None, help="default: the hub-free tiny Llama")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--scenarios", type=_names, default=list(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--rates", type=_floats, default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--sweep-requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=1024)
    ap.add_argument("--output-min", type=int, default=8)
    ap.add_argument("--output-max", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=8, help="in the fixed scenarios")
    ap.add_argument("--repeats", type=int, default=8, help="requests per fixed scenario")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for serve.json and the PNG")
    ap.add_argument("--local-prefill-max-tokens", type=int, default=32, metavar="N",
                    help="the conductor's flag: prompts of at most N tokens are prefilled on "
                    "the decode instance (0: disaggregate every request)")
    ap.add_argument("--local-prefill-when-faster", action=argparse.BooleanOptionalAction,
                    default=True, help="the conductor's flag of that name")
    ap.add_argument("--pipeline-prefill-min-tokens", type=int, default=256, metavar="N",
                    help="the conductor's flag: prompts of at least N tokens are prefilled by "
                    "P and D in a pipeline (0: off)")
    ap.add_argument("--pipeline-prefill-share", type=float, default=0.55, metavar="F",
                    help="the conductor's flag: P's share of a pipelined prompt")
    ap.add_argument("--prefill-window-tokens", type=int, default=576, metavar="N",
                    help="the conductor's flag: at most N prompt tokens in flight at P "
                    "(0: off)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    return ap.parse_args(argv)


def attention_tokens(model: str) -> float:
    """The conductor's --pipeline-attention-tokens for a Llama-like model directory: MACs per
    token per layer outside attention (projections, gated MLP) over attention's MACs per
    token of context (2 x heads x head_dim); 0 when its config.json cannot be read."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        h, inter = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or h // heads
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 0.0
    fixed = h * head_dim * (2 * heads + 2 * kv_heads) + 3 * h * inter
    return round(fixed / (2 * heads * head_dim), 1)


def conductor_args(args: argparse.Namespace, model: str) -> list[str]:
    flags = ["--local-prefill-max-tokens", str(args.local_prefill_max_tokens),
             "--pipeline-prefill-min-tokens", str(args.pipeline_prefill_min_tokens),
             "--pipeline-prefill-share", str(args.pipeline_prefill_share),
             "--pipeline-attention-tokens", str(attention_tokens(model)),
             "--prefill-window-tokens", str(args.prefill_window_tokens)]
    return flags + (["--local-prefill-when-faster"] if args.local_prefill_when_faster else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(stream=sys.stderr)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="mooncake-vllm-bench-serve-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    else:
        from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model

        model = str(make_tiny_model(default_model_dir()))
    systems: dict[str, Any] = {}
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        progress.say(f"starting {name}")
        workdir = out_dir / name
        workdir.mkdir(exist_ok=True)
        try:
            with start_system(name, model, workdir, progress, args.startup_timeout,
                              conductor_args(args, model)) as urls:
                for i, (reported, url) in enumerate(urls.items()):
                    # Every system sees the same prompts, except a second one over the same
                    # servers: their prefix caches already hold those, so it gets fresh ones.
                    systems[reported] = bench_system(url, model, args, args.seed + i,
                                                     progress, reported)
        except (StartupError, RuntimeError, ImportError, TimeoutError) as e:
            # A peer that cannot run here is reported, not fatal.
            systems[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            progress.say(f"{name} could not run: {str(e).splitlines()[0][:200]}")
    png = out_dir / "serve_ttft.png"
    plot(systems, png)
    result = {
        "model": model, "dtype": "float32",
        "cores": {"single": [0, 1], "prefill": [0], "decode": [1]},
        "pinning": "each server's whole process tree (API server, engine core, workers)",
        "conductor": {"mooncake_vllm": conductor_args(args, model), "mooncake_vllm_always_pd": []},
        "workload": {k: getattr(args, k) for k in (
            "rates", "sweep_requests", "prompt_min", "prompt_max", "output_min", "output_max",
            "output_len", "repeats", "seed")},
        "systems": systems, "criteria": verdicts(systems), "plot": str(png),
    }
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    progress.say(f"wrote {out_dir / 'serve.json'} and {png}")
    failed = [n for n, d in systems.items() if "error" in d and n != "vllm_mooncake"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
