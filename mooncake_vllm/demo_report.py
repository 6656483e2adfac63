"""What the demo measures and how it tells a newcomer: streamed requests with token ids, the
comparison with the single instance, the conductor's path per request, each request's KV
transfer from the prefill instance's log, and the report with what its numbers mean."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


# ---------------------------------------------------------------------------- what happened
@dataclass(frozen=True)
class Transfer:
    """One request's KV transfer, as the prefill instance logged it."""

    bytes: int
    writing_s: float  # first write posted -> last write complete
    exposed_s: float  # end of P's forward pass -> last write complete (D holds every layer)

    @property
    def writing_after_forward_s(self) -> float:
        """The part of `exposed_s` after the first write was posted: writes under way."""
        return min(self.exposed_s, self.writing_s)

    @property
    def waiting_for_decode_s(self) -> float:
        """The rest of `exposed_s`: the forward pass was over before D asked for the KV
        (its registration: where to write), so nothing could be written meanwhile."""
        return self.exposed_s - self.writing_after_forward_s


DONE_LINE = re.compile(r"mooncake transfer \S+ done: request=\S+ bytes=(\d+) blocks=\d+ "
                       r"transfer_s=([\d.]+) exposed_s=([\d.]+)")


class TransferLog:
    """The transfers a prefill instance logged since the last look."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def new(self) -> list[Transfer]:
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        # Only whole lines: a line still being written is read next time.
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return [Transfer(int(m[1]), float(m[2]), float(m[3]))
                for m in DONE_LINE.finditer(chunk[:end].decode(errors="replace"))]

    def wait_new(self, expected: int, timeout_s: float) -> list[Transfer]:
        """At least `expected` new transfers, or what arrived by the deadline."""
        deadline = time.monotonic() + timeout_s
        found = self.new()
        while len(found) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            found += self.new()
        return found


# ---------------------------------------------------------------------------- the report
@dataclass
class Row:
    prompt: str
    got: Completion
    ref: Completion
    path: str
    transfers: list[Transfer]
    conductor: str = "defaults"  # which conductor served it: "defaults" or "always P/D"

    @property
    def match(self) -> tuple[bool, str]:
        return compare(self.got, self.ref)


@dataclass
class PoolHit:
    """The KV pool step: a prompt answered again after both instances' caches were emptied."""

    row: Row
    tokens_loaded: int  # prompt tokens the prefill instance read from the pool


@dataclass
class DemoResult:
    rows: list[Row]
    kv_bytes_received: float  # decode's counter: what arrived, to set beside what P sent
    cores: str  # where each instance ran, in words
    pd_cpu_during_reference_s: float
    reference_cpu_during_pd_s: float
    reference_run_s: float  # wall time of the reference's run, then of P and D's
    pd_run_s: float
    threads_checked: int = 0  # threads of the confined instances, looked at after the run
    threads_off_their_cores: list[str] = field(default_factory=list)
    pool: PoolHit | None = None

    @property
    def all_match(self) -> bool:
        rows = self.rows + ([self.pool.row] if self.pool is not None else [])
        return all(r.match[0] for r in rows)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}ms"


CONDUCTOR_TITLES = {
    "defaults": "The conductor with its defaults (no tuning flag) chose a path per prompt:",
    "always P/D": "The same prompts (each after a prefix of its own) through a conductor that "
                  "disaggregates every one (--local-prefill-max-tokens 0 "
                  "--pipeline-prefill-min-tokens 0):",
}


