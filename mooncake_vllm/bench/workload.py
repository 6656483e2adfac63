"""`bench serve`'s requests and client: random token-id prompts, fixed and Poisson schedules,
one streaming client per request, and the per-scenario summary."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

FIRST_ORDINARY_TOKEN = 4  # the tiny model's special tokens are ids 0..3


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    send_at_s: float = 0.0  # offset from the scenario's start; nan: after the previous one


@dataclass
class Outcome:
    status: int = 0  # HTTP status; 0: no answer (connection error, timeout)
    ttft_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency_s: float = math.nan
    error: str = ""

    @property
    def rejected(self) -> bool:
        """Refused by the front door's early rejection (503), as opposed to failed."""
        return self.status == 503

    @property
    def mean_itl_s(self) -> float:
        """Time per output token after the first (TPOT); nan with fewer than two tokens."""
        if self.error or self.output_tokens < 2:
            return math.nan
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


class PromptMaker:
    """Random token-id prompts of exact lengths; random ids over a 2048-token vocabulary make
    two prompts sharing a cached prefix block practically impossible."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab_size

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(FIRST_ORDINARY_TOKEN, self.vocab) for _ in range(n)]


def fixed_scenario(make: PromptMaker, prompt_len: int, count: int, max_tokens: int,
                   concurrent: bool) -> list[Request]:
    at = 0.0 if concurrent else math.nan
    return [Request(make(prompt_len), max_tokens, at) for _ in range(count)]


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Send offsets (s) of `count` requests arriving as a Poisson process of `rate` per second:
    the first at 0, then exponential gaps of mean 1/rate."""
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def mixed_requests(make: PromptMaker, offsets: Sequence[float], prompt_range: tuple[int, int],
                   output_range: tuple[int, int], seed: int) -> list[Request]:
    """One request per offset, prompt and output lengths uniform in their (inclusive) ranges."""
    rng = random.Random(seed)
    return [Request(make(rng.randint(*prompt_range)), rng.randint(*output_range), at)
            for at in offsets]


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
            out.status = resp.status
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
                # the mean ITL (TPOT) is per token.
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
    """Send `requests` (at their offsets, or one after another) and return the outcomes, in
    the order of `requests`, and the makespan (first send to last answer)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        pending: list[Outcome | asyncio.Task[Outcome]] = []
        for req in requests:
            if math.isnan(req.send_at_s):
                pending.append(await one_request(session, url, model, req, timeout_s))
                continue
            delay = t0 + req.send_at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one_request(session, url, model, req, timeout_s)))
        outcomes = [p if isinstance(p, Outcome) else await p for p in pending]
        return outcomes, time.perf_counter() - t0


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rounded(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in summary.items()}


def summarise(outcomes: Sequence[Outcome], makespan_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if not o.error]
    ttft = [o.ttft_s for o in ok]
    itl = [x for o in ok for x in o.itl_s]
    tokens = sum(o.output_tokens for o in ok)
    tpot = [o.mean_itl_s for o in ok if o.output_tokens > 1]
    rejected = sum(o.rejected for o in outcomes)
    summary: dict[str, Any] = {
        "requests": len(outcomes), "rejected": rejected,
        "failed": len(outcomes) - len(ok) - rejected,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "output_tokens_per_s": tokens / makespan_s if makespan_s > 0 else math.nan,
        "requests_per_s": len(ok) / makespan_s if makespan_s > 0 else math.nan,
        "makespan_s": makespan_s,
    }
    if len(ok) < len(outcomes):
        summary["errors"] = sorted({o.error for o in outcomes if o.error})[:3]
    return rounded(summary)
