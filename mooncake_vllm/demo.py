"""`make demo` / `mooncake-vllm demo`: the whole system on loopback, checked against vLLM alone.

Starts etcd, a prefill and a decode `vllm serve` with MooncakeVllmConnector, a plain vLLM
instance for reference, and the conductor; sends a handful of prompts through the conductor
(streaming, greedy), prints the answers, checks them token for token against the reference
instance, and prints TTFT, decode speed, KV bytes moved and the exposed transfer time. Exits 0
when every answer matches, 1 on a mismatch, 2 when the stack could not be started, 130 on
Ctrl-C. Everything it started is stopped on every path out, Ctrl-C and SIGTERM included.

The only forgiven difference is a first divergence at an exact tie between the reference's
top-1 and top-2 logprobs: there the pick depends on floating-point summation order, which
legitimately differs between a batch of one and a disaggregated pair.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.launcher import LaunchError
from mooncake_vllm.testing.ports import free_port
from mooncake_vllm.testing.startup import Progress, stop_in_parallel, wait_all_ready
from mooncake_vllm.testing.vllm_server import VllmServer

PROMPTS = (
    "The history of the transfer engine begins",
    "Explain why the key-value cache of a transformer grows with the prompt:",
    "def fibonacci(n):",
    "Mooncake separates prefill from decode so that",
    "A",  # a one-token prompt: the decode side must still get a (one-token) KV transfer
)
WARMUP_PROMPT = "Warm-up: the first request of an engine"
CONNECTOR = "MooncakeVllmConnector"
EXIT_OK, EXIT_MISMATCH, EXIT_STARTUP, EXIT_INTERRUPTED = 0, 1, 2, 130


# The benchmarks still import these names from here; they live in mooncake_vllm.testing.
StartupError = LaunchError


# ---------------------------------------------------------------------------- requests
@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # per generated token: {token_id: logprob} of the top candidates
    top: list[dict[int, float]] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generation speed after the first token (what the decode instance delivers)."""
        rest = len(self.token_ids) - 1
        span = self.total_s - self.ttft_s
        return rest / span if rest > 0 and span > 0 else 0.0


def _token_id(text: str) -> int:
    # With return_tokens_as_token_ids vLLM names tokens "token_id:123".
    return int(text.rsplit(":", 1)[1])


def stream_completion(base_url: str, model: str, prompt: str, max_tokens: int,
                      timeout_s: float) -> Completion:
    """One greedy streaming /v1/completions request, with token ids and top-2 logprobs."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "stream": True, "logprobs": 2, "return_tokens_as_token_ids": True,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    out = Completion()
    start = time.perf_counter()
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{base_url}: HTTP {e.code}: {e.read().decode(errors='replace')}")\
            from None
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line.removeprefix("data:").strip()
            if payload == "[DONE]":
                continue  # read on to the end of the body: closing early looks like an abort
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"{base_url}: error event: {event['error']}")
            if event.get("usage"):
                out.prompt_tokens = int(event["usage"].get("prompt_tokens", 0))
            for choice in event.get("choices", []):
                logprobs = choice.get("logprobs") or {}
                tokens = logprobs.get("tokens") or []
                if tokens and not out.token_ids:
                    out.ttft_s = time.perf_counter() - start
                out.token_ids += [_token_id(t) for t in tokens]
                out.top += [{_token_id(k): float(v) for k, v in (top or {}).items()}
                            for top in (logprobs.get("top_logprobs") or [])]
                out.text += choice.get("text") or ""
    out.total_s = time.perf_counter() - start
    return out


def compare(got: Completion, ref: Completion) -> tuple[bool, str]:
    """(ok, note): equal token ids, or a first divergence at an exact top-1/top-2 tie."""
    if got.token_ids == ref.token_ids:
        return True, "identical"
    n = min(len(got.token_ids), len(ref.token_ids))
    i = next((k for k in range(n) if got.token_ids[k] != ref.token_ids[k]), n)
    if i == n:
        return False, f"lengths differ: {len(got.token_ids)} vs {len(ref.token_ids)} tokens"
    candidates = sorted(ref.top[i].items(), key=lambda kv: -kv[1]) if i < len(ref.top) else []
    if (len(candidates) >= 2 and candidates[0][1] == candidates[1][1]
            and got.token_ids[i] in (candidates[0][0], candidates[1][0])):
        return True, f"tie at token {i} (logprob {candidates[0][1]:.6f}), then diverges"
    return False, (f"token {i}: got {got.token_ids[i]}, reference {ref.token_ids[i]} "
                   f"(reference top-2: {candidates[:2]})")


# ---------------------------------------------------------------------------- connector metrics
def scrape(url: str) -> dict[str, float]:
    """Prometheus text from `url`/metrics, summed per sample name over all label sets."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


