"""Helpers for the connector tests: kv-transfer configs, P/D request pairs, output equality."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mooncake_vllm.security import sign_transfer_params
from mooncake_vllm.testing.vllm_server import VllmServer, post_json


def kv_config(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "MooncakeVllmConnector", "kv_role": role,
            "kv_connector_extra_config": extra}


def prompt_ids(n: int, seed: int) -> list[int]:
    """n token ids, away from the special tokens at the start of the vocabulary."""
    return [int(t) for t in np.random.default_rng(seed).integers(100, 2000, size=n)]


def completion(server: VllmServer, prompt: list[int], max_tokens: int,
               kv: dict[str, Any] | None = None, timeout_s: float = 180.0) -> dict[str, Any]:
    body: dict[str, Any] = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0.0, "logprobs": 2, "ignore_eos": True}
    if kv is not None:
        body["kv_transfer_params"] = kv
    return post_json(server.url + "/v1/completions", body, timeout_s=timeout_s)


def probe_remote_control(prefill: VllmServer, token: str | None = None) -> dict[str, Any]:
    out = completion(prefill, [7], 1, sign_transfer_params(
        token, {"do_remote_decode": True, "probe": True}))
    rc = (out.get("kv_transfer_params") or {}).get("remote_control")
    assert isinstance(rc, dict) and rc.get("control"), f"probe answered {out}"
    return rc


def pd_completion(prefill: VllmServer, decode: VllmServer, rc: dict[str, Any],
                  prompt: list[int], max_tokens: int,
                  pipeline_tokens: int = 0, token: str | None = None) -> dict[str, Any]:
    """The proxy's two halves, sent at the same time; returns the decode answer. Pipelined
    (`pipeline_tokens` > 0): P gets only the prompt's head, as the conductor sends it. With a
    cluster token both halves' parameters are signed, as the conductor signs them."""
    tid = uuid.uuid4().hex
    d_kv: dict[str, Any] = {"do_remote_prefill": True, "transfer_id": tid, "remote_control": rc}
    if pipeline_tokens:
        d_kv["pipeline_tokens"] = pipeline_tokens
    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(completion, prefill, prompt[:pipeline_tokens or len(prompt)], 1,
                        sign_transfer_params(token, {"do_remote_decode": True,
                                                     "transfer_id": tid}))
        d = pool.submit(completion, decode, prompt, max_tokens,
                        sign_transfer_params(token, d_kv))
        p_out = p.result()
        assert (p_out.get("kv_transfer_params") or {}).get("remote_control") == rc
        return d.result()


def assert_same_greedy(ref: dict[str, Any], got: dict[str, Any]) -> None:
    """Token for token; only a first divergence at an exact top-1/top-2 tie is forgiven."""
    r, g = ref["choices"][0]["logprobs"], got["choices"][0]["logprobs"]
    rt, gt = r["tokens"], g["tokens"]
    assert len(rt) == len(gt), f"lengths differ: {len(rt)} vs {len(gt)}"
    for i, (a, b) in enumerate(zip(rt, gt, strict=True)):
        if a == b:
            continue
        top = sorted(r["top_logprobs"][i].values(), reverse=True)
        assert len(top) >= 2 and top[0] == top[1], (
            f"first divergence at token {i}: {a!r} vs {b!r} is not an exact tie "
            f"(top logprobs {top}); reference {ref['choices'][0]['text']!r}, "
            f"got {got['choices'][0]['text']!r}")
        return


def metrics(server: VllmServer) -> dict[str, float]:
    """Prometheus samples (summed over labels) by name."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$", line)
        if m and m.group(3) != "NaN":
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def wait_for(predicate: Any, timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    end = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def kv_usage(server: VllmServer) -> float:
    return metrics(server).get("vllm:kv_cache_usage_perc", -1.0)


def log_text(server: VllmServer) -> str:
    return server.log_path.read_text(errors="replace")


def dumps(x: Any) -> str:
    return json.dumps(x, indent=1)[:2000]


def start_all(*servers: VllmServer, timeout_s: float = 420.0) -> None:
    """Start servers together (their start-ups overlap), wait for all; stop all on failure."""
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout_s)
    except BaseException:
        for s in servers:
            s.stop()
        raise
