"""Prefill + decode with etcd metadata: discovery via the instance registry, segments by name.

The prefill side here sends through its staging buffer (`staging="on"`), the path GPU KV takes
over TCP, with CPU tensors; the p2p tests cover the direct path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.metadata import open_metadata
from mooncake_vllm.testing.etcd_server import EtcdServer
from mooncake_vllm.testing.vllm_server import VllmServer, free_port

from .pd import assert_same_greedy, completion, kv_config, pd_completion, prompt_ids, start_all

pytestmark = [pytest.mark.vllm, pytest.mark.etcd]


@pytest.fixture(scope="module")
def etcd_pair(tiny_model: Path, logs_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    ports = free_port(), free_port()
    md = {"metadata_server": etcd.url, "namespace": "connector-test"}
    p = VllmServer(tiny_model, port=ports[0], name="prefill", log_path=logs_dir / "e-p.log",
                   kv_transfer_config=kv_config(
                       # Also exercises the staged send path (what GPU KV over TCP uses).
                       "kv_producer", advertise_url=f"http://127.0.0.1:{ports[0]}",
                       staging="on", staging_buffer_mb=64, **md),
                   extra_args=["--max-num-batched-tokens", "256"])
    d = VllmServer(tiny_model, port=ports[1], name="decode", log_path=logs_dir / "e-d.log",
                   kv_transfer_config=kv_config(
                       "kv_consumer", advertise_url=f"http://127.0.0.1:{ports[1]}", **md))
    try:
        start_all(p, d)
        store = open_metadata(etcd.url, namespace="connector-test")
        try:
            yield p, d, store
        finally:
            store.close()
            p.stop()
            d.stop()
    finally:
        etcd.stop()


def test_instances_discovered_through_etcd(etcd_pair: tuple) -> None:
    p, d, store = etcd_pair
    prefills = store.list_instances(role="prefill")
    decodes = store.list_instances(role="decode")
    assert [i.http_url for i in prefills] == [p.url]
    assert [i.http_url for i in decodes] == [d.url]
    rc = prefills[0].remote_control
    assert rc["control"] and prefills[0].kv_layout.block_size == 32


@pytest.mark.parametrize("n", [1, 600], ids=["1-token", "chunked-prefill"])
def test_pd_equals_single_instance_with_etcd(etcd_pair: tuple, n: int) -> None:
    p, d, store = etcd_pair
    rc = store.list_instances(role="prefill")[0].remote_control
    prompt = prompt_ids(n, seed=1000 + n)
    got = pd_completion(p, d, rc, prompt, 10)
    assert_same_greedy(completion(p, prompt, 10), got)