@dataclass(frozen=True)
class TransferTotals:
    bytes_sent: float
    bytes_received: float
    transfers: float
    exposed_sum_s: float
    exposed_count: float

    def minus(self, earlier: TransferTotals) -> TransferTotals:
        """What happened since `earlier` (counters only grow)."""
        return TransferTotals(*(a - b for a, b in zip(
            dataclasses.astuple(self), dataclasses.astuple(earlier), strict=True)))

    @property
    def exposed_avg_s(self) -> float:
        return self.exposed_sum_s / self.exposed_count if self.exposed_count else float("nan")


def transfer_totals(urls: Sequence[str]) -> TransferTotals:
    metrics = [scrape(u) for u in urls]

    def total(name: str) -> float:
        return sum(m.get(name, 0.0) + m.get(f"{name}_total", 0.0) for m in metrics)

    return TransferTotals(
        bytes_sent=total("vllm:mooncake_bytes_sent"),
        bytes_received=total("vllm:mooncake_bytes_received"),
        transfers=total("vllm:mooncake_transfers_sent"),
        exposed_sum_s=total("vllm:mooncake_exposed_seconds_sum"),
        exposed_count=total("vllm:mooncake_exposed_seconds_count"),
    )


def wait_for_transfers(urls: Sequence[str], expected: int, timeout_s: float) -> TransferTotals:
    """vLLM publishes connector stats with its periodic stats; wait until every request's
    transfer is counted (or the deadline passes: then the table shows what was counted)."""
    deadline = time.monotonic() + timeout_s
    totals = transfer_totals(urls)
    while totals.transfers < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        totals = transfer_totals(urls)
    return totals


# ---------------------------------------------------------------------------- the run
@dataclass
class DemoResult:
    rows: list[tuple[str, Completion, Completion, bool, str]]
    totals: TransferTotals

    @property
    def all_match(self) -> bool:
        return all(ok for _, _, _, ok, _ in self.rows)


def print_report(result: DemoResult, stream: Any = sys.stdout) -> None:
    p = lambda s="": print(s, file=stream)  # noqa: E731
    p()
    for i, (prompt, got, ref, ok, note) in enumerate(result.rows, 1):
        p(f"[{i}] {prompt!r}")
        p(f"    P/D:    {got.text!r}")
        if got.token_ids != ref.token_ids:
            p(f"    single: {ref.text!r}")
        p(f"    {'MATCH' if ok else 'MISMATCH'} ({note})")
    p()
    header = (f"{'#':>2}  {'prompt tok':>10}  {'out tok':>7}  {'TTFT P/D':>9}  "
              f"{'TTFT single':>11}  {'tok/s P/D':>9}  {'tok/s single':>12}  match")
    p(header)
    p("-" * len(header))
    for i, (_, got, ref, ok, _) in enumerate(result.rows, 1):
        p(f"{i:>2}  {got.prompt_tokens:>10}  {len(got.token_ids):>7}  "
          f"{got.ttft_s * 1e3:>7.1f}ms  {ref.ttft_s * 1e3:>9.1f}ms  "
          f"{got.decode_tokens_per_s:>9.1f}  {ref.decode_tokens_per_s:>12.1f}  "
          f"{'yes' if ok else 'NO'}")
    t = result.totals
    p("-" * len(header))
    p(f"KV moved prefill -> decode: {t.bytes_sent / 2**20:.2f} MiB sent, "
      f"{t.bytes_received / 2**20:.2f} MiB received, {t.transfers:.0f} transfers")
    exposed = (f"{t.exposed_avg_s * 1e3:.2f} ms average over {t.exposed_count:.0f} requests"
               if t.exposed_count else "not reported")
    p(f"exposed transfer time (end of prefill forward pass -> decode has every layer): "
      f"{exposed}")
    n_ok = sum(ok for *_, ok, _ in result.rows)
    p(f"{n_ok}/{len(result.rows)} answers match the single vLLM instance")


