"""Without --tokenizer, a text prompt long enough to be pipelined gets its exact token ids from
the decode instance's /tokenize; when that fails it is served on the text path, whole, and the
failure is counted. Stand-in instances on real sockets, the conductor in this process."""

from __future__ import annotations

import asyncio

import aiohttp
from fake_upstream import MODEL, FakeInstance, conductor_at, rc_for

from mooncake_vllm.proxy.config import ProxyConfig

PROMPT = "Pipelines overlap the two halves of a prefill. " * 160  # ~1900 tokens estimated
IDS = [(i * 7) % 2000 + 20 for i in range(1900)]


async def _serve(token_ids: list[int] | None) -> tuple[FakeInstance, FakeInstance, str]:
    p, d = FakeInstance(remote_control=rc_for(7001)), FakeInstance(token_ids=token_ids)
    await p.start()
    await d.start()
    cfg = ProxyConfig(port=0, prefill_urls=(p.url,), decode_urls=(d.url,), warmup_tokens=0)
    try:
        async with conductor_at(cfg) as (url, c):
            async with aiohttp.ClientSession() as s, s.post(
                    url + "/v1/completions",
                    json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4}) as r:
                assert r.status == 200, await r.text()
            metrics = c.metrics.render().decode()
    finally:
        await p.stop()
        await d.stop()
    return p, d, metrics


def test_text_prompt_pipelined_with_ids_from_tokenize() -> None:
    p, d, metrics = asyncio.run(_serve(IDS))
    asked = [s.body for s in d.seen if s.path == "/tokenize"]
    assert asked == [{"prompt": PROMPT, "model": MODEL}]
    (p_half,) = [s.body for s in p.generation() if not s.body[
        "kv_transfer_params"].get("probe")]
    (d_half,) = [s.body for s in d.generation()]
    head = d_half["kv_transfer_params"]["pipeline_tokens"]
    assert 0 < head < len(IDS) and head % 32 == 0
    assert p_half["prompt"] == IDS[:head] and d_half["prompt"] == IDS
    assert 'mooncake_proxy_tokenize_calls_total{outcome="ok"} 1.0' in metrics
    assert 'mooncake_proxy_path_decisions_total{path="pipelined"} 1.0' in metrics


def test_failed_tokenize_leaves_the_request_on_the_text_path() -> None:
    p, d, metrics = asyncio.run(_serve(None))
    assert [s.path for s in d.seen if s.path == "/tokenize"] == ["/tokenize"]
    served = [s.body for s in (*p.generation(), *d.generation())
              if not (s.body.get("kv_transfer_params") or {}).get("probe")]
    assert served and all(b["prompt"] == PROMPT for b in served)  # whole, as text
    assert all("pipeline_tokens" not in (b.get("kv_transfer_params") or {}) for b in served)
    assert 'mooncake_proxy_tokenize_calls_total{outcome="failed"} 1.0' in metrics
