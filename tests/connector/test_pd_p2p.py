"""Prefill + decode over the connector (p2p metadata, TCP engine) against a single instance.

Real `vllm serve` processes on the CPU. The reference is the prefill instance itself answering
the whole request (it is a plain vLLM instance for requests without kv_transfer_params), asked
after the P/D run so that the P/D run starts from cold caches.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mooncake_vllm.testing.vllm_server import VllmServer

from .pd import (
    assert_same_greedy,
    completion,
    kv_config,
    kv_usage,
    log_text,
    metrics,
    pd_completion,
    probe_remote_control,
    prompt_ids,
    start_all,
    wait_for,
)

pytestmark = pytest.mark.vllm

BLOCK = 32
CHUNK = 256  # max_num_batched_tokens on P: longer prompts are prefilled in chunks
LAYERS = 4
SILENCE_S = 5  # D's pipeline_silence_timeout_s here: a late head is waited for past it


@pytest.fixture(scope="module")
def pair(tiny_model: Path, logs_dir: Path) -> Iterator[tuple[VllmServer, VllmServer, dict]]:
    p = VllmServer(tiny_model, name="prefill", log_path=logs_dir / "p2p-prefill.log",
                   kv_transfer_config=kv_config("kv_producer", registration_timeout_s=8),
                   extra_args=["--max-num-batched-tokens", str(CHUNK)])
    d = VllmServer(tiny_model, name="decode", log_path=logs_dir / "p2p-decode.log",
                   kv_transfer_config=kv_config("kv_consumer", transfer_timeout_s=30,
                                                pipeline_silence_timeout_s=SILENCE_S))
    start_all(p, d)
    try:
        yield p, d, probe_remote_control(p)
    finally:
        p.stop()
        d.stop()


def test_probe_answer_carries_remote_control(pair: tuple) -> None:
    p, _, rc = pair
    assert rc["tp_size"] == 1 and rc["control"][0].startswith("tcp://127.0.0.1:")
    assert rc == probe_remote_control(p)


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK + 1, 2 * CHUNK + 77],
                         ids=["1-token", "block-minus-1", "block-plus-1", "chunked-prefill"])
def test_pd_equals_single_instance(pair: tuple, n: int) -> None:
    p, d, rc = pair
    prompt = prompt_ids(n, seed=n)
    got = pd_completion(p, d, rc, prompt, max_tokens=12)
    assert_same_greedy(completion(p, prompt, 12), got)


def test_eight_concurrent_requests(pair: tuple) -> None:
    p, d, rc = pair
    prompts = [prompt_ids(40 + 37 * i, seed=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda pr: pd_completion(p, d, rc, pr, 10), prompts))
    for pr, g in zip(prompts, got, strict=True):
        assert_same_greedy(completion(p, pr, 10), g)


def _blocks_sent(p: VllmServer) -> float:
    """P's blocks sent so far. Connector counters reach /metrics with an engine step, and an
    idle P may not step again after a transfer's last one: a one-token request (which sends
    nothing) makes it step first."""
    completion(p, [7], 1)
    return metrics(p).get("vllm:mooncake_blocks_sent_total", 0.0)


def test_shared_prefix_sends_only_what_decode_lacks(pair: tuple) -> None:
    p, d, rc = pair
    prefix = prompt_ids(10 * BLOCK, seed=7)
    a = prefix + prompt_ids(20, seed=8)
    b = prefix + prompt_ids(50, seed=9)
    assert_same_greedy(completion(p, a, 8), pd_completion(p, d, rc, a, 8))
    before = wait_for(lambda: _blocks_sent(p) or None, 30, "blocks counter")
    got = pd_completion(p, d, rc, b, 8)
    # D already holds the 10 prefix blocks (its own prefix cache): only the rest travels, and
    # P sends it although P had the prefix cached itself.
    want = (-(-len(b) // BLOCK) - 10) * LAYERS
    wait_for(lambda: _blocks_sent(p) - before == want, 30,
             f"{want} more blocks sent (layers x blocks decode lacked)")
    assert_same_greedy(completion(p, b, 8), got)


def test_decode_never_registers_prefill_frees_blocks(pair: tuple) -> None:
    p, _, _ = pair
    wait_for(lambda: kv_usage(p) == 0.0, 30, "idle prefill cache")
    out = completion(p, prompt_ids(300, seed=11), 1,
                     {"do_remote_decode": True, "transfer_id": "nobody-registers"})
    assert out["kv_transfer_params"]["transfer_id"] == "nobody-registers"
    # Held for the decode side that never comes, then freed at the deadline (8 s).
    wait_for(lambda: kv_usage(p) > 0.0, 5, "prefill blocks held", every_s=0.1)
    wait_for(lambda: kv_usage(p) == 0.0, 25, "prefill blocks freed")
    assert "nobody-registers" in log_text(p) and "decode never registered" in log_text(p)


def test_client_abort_on_decode_releases_both_sides(pair: tuple) -> None:
    p, d, rc = pair
    wait_for(lambda: kv_usage(d) == 0.0, 30, "idle decode cache")
    prompt = prompt_ids(200, seed=12)
    # Only the decode half: D registers and waits; the client gives up after 3 s.
    with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout, RuntimeError)):
        completion(d, prompt, 5, {"do_remote_prefill": True, "transfer_id": "client-gives-up",
                                  "remote_control": rc}, timeout_s=3)
    wait_for(lambda: "client-gives-up released by decode" in log_text(p), 30,
             "prefill told to release")
    wait_for(lambda: kv_usage(d) == 0.0, 30, "decode blocks freed")
    time.sleep(0.5)
    # Both sides are clean: the next request goes through.
    assert_same_greedy(completion(p, prompt, 6), pd_completion(p, d, rc, prompt, 6))


@pytest.mark.parametrize("n,head", [(200, 3 * BLOCK), (2 * CHUNK + 77, 9 * BLOCK)],
                         ids=["3-block-head", "head-chunked-on-prefill"])
def test_pipelined_prefill_equals_single_instance(pair: tuple, n: int, head: int) -> None:
    """P computes only the head (in chunks of CHUNK tokens in the second case) while D
    computes the rest, each of D's layers waiting for P's; only the head's blocks travel.
    Asked again, D holds the head itself (prefix cache): nothing travels, P is released."""
    p, d, rc = pair
    prompt = prompt_ids(n, seed=300 + n)
    before = _blocks_sent(p)
    failures = metrics(d).get("vllm:mooncake_failures_total", 0.0)
    got = pd_completion(p, d, rc, prompt, 10, pipeline_tokens=head)
    wait_for(lambda: _blocks_sent(p) - before == head // BLOCK * LAYERS, 30,
             "the head's blocks sent, layer by layer")
    assert_same_greedy(completion(p, prompt, 10), got)
    again = pd_completion(p, d, rc, prompt, 10, pipeline_tokens=head)
    assert_same_greedy(got, again)
    time.sleep(1)
    assert _blocks_sent(p) - before == head // BLOCK * LAYERS
    assert metrics(d).get("vllm:mooncake_failures_total", 0.0) == failures


def test_pipelined_load_waits_out_a_late_prefill_half(pair: tuple) -> None:
    """D's forward pass waits for a head that P has not even scheduled yet for longer than
    D's pipeline_silence_timeout_s (SILENCE_S here): P holds the early registration and keeps
    saying so, and the answer is still a single instance's."""
    p, d, rc = pair
    prompt, head, tid = prompt_ids(300, seed=77), 4 * BLOCK, uuid.uuid4().hex
    failures = metrics(d).get("vllm:mooncake_failures_total", 0.0)
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(completion, d, prompt, 6, {
            "do_remote_prefill": True, "transfer_id": tid, "remote_control": rc,
            "pipeline_tokens": head})
        time.sleep(SILENCE_S + 1.5)
        completion(p, prompt[:head], 1, {"do_remote_decode": True, "transfer_id": tid})
        out = got.result(timeout=60)
    assert_same_greedy(completion(p, prompt, 6), out)
    assert metrics(d).get("vllm:mooncake_failures_total", 0.0) == failures