def run_demo(model: str, workdir: Path, *, prompts: Sequence[str], max_tokens: int,
             metadata: str, progress: Progress, startup_timeout_s: float,
             request_timeout_s: float) -> DemoResult:
    stack = contextlib.ExitStack()
    try:
        connector_extra: dict[str, Any] = {}
        proxy_args: list[str]
        if metadata == "etcd":
            from mooncake_vllm.testing.etcd_server import EtcdServer

            progress.say("starting etcd")
            etcd = EtcdServer(workdir / "etcd").start()
            stack.callback(etcd.stop)
            progress.say(f"etcd ready at {etcd.url}")
            connector_extra["metadata_server"] = etcd.url

        def instance(name: str, role: str | None, cpus: list[int] | None) -> VllmServer:
            port = free_port()
            kv = None
            if role is not None:
                extra = {**connector_extra, "advertise_url": f"http://127.0.0.1:{port}"}
                kv = {"kv_connector": CONNECTOR, "kv_role": role,
                      "kv_connector_extra_config": extra}
            return VllmServer(model, port=port, kv_transfer_config=kv, name=name,
                              cpus=cpus, log_path=workdir / f"{name}.log")

        # vLLM's CPU backend binds its OpenMP threads to cores; left to itself every engine
        # picks the same ones and P and D fight. P and D get a core each, as on a real
        # cluster they get a machine each; the reference (idle while they work) gets both.
        ncpu = len(os.sched_getaffinity(0))
        cores = (([0], [1], [0, 1]) if ncpu >= 2 else (None, None, None))
        prefill = instance("prefill", "kv_producer", cores[0])
        decode = instance("decode", "kv_consumer", cores[1])
        single = instance("single", None, cores[2])
        servers = (prefill, decode, single)
        stack.callback(stop_in_parallel, servers)
        for server in servers:
            server.start()
        progress.say(f"started 3 vLLM engines (prefill, decode, single reference) on {model}; "
                     f"logs in {workdir}")
        wait_all_ready(servers, progress, startup_timeout_s)

        if metadata == "etcd":
            proxy_args = ["--metadata-server", connector_extra["metadata_server"]]
        else:
            proxy_args = ["--prefill", prefill.url, "--decode", decode.url]
        conductor = ConductorProcess(proxy_args, log_path=workdir / "conductor.log")
        stack.callback(conductor.stop)
        conductor.start(timeout_s=60).wait_healthy(timeout_s=60)
        progress.say(f"conductor ready at {conductor.url} ({' '.join(proxy_args)})")

        # The first request of an engine pays one-off costs (kernel selection, allocator
        # growth) worth seconds on a CPU: pay them outside the table. The conductor may also
        # need a moment to discover both instances in etcd.
        progress.say("warm-up request through the conductor and to the single instance")
        _through_conductor(conductor.url, model, WARMUP_PROMPT, 4, request_timeout_s, 60.0)
        stream_completion(single.url, model, WARMUP_PROMPT, 4, request_timeout_s)
        baseline = wait_for_transfers([prefill.url, decode.url], 1, timeout_s=15)

        rows = []
        for i, prompt in enumerate(prompts, 1):
            progress.say(f"prompt {i}/{len(prompts)}: {prompt!r}")
            got = stream_completion(conductor.url, model, prompt, max_tokens, request_timeout_s)
            ref = stream_completion(single.url, model, prompt, max_tokens, request_timeout_s)
            ok, note = compare(got, ref)
            rows.append((prompt, got, ref, ok, note))
        totals = wait_for_transfers([prefill.url, decode.url],
                                    int(baseline.transfers) + len(prompts), timeout_s=15)
        return DemoResult(rows, totals.minus(baseline))
    finally:
        progress.say("stopping everything")
        with _signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            stack.close()
        progress.say("stopped")


def _through_conductor(url: str, model: str, prompt: str, max_tokens: int,
                       timeout_s: float, retry_s: float) -> Completion:
    """A request that is retried for `retry_s` while the conductor answers with an error
    (before it has discovered both instances in etcd, it has nowhere to send it)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return stream_completion(url, model, prompt, max_tokens, timeout_s)
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` stops what it
    started (SIGINT too: a shell that starts us in the background leaves it ignored)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: dict[int, Callable[..., Any] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _default_model(progress: Progress) -> str:
    from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model

    path = default_model_dir()
    progress.say(f"tiny model: {path} (made once, then reused)")
    return str(make_tiny_model(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mooncake-vllm demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="model directory (or hub name); default: the hub-free tiny Llama")
    parser.add_argument("--metadata", choices=("etcd", "p2p"), default="etcd",
                        help="etcd: instances register and the conductor discovers them; "
                             "p2p: no store, the conductor is given the URLs")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt to send (repeatable); default: a built-in handful")
    parser.add_argument("--workdir", default=None, help="logs and etcd data (default: a temp dir)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)

    progress = Progress()
    # Logs stay on failure (they say why); a temporary work dir is removed on success.
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mooncake-vllm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with _signals_as_interrupt():
            model = args.model or _default_model(progress)
            result = run_demo(
                model, workdir, prompts=args.prompt or PROMPTS,
                max_tokens=args.max_tokens, metadata=args.metadata, progress=progress,
                startup_timeout_s=args.startup_timeout, request_timeout_s=args.request_timeout)
        print_report(result)
    except KeyboardInterrupt:
        progress.say(f"interrupted; everything started has been stopped (logs in {workdir})")
        return EXIT_INTERRUPTED
    except LaunchError as e:
        progress.say(f"the stack did not come up: {e}\n(logs in {workdir})")
        return EXIT_STARTUP
    if not result.all_match:
        progress.say(f"FAILED: the disaggregated answers differ from the single instance's "
                     f"(logs in {workdir})")
        return EXIT_MISMATCH
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    progress.say("OK: disaggregated prefill/decode answers equal the single instance's")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
