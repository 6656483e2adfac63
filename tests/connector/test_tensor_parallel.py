"""Tensor parallelism on both sides, same size (issue 14): a prefill instance and a decode
instance of two ranks each (vLLM's CPU backend: one worker process per rank), every P rank
writing its shard of each layer into the matching D rank, answers equal to a single instance.

Both instances share the host's two cores (one core per rank, P's and D's rank r on core r):
slow, but what a two-core machine can run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.vllm_server import VllmServer, post_json

from .pd import (
    assert_same_greedy,
    completion,
    kv_config,
    metrics,
    pd_completion,
    probe_remote_control,
    prompt_ids,
    start_all,
    wait_for,
)

pytestmark = pytest.mark.vllm

TP = 2
CHUNK = 256  # max_num_batched_tokens on P: the longest prompt is prefilled in chunks


def _server(model: Path, logs: Path, name: str, role: str) -> VllmServer:
    return VllmServer(model, name=name, log_path=logs / f"tp-{name}.log", cpus=[0, 1],
                      tensor_parallel_size=TP, extra_args=["--max-num-batched-tokens",
                                                           str(CHUNK)],
                      kv_transfer_config=kv_config(role, transfer_timeout_s=60))


@pytest.fixture(scope="module")
def pair(tiny_model: Path, logs_dir: Path) -> Iterator[tuple[VllmServer, VllmServer, dict]]:
    p = _server(tiny_model, logs_dir, "prefill", "kv_producer")
    d = _server(tiny_model, logs_dir, "decode", "kv_consumer")
    start_all(p, d)
    try:
        yield p, d, probe_remote_control(p)
    finally:
        p.stop()
        d.stop()


def test_each_rank_publishes_its_own_control_endpoint(pair: tuple) -> None:
    _, _, rc = pair
    assert rc["tp_size"] == TP and len(set(rc["control"])) == TP


@pytest.mark.parametrize("n", [1, 31, 100, 2 * CHUNK + 77],
                         ids=["1-token", "block-minus-1", "100", "chunked-prefill"])
def test_tp2_to_tp2_equals_a_single_instance(pair: tuple, n: int) -> None:
    p, d, rc = pair
    prompt = prompt_ids(n, seed=1400 + n)
    got = pd_completion(p, d, rc, prompt, max_tokens=10)
    assert_same_greedy(completion(p, prompt, 10), got)


def test_tp2_to_tp2_pipelined(pair: tuple) -> None:
    """P computes the head (each rank its shard), D each layer of the rest as P's arrive."""
    p, d, rc = pair
    prompt = prompt_ids(333, seed=1500)
    before = metrics(d).get("vllm:mooncake_pipelined_prefills_total", 0.0)
    got = pd_completion(p, d, rc, prompt, max_tokens=10, pipeline_tokens=256)
    assert_same_greedy(completion(p, prompt, 10), got)
    # Counted once per rank: each D rank loads its own shard.
    wait_for(lambda: metrics(d).get("vllm:mooncake_pipelined_prefills_total", 0.0)
             - before >= 1, 10, "the pipelined load counted on D")


def test_through_the_conductor_disaggregated_and_pipelined(pair: tuple,
                                                          tiny_model: Path) -> None:
    p, d, _ = pair
    with ConductorProcess(["--prefill", p.url, "--decode", d.url, "--tokenizer",
                           str(tiny_model), "--local-prefill-max-tokens", "0",
                           "--pipeline-prefill-min-tokens", "200"]) as conductor:
        for n in (45, 300):  # disaggregated whole; pipelined (exact token ids)
            prompt = prompt_ids(n, seed=1600 + n)
            body = {"model": p.model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                    "logprobs": 2, "ignore_eos": True}
            got = post_json(conductor.url + "/v1/completions", body)
            assert_same_greedy(completion(p, prompt, 8), got)
        pipelined = [ln for ln in conductor.log_path.read_text().splitlines()
                     if ", pipelined on " in ln]
        assert len(pipelined) == 1, json.dumps(conductor.log_tail(30))