def test_pipelined_request_waits_for_its_head_outside_decode_steps(pair: tuple) -> None:
    """With `pipeline_gate`, D holds a pipelined request back until P has started its head:
    while P has not even received the head, a request decoding on D keeps decoding (without
    the gate D's forward pass sits on layer 0 for the whole wait, and every decode on D
    stalls with it), and once P computes the head the answer is a single instance's.

    Counted, not timed: this VM's vCPUs are sometimes descheduled for seconds under load, so
    the check is that D decodes through the wait at all (hundreds of events with the gate,
    none without), not that no gap exceeds some bound."""
    p, d, rc = pair
    prompt, head, tid = prompt_ids(300, seed=78), 4 * BLOCK, uuid.uuid4().hex
    stamps: list[float] = []
    stop = threading.Event()

    def decode_alongside() -> None:  # a plain request on D, each streamed event timestamped
        body = {"model": d.model, "prompt": prompt_ids(20, seed=79), "max_tokens": 3000,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(d.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    stamps.append(time.monotonic())
                if stop.is_set():
                    return  # closing the stream aborts the request

    with ThreadPoolExecutor(2) as pool:
        alongside = pool.submit(decode_alongside)
        wait_for(lambda: len(stamps) > 5 or alongside.done(), 30, "a request decoding on D")
        waits = metrics(d).get("vllm:mooncake_pipeline_gate_waits_total", 0.0)
        got = pool.submit(completion, d, prompt, 6, {
            "do_remote_prefill": True, "transfer_id": tid, "remote_control": rc,
            "pipeline_tokens": head, "pipeline_gate": True})
        # Half a second for the request to reach D's scheduler (ungated, D's forward pass
        # blocks from then on), then 2.5 s during which P has not seen the head.
        counted_from = time.monotonic() + 0.5
        time.sleep(3.0)
        counted_to = time.monotonic()
        completion(p, prompt[:head], 1, {"do_remote_decode": True, "transfer_id": tid})
        out = got.result(timeout=60)
        stop.set()
        alongside.result(timeout=60)
    during = sum(counted_from <= s <= counted_to for s in stamps)
    print(f"decode events on D while the head was queued on P: {during} in 2.5s")
    assert during >= 30, f"D stopped decoding while the head was queued: {during} events"
    assert_same_greedy(completion(p, prompt, 6), out)
    wait_for(lambda: metrics(d).get("vllm:mooncake_pipeline_gate_waits_total", 0.0)
             == waits + 1, 10, "the gate wait counted on D")


def test_connector_metrics_exported(pair: tuple) -> None:
    p, d, rc = pair
    pd_completion(p, d, rc, prompt_ids(90, seed=13), 4)
    pm = wait_for(lambda: (m := metrics(p)).get("vllm:mooncake_exposed_seconds_count") and m,
                  30, "exposed-time histogram on prefill")
    assert pm["vllm:mooncake_bytes_sent_total"] > 0
    assert pm["vllm:mooncake_transfers_sent_total"] >= 1
    dm = wait_for(lambda: (m := metrics(d)).get("vllm:mooncake_bytes_received_total") and m,
                  30, "bytes received on decode")
    assert dm["vllm:mooncake_transfers_received_total"] >= 1
