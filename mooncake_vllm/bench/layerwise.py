"""Layer-wise push: how much KV transfer time is left exposed after the prefill forward pass.

One prefill/decode pair of real `vllm serve` processes (tiny 16-layer model, TCP engine,
p2p metadata) serves one request with a 2048-token prompt. The prefill worker reports:

  exposed_s         end of its forward pass -> the decode side holding every layer
                    (layers are written while later layers are still being computed)
  non_overlapped_s  the same writes, all posted after the forward pass and timed to the end,
                    measured in the same run before the decode side is told "done"
  kv_bytes          bytes written

The decode half is sent a moment before the prefill half so that its registration is there
when the forward pass starts (as when a proxy's two requests reach idle instances).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mooncake_vllm.bench import results
from mooncake_vllm.connector.stats import NON_OVERLAPPED_ENV
from mooncake_vllm.testing.tiny_model import TinyModelSpec, make_tiny_model
from mooncake_vllm.testing.vllm_server import VllmServer, post_json

PROMPT_TOKENS = 2048


def _kv(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "MooncakeVllmConnector", "kv_role": role,
            "kv_connector_extra_config": extra}


def _complete(server: VllmServer, prompt: list[int], max_tokens: int,
              kv: dict[str, Any]) -> dict[str, Any]:
    return post_json(server.url + "/v1/completions",
                     {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0.0, "kv_transfer_params": kv}, timeout_s=300)


def _pair(p: VllmServer, d: VllmServer, rc: dict[str, Any], prompt: list[int]) -> str:
    tid = uuid.uuid4().hex
    with ThreadPoolExecutor(2) as pool:
        fd = pool.submit(_complete, d, prompt, 4, {"do_remote_prefill": True, "transfer_id": tid,
                                                   "remote_control": rc})
        time.sleep(1.0)
        fp = pool.submit(_complete, p, prompt, 1, {"do_remote_decode": True, "transfer_id": tid})
        fp.result()
        fd.result()
    return tid


def _report(p: VllmServer, tid: str, timeout_s: float = 30.0) -> dict[str, float]:
    pat = re.compile(rf"mooncake transfer {tid} done: .*?bytes=(\d+) .*?exposed_s=([\d.]+) "
                     r"non_overlapped_s=([\d.]+)")
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = pat.search(p.log_path.read_text(errors="replace"))
        if m:
            return {"exposed_s": float(m.group(2)), "non_overlapped_s": float(m.group(3)),
                    "kv_bytes": int(m.group(1))}
        time.sleep(0.2)
    raise RuntimeError(f"prefill log {p.log_path} has no report for transfer {tid}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench layerwise")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object and keep it in the results folder")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="keep model and logs here")
    results.add_arguments(ap)
    args = ap.parse_args(argv)
    started, host = results.started_at(), results.host_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mooncake-layerwise-"))
    model = make_tiny_model(work / "model", TinyModelSpec(num_hidden_layers=args.layers))
    common = ["--max-num-batched-tokens", str(PROMPT_TOKENS + 64)]  # one forward pass
    # One core each: two-thread OpenMP teams spin at barriers and crawl when the host is
    # oversubscribed, which would measure the host rather than the transfer.
    p = VllmServer(model, name="prefill", log_path=work / "prefill.log", extra_args=common,
                   cpus=[0], pin_process=True, env={NON_OVERLAPPED_ENV: "1"},
                   kv_transfer_config=_kv("kv_producer", registration_timeout_s=600))
    d = VllmServer(model, name="decode", log_path=work / "decode.log", extra_args=common,
                   cpus=[1 % (os.cpu_count() or 1)], pin_process=True,
                   kv_transfer_config=_kv("kv_consumer", transfer_timeout_s=600))
    try:
        p.start()
        d.start()
        p.wait_ready(420)
        d.wait_ready(420)
        probe = _complete(p, [7], 1, {"do_remote_decode": True, "probe": True})
        rc = probe["kv_transfer_params"]["remote_control"]
        _pair(p, d, rc, [100 + i % 1500 for i in range(64)])  # warm-up: connections, paths
        prompt = [100 + (i * 7919) % 1900 for i in range(PROMPT_TOKENS)]
        result = _report(p, _pair(p, d, rc, prompt))
    finally:
        p.stop()
        d.stop()
    kept: dict[str, Any] = {**result, "confinement": {
        s.name: s.process.confinement_note if s.process else "not started" for s in (p, d)}}
    if args.json:
        path = results.write_result("layerwise", kept, started, host, args.note,
                                    args.results_dir)
        print(json.dumps(kept))
        print(f"kept in {path}", file=sys.stderr)
    else:
        ratio = result["exposed_s"] / max(result["non_overlapped_s"], 1e-9)
        print(f"KV bytes {result['kv_bytes']}: exposed {result['exposed_s'] * 1e3:.2f} ms, "
              f"sent after the forward pass {result['non_overlapped_s'] * 1e3:.2f} ms "
              f"(exposed / non-overlapped = {ratio:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
