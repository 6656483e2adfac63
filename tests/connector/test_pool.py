"""The cluster KV pool on real vLLM: a prompt prefilled on one instance is saved to a real
store process and loaded by another instance that never saw it, with output equal to
computing it; a pool that is gone is a miss and a recompute, never an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.metadata import open_metadata
from mooncake_vllm.proxy.pool_view import PoolView, identity_of
from mooncake_vllm.testing.etcd_server import EtcdServer
from mooncake_vllm.testing.store_process import StoreProcess
from mooncake_vllm.testing.vllm_server import VllmServer, free_port

from .pd import assert_same_greedy, completion, kv_config, metrics, prompt_ids, start_all, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.etcd]
NS = "pool-test"


def loaded(server: VllmServer) -> float:
    return metrics(server).get("vllm:mooncake_pool_blocks_loaded_total", 0.0)


def computed_and_saved(a: VllmServer, store: StoreProcess, prompt: list[int],
                       max_tokens: int = 8) -> dict:
    """A's answer to `prompt`, once its full blocks are in the pool: A writes them after its
    forward passes, in the background, and its counters reach vLLM's metrics only with a
    later step, so the store says when they are in."""
    committed = store.status()["node"]["committed"]
    ref = completion(a, prompt, max_tokens)
    wait_for(lambda: store.status()["node"]["committed"] - committed >= len(prompt) // 32, 30,
             "A's blocks saved to the pool")
    return ref


@pytest.fixture(scope="module")
def pool_pair(tiny_model: Path, logs_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("pool")
    etcd = EtcdServer(tmp / "etcd").start()
    store = StoreProcess(etcd.url, name="store-1", dram_mib=64, slot_bytes=1 << 20,
                         args=["--namespace", NS], log_path=logs_dir / "pool-store.log")
    servers = []
    for name in ("a", "b"):
        port = free_port()
        servers.append(VllmServer(
            tiny_model, port=port, name=f"pool-{name}", log_path=logs_dir / f"pool-{name}.log",
            kv_transfer_config=kv_config(
                "kv_both", advertise_url=f"http://127.0.0.1:{port}", metadata_server=etcd.url,
                namespace=NS, pool=True, pool_buffer_mb=32)))
    try:
        store.start()
        start_all(*servers)
        yield servers[0], servers[1], store, etcd
    finally:
        for s in servers:
            s.stop()
        store.stop()
        etcd.stop()


@pytest.mark.parametrize("n", [100, 600], ids=["short", "chunked"])
def test_a_prefix_computed_on_one_instance_is_loaded_by_another(pool_pair: tuple,
                                                                 n: int) -> None:
    a, b, store, _ = pool_pair
    prompt = prompt_ids(n, seed=3000 + n)
    before_loaded = loaded(b)
    ref = computed_and_saved(a, store, prompt)
    blocks = (n - 1) // 32  # whole blocks, the last token left to compute
    hits_before = metrics(b).get("vllm:mooncake_pool_hits_total", 0.0)
    got = completion(b, prompt, 8)
    assert_same_greedy(ref, got)
    assert loaded(b) - before_loaded == blocks
    assert metrics(b).get("vllm:mooncake_pool_hits_total", 0.0) - hits_before == 1
    status = store.status()
    assert status["node"]["committed"] >= n // 32 and status["pool"]["dram_hits"] >= blocks


def test_the_conductor_sees_what_the_pool_holds_from_the_published_identity(
        pool_pair: tuple) -> None:
    """The keys a conductor derives from an instance's record (extra.pool) are the keys its
    workers wrote: what the routing cost counts is what an instance would load."""
    a, _, store, etcd = pool_pair
    prompt = prompt_ids(200, seed=3500)
    computed_and_saved(a, store, prompt, 2)
    md = open_metadata(etcd.url, namespace=NS)
    view = None
    try:
        record = wait_for(lambda: md.get_instance(instance_id(md, a)), 10, "A's record")
        identity = identity_of(record.extra)
        assert identity is not None
        view = PoolView(md, None, timeout_s=2.0)
        assert view.held_tokens(identity, 32, tuple(prompt)) == 6 * 32
        assert view.held_tokens(identity, 32, tuple(prompt_ids(200, seed=3501))) == 0
    finally:
        if view is not None:
            view.close()
        md.close()


def instance_id(md: object, server: VllmServer) -> str | None:
    for info in md.list_instances():  # type: ignore[attr-defined]
        if info.http_url == server.url:
            return str(info.instance_id)
    return None


def test_etcd_restarted_loses_nothing(pool_pair: tuple) -> None:
    """etcd goes away and comes back: the store's and the instances' records return (their
    leases are granted again), and what the pool held is still read, with equal output."""
    a, b, store, etcd = pool_pair
    prompt = prompt_ids(250, seed=3700)
    ref = computed_and_saved(a, store, prompt)
    etcd.restart(down_s=1.0)
    md = open_metadata(etcd.url, namespace=NS)
    try:
        wait_for(lambda: len(md.list_stores()) == 1 and len(md.list_instances()) == 2, 30,
                 "the store's and the instances' records back in etcd")
    finally:
        md.close()
    before = loaded(b)
    got = completion(b, prompt, 8)
    assert_same_greedy(ref, got)
    assert loaded(b) - before == 7


def test_a_store_gone_is_a_miss_and_a_recompute_and_it_rejoins(pool_pair: tuple) -> None:
    """Last in the module: it kills the store (and restarts it)."""
    a, b, store, _ = pool_pair
    prompt = prompt_ids(300, seed=3999)
    ref = computed_and_saved(a, store, prompt)
    store.kill()
    before = loaded(b)
    got = completion(b, prompt, 8, timeout_s=60)  # its etcd record lingers: lookups time out
    assert_same_greedy(ref, got)
    assert loaded(b) == before  # computed, not loaded
    assert "did not answer a lookup" in b.log_path.read_text(errors="replace")
    store.start()  # an empty pool under the same name, back in etcd
    prompt2 = prompt_ids(200, seed=4000)
    ref2 = computed_and_saved(a, store, prompt2)
    got2 = completion(b, prompt2, 8)
    assert_same_greedy(ref2, got2)
    wait_for(lambda: loaded(b) - before >= 6, 10, "B loading from the restarted store")
