"""Failures end in a known state: prefill killed (fail / recompute policy), layout mismatch."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.testing.vllm_server import VllmServer

from .pd import (
    assert_same_greedy,
    completion,
    kv_config,
    kv_usage,
    log_text,
    pd_completion,
    probe_remote_control,
    prompt_ids,
    start_all,
    wait_for,
)

pytestmark = pytest.mark.vllm

SHORT = {"transfer_timeout_s": 6, "engine_timeout_s": 3, "pipeline_silence_timeout_s": 2}


@pytest.fixture(scope="module")
def servers(tiny_model: Path, logs_dir: Path) -> Iterator[dict[str, VllmServer]]:
    s = {
        "prefill": VllmServer(tiny_model, name="prefill", log_path=logs_dir / "f-prefill.log",
                              kv_transfer_config=kv_config("kv_producer", engine_timeout_s=3)),
        "fail": VllmServer(tiny_model, name="decode-fail", log_path=logs_dir / "f-fail.log",
                           kv_transfer_config=kv_config("kv_consumer", **SHORT)),
        "recompute": VllmServer(
            tiny_model, name="decode-recompute", log_path=logs_dir / "f-recompute.log",
            kv_transfer_config={**kv_config("kv_consumer", **SHORT),
                                "kv_load_failure_policy": "recompute"}),
        "bs64": VllmServer(tiny_model, name="decode-bs64", log_path=logs_dir / "f-bs64.log",
                           kv_transfer_config=kv_config("kv_consumer", **SHORT),
                           extra_args=["--block-size", "64"]),
    }
    start_all(*s.values())
    try:
        yield s
    finally:
        for v in s.values():
            v.stop()


def test_layout_mismatch_is_refused_naming_both_values(servers: dict) -> None:
    p, d = servers["prefill"], servers["bs64"]
    rc = probe_remote_control(p)
    with pytest.raises(RuntimeError):
        pd_completion(p, d, rc, prompt_ids(100, seed=21), 4)
    msg = "block_size is 32 on prefill but 64 on decode"
    wait_for(lambda: msg in log_text(p) and msg in log_text(d), 20, "refusal logged on both")
    # Refused means released: nothing stays allocated on either side.
    wait_for(lambda: kv_usage(d) == 0.0 and kv_usage(p) == 0.0, 30, "both caches idle")


def test_pipelined_prefill_from_vanished_peer_ends_at_deadline(servers: dict) -> None:
    """A pipelined request whose prefill instance is gone (its control endpoint has nobody
    behind it): D's forward pass waits for layer 0 until P has been silent for
    pipeline_silence_timeout_s (a live P repeats its progress), then the load fails: an error
    under the fail policy, a local recompute under the other. Neither hangs, and the decode
    instance serves the next request."""
    dfail, drec = servers["fail"], servers["recompute"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = s.getsockname()[1]  # freed again on close: nobody listens there
    rc = {"v": 1, "engine_id": "gone", "instance_id": "gone", "tp_size": 1,
          "control": [f"tcp://127.0.0.1:{gone}"]}
    prompt = prompt_ids(200, seed=23)
    kv = {"do_remote_prefill": True, "remote_control": rc, "pipeline_tokens": 4 * 32}
    started = time.monotonic()
    with cf.ThreadPoolExecutor(2) as pool:
        f_fail = pool.submit(completion, dfail, prompt, 6, {**kv, "transfer_id": "pipe-gone-1"})
        f_rec = pool.submit(completion, drec, prompt, 6, {**kv, "transfer_id": "pipe-gone-2"})
        with pytest.raises(RuntimeError, match="500|error"):
            f_fail.result(timeout=60)
        recomputed = f_rec.result(timeout=60)
    assert time.monotonic() - started < 20
    for server, tid in ((dfail, "pipe-gone-1"), (drec, "pipe-gone-2")):
        wait_for(lambda s=server, t=tid: f"transfer {t}) failed: waiting for layer 0, no word "
                 "from the prefill instance for 2.0s" in log_text(s), 10,
                 "the load failure logged with its cause")
    assert_same_greedy(completion(drec, prompt, 6), recomputed)
    wait_for(lambda: kv_usage(dfail) == 0.0, 30, "failed decode released its blocks")
    completion(dfail, prompt_ids(40, seed=24), 3)  # still serving


def test_prefill_killed_fail_errors_recompute_answers(servers: dict) -> None:
    p, dfail, drec = servers["prefill"], servers["fail"], servers["recompute"]
    rc = probe_remote_control(p)
    prompt = prompt_ids(150, seed=22)
    # The decode halves register with P; P then dies before any prefill half arrives.
    kv = {"do_remote_prefill": True, "remote_control": rc}
    with cf.ThreadPoolExecutor(2) as pool:
        f_fail = pool.submit(completion, dfail, prompt, 8, {**kv, "transfer_id": "killed-1"})
        f_rec = pool.submit(completion, drec, prompt, 8, {**kv, "transfer_id": "killed-2"})
        time.sleep(3)  # both registrations reach P (and wait there for the prefill half)
        p.kill()
        with pytest.raises(RuntimeError, match="500|error"):
            f_fail.result(timeout=60)
        recomputed = f_rec.result(timeout=60)
    assert "killed-1" in log_text(dfail) and "did not complete the transfer" in log_text(dfail)
    assert "killed-2" in log_text(drec)
    # The recompute policy answered from a local prefill: equal to a plain request.
    assert_same_greedy(completion(drec, prompt, 8), recomputed)
    wait_for(lambda: kv_usage(dfail) == 0.0, 30, "failed decode released its blocks")