def print_report(result: DemoResult, stream: Any = sys.stdout) -> None:
    p = lambda s="": print(s, file=stream)  # noqa: E731
    p()
    for i, row in enumerate(result.rows, 1):
        ok, note = row.match
        shown = row.prompt if len(row.prompt) <= 70 else row.prompt[:67] + "..."
        p(f"[{i}] {shown!r}")
        p(f"    P/D:    {row.got.text!r}")
        if row.got.token_ids != row.ref.token_ids:
            p(f"    single: {row.ref.text!r}")
        p(f"    {'MATCH' if ok else 'MISMATCH'} ({note})")
    header = (f"{'#':>2}  {'prompt tok':>10}  {'path':<14}  {'TTFT P/D':>9}  {'TTFT single':>11}"
              f"  {'tok/s P/D':>9}  {'tok/s single':>12}  {'KV exposed':>10}  match")
    for name, title in CONDUCTOR_TITLES.items():
        numbered = [(i, row) for i, row in enumerate(result.rows, 1) if row.conductor == name]
        if not numbered:
            continue
        p()
        p(title)
        p(header)
        p("-" * len(header))
        for i, row in numbered:
            got, ref = row.got, row.ref
            exposed = _ms(sum(t.exposed_s for t in row.transfers)) if row.transfers else "-"
            p(f"{i:>2}  {got.prompt_tokens:>10}  {row.path:<14}  {_ms(got.ttft_s):>9}  "
              f"{_ms(ref.ttft_s):>11}  {got.decode_tokens_per_s:>9.1f}  "
              f"{ref.decode_tokens_per_s:>12.1f}  {exposed:>10}  "
              f"{'yes' if row.match[0] else 'NO'}")
        p("-" * len(header))
    transfers = [t for row in result.rows for t in row.transfers]
    sent = sum(t.bytes for t in transfers)
    p(f"KV moved prefill -> decode: {sent / 2**20:.2f} MiB sent, "
      f"{result.kv_bytes_received / 2**20:.2f} MiB received, {len(transfers)} transfers")
    if transfers:
        n = len(transfers)
        exposed = sum(t.exposed_s for t in transfers) / n
        waiting = sum(t.waiting_for_decode_s for t in transfers) / n
        p(f"exposed transfer time (end of prefill forward pass -> decode has every layer): "
          f"{exposed * 1e3:.2f} ms average over {n} requests: {waiting * 1e3:.2f} ms before "
          f"decode asked for the KV, {(exposed - waiting) * 1e3:.2f} ms with writes under way")
    if result.threads_checked:
        strays = result.threads_off_their_cores
        p(f"threads on their instance's cores: {result.threads_checked - len(strays)} of "
          f"{result.threads_checked}" + "".join(f"\n  {s}" for s in strays))
    n_ok = sum(r.match[0] for r in result.rows)
    p(f"{n_ok}/{len(result.rows)} answers match the single vLLM instance")
    if result.pool is not None:
        hit = result.pool
        p(f"KV pool: prompt of {hit.row.got.prompt_tokens} tokens asked again with both "
          f"instances' prefix caches emptied: {hit.tokens_loaded} tokens of its KV read back "
          f"from the pool (one store node), TTFT {_ms(hit.row.got.ttft_s)}, answer "
          f"{'MATCH' if hit.row.match[0] else 'MISMATCH'} ({hit.row.match[1]})")
    p()
    for paragraph in explain(result):
        p(paragraph)


def explain(result: DemoResult) -> list[str]:
    """What the numbers mean, for someone who sees them for the first time."""
    lines = [
        "What this shows:",
        "- The model is a tiny Llama with random weights, so its text is noise. The point is "
        "equality: greedy decoding on the decode instance, from KV computed by the prefill "
        "instance and moved over the transfer engine, gives the single instance's tokens.",
        f"- Cores: {result.cores}. The single instance answered first, then the conductor "
        "with prefill and decode; each side idled during the other's run but for health "
        "checks and metrics scrapes (prefill and decode used "
        f"{result.pd_cpu_during_reference_s:.2f} s of CPU in the reference's "
        f"{result.reference_run_s:.1f} s, the reference "
        f"{result.reference_cpu_during_pd_s:.2f} s in their {result.pd_run_s:.1f} s). "
        "The single instance splits every operation over both cores, which meet after "
        "each: where other programs use these cores too, it waits for the busier one, and "
        "timings vary from run to run.",
        "- path: what the conductor, started with no tuning flag, chose for each request: "
        "disaggregated (P prefills, the KV moves, D decodes), local (D alone: for a short "
        "prompt, prefilling costs less than a hand-off), pipelined (P and D prefill one long "
        "prompt together, layer by layer). It predicts each path's time to first token and "
        "the inter-token latency D's running requests would see; with D idle, as here, "
        "a prefill on D costs nobody anything, so prompts too short to gain from splitting "
        "stay local. Disaggregation pays off when D is busy decoding others, whose tokens "
        "would otherwise wait behind the prefill: the second table forces it, to show the "
        "KV moving and the answers staying equal. TTFT through the conductor also pays its "
        "HTTP hop.",
        "- KV exposed: from the end of the prefill's forward pass until its last write to "
        "the decode instance has landed, i.e. transfer time that computing did not hide. "
        "Layers are written while later layers compute, so for a long prompt whose decode "
        "registration (where to write) arrived first it is close to zero, as in "
        "`mooncake-vllm bench layerwise` (2048 tokens, the decode half sent first).",
    ]
    short = [row for row in result.rows if row.transfers and row.got.prompt_tokens < 256]
    if short:
        kib = min(t.bytes for row in short for t in row.transfers) / 1024
        lines.append(
            f"  A short prompt's KV is small ({kib:.0f} KiB for the smallest here, which the "
            "engine moves in well under a millisecond: `mooncake-vllm bench transfer`); what "
            "its exposed time holds is waiting: for the decode instance to ask for the KV "
            "when the forward pass ended first (the 'before decode asked' part above), and for "
            "the threads that post, receive and acknowledge the writes to get their turn on "
            "the one core (and the Python interpreter) that each instance's engine uses too.")
    if result.pool is not None:
        lines.append(
            "- KV pool: the instances saved every full block they computed to a store node "
            "(`mooncake-vllm store`: DRAM, read and written one-sided by the transfer engine). "
            "With their own prefix caches emptied, the prefill instance read the prompt's "
            "blocks back from it instead of computing them; the last block, and the last "
            "token, are always computed.")
    if not any(row.transfers for row in result.rows):
        lines.append("  No request moved KV here: every prompt was served on the decode "
                     "instance alone.")
    return lines
