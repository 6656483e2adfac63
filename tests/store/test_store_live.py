"""Store nodes as real processes (`mooncake-vllm store`) on real etcd, and a client with a
real transfer engine: entries written one-sided are found and read back byte for byte, hot
blocks gain replicas that readers spread over, and a store that dies, restarts or finds its
SSD file damaged costs misses, never an error or a hang."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mooncake_vllm.engine import TransferEngine
from mooncake_vllm.metadata import MetadataStore, open_metadata
from mooncake_vllm.store.client import PoolClient
from mooncake_vllm.testing.etcd_server import EtcdServer
from mooncake_vllm.testing.store_process import StoreProcess

ENTRY = 4096
SLOTS = 64  # staging entries of the client


def key(i: int, salt: str = "") -> bytes:
    return hashlib.sha256(f"{salt}{i}".encode()).digest()


def wait_for(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Client:
    """A worker's view: an engine, registered staging memory, a PoolClient."""

    def __init__(self, metadata: MetadataStore, reader: str) -> None:
        self.engine = TransferEngine("127.0.0.1", "tcp", timeout_s=5.0)
        self.arena = np.zeros(SLOTS * ENTRY, np.uint8)
        self.engine.register(self.arena.ctypes.data, self.arena.nbytes)
        self.pool = PoolClient(self.engine, metadata, hostname="127.0.0.1", token=None,
                               reader=reader, entry_bytes=ENTRY, ask_timeout_s=2.0)

    def addr(self, slot: int) -> int:
        return int(self.arena.ctypes.data) + slot * ENTRY

    def fill(self, slots: range, seed: int) -> None:
        for s in slots:
            self.arena[s * ENTRY:(s + 1) * ENTRY] = np.random.default_rng(seed + s).integers(
                0, 256, ENTRY, dtype=np.uint8)

    def close(self) -> None:
        self.pool.close()
        self.engine.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("pool")
    etcd = EtcdServer(tmp / "etcd").start()
    md = open_metadata(etcd.url, ttl_s=3)
    stores = {n: StoreProcess(etcd.url, name=n, dram_mib=1, slot_bytes=ENTRY,
                              args=["--hot-reads", "3", "--hot-window-s", "30"],
                              log_path=tmp / f"{n}.log").start()
              for n in ("s1", "s2", "s3")}
    wait_for(lambda: len(md.list_stores()) == 3, 15, "three stores in etcd")
    try:
        yield etcd, md, stores, tmp
    finally:
        for s in stores.values():
            s.stop()
        md.close()
        etcd.stop()


@pytest.fixture
def client(cluster: tuple) -> Iterator[Client]:
    c = Client(cluster[1], "reader-a")
    yield c
    c.close()


def test_written_entries_are_found_and_read_back_exactly(client: Client, cluster: tuple) -> None:
    keys = [key(i, "exact") for i in range(8)]
    client.fill(range(8), seed=1)
    want = client.arena[:8 * ENTRY].copy()
    assert client.pool.lookup(keys).held == 0
    assert client.pool.write(keys, [client.addr(i) for i in range(8)]) == 8
    found = client.pool.lookup([*keys, key(99, "exact")])
    assert found.held == 8
    got = client.pool.read(keys, [client.addr(16 + i) for i in range(8)])
    assert got == 8
    assert np.array_equal(client.arena[16 * ENTRY:24 * ENTRY], want)
    # Spread over the stores by rendezvous hashing, one batched request per owner.
    committed = [s.status()["node"]["committed"] for s in cluster[2].values()]
    assert sum(committed) >= 8 and sum(1 for c in committed if c) >= 2
    # A prefix walk: the chain ends at the first key nobody holds.
    assert client.pool.lookup([keys[0], key(5, "other"), keys[2]]).held == 1


def test_a_hot_block_is_replicated_and_reads_spread(cluster: tuple) -> None:
    md, stores = cluster[1], cluster[2]
    readers = [Client(md, f"reader-{i}") for i in range(6)]
    try:
        hot = [key(0, "hot")]
        readers[0].fill(range(1), seed=7)
        want = readers[0].arena[:ENTRY].copy()
        assert readers[0].pool.write(hot, [readers[0].addr(0)]) == 1
        before = {n: s.status()["pool"]["dram_hits"] for n, s in stores.items()}
        for _ in range(3):
            for r in readers:
                found = r.pool.lookup(hot)
                assert found.held == 1
                assert r.pool.read(hot, [r.addr(1)], found.copies) == 1
                assert np.array_equal(r.arena[ENTRY:2 * ENTRY], want)
                # A reader of a block that should have more copies writes them (replicas).
                r.pool.write(hot, [r.addr(1)], found.copies)
        reads = {n: s.status()["pool"]["dram_hits"] - before[n] for n, s in stores.items()}
        assert sum(1 for v in reads.values() if v) >= 2, reads
        assert sum(s.status()["node"]["replicas_written"] for s in stores.values()) >= 1
    finally:
        for r in readers:
            r.close()


def test_a_store_killed_or_gone_is_a_miss_and_it_rejoins(cluster: tuple, client: Client) -> None:
    etcd, md, stores, tmp = cluster
    keys = [key(i, "kill") for i in range(12)]
    client.fill(range(12), seed=3)
    assert client.pool.write(keys, [client.addr(i) for i in range(12)]) == 12
    found = client.pool.lookup(keys)
    assert found.held == 12
    victim = stores["s2"]
    victim.kill()  # between the lookup and the read: s2's entries cannot be read
    started = time.monotonic()
    got = client.pool.read(keys, [client.addr(20 + i) for i in range(12)], found.copies)
    assert got < 12  # s2 owns some of the 12: the chain ends at its first
    assert np.array_equal(client.arena[20 * ENTRY:(20 + got) * ENTRY],
                          client.arena[:got * ENTRY])
    # While s2's record lasts in etcd its keys are misses: the first question that finds it
    # silent waits the bound, later ones do not ask it for a while.
    assert client.pool.lookup(keys).held < 12
    assert time.monotonic() - started < 15
    again = time.monotonic()
    assert client.pool.lookup(keys).held < 12
    assert time.monotonic() - again < 1.0
    wait_for(lambda: len(md.list_stores()) == 2, 15, "the killed store's lease to lapse")
    # Owners are now the two left: their keys still read, the rest are misses.
    client.pool.lookup(keys)
    restarted = StoreProcess(etcd.url, name="s2", dram_mib=1, slot_bytes=ENTRY,
                             args=["--hot-reads", "3", "--hot-window-s", "30"],
                             log_path=tmp / "s2.log", status_port=victim.status_port).start()
    stores["s2"] = restarted
    wait_for(lambda: len(md.list_stores()) == 3, 15, "the restarted store in etcd")
    assert client.pool.write(keys, [client.addr(i) for i in range(12)]) >= 1
    assert client.pool.lookup(keys).held == 12


@contextlib.contextmanager
def ssd_store(tmp_path: Path, etcd: EtcdServer, namespace: str
              ) -> Iterator[tuple[StoreProcess, Client, Path]]:
    """A store of its own namespace: two DRAM slots in front of a 16-slot SSD tier."""
    md = open_metadata(etcd.url, namespace=namespace, ttl_s=3)
    path = tmp_path / "ssd.bin"
    store = StoreProcess(etcd.url, name=f"{namespace}-1", dram_mib=2 * ENTRY / 2**20,
                         slot_bytes=ENTRY, ssd_path=path, ssd_mib=16 * ENTRY / 2**20,
                         args=["--namespace", namespace],
                         log_path=tmp_path / f"{namespace}.log").start()
    c = Client(md, f"reader-{namespace}")
    try:
        wait_for(lambda: len(md.list_stores()) == 1, 15, "the SSD store in etcd")
        yield store, c, path
    finally:
        c.close()
        store.stop()
        md.close()


def test_a_damaged_ssd_file_is_a_miss(tmp_path: Path, cluster: tuple) -> None:
    with ssd_store(tmp_path, cluster[0], "ssd") as (store, c, path):
        keys = [key(i, "ssd") for i in range(6)]
        c.fill(range(6), seed=11)
        want = c.arena[:6 * ENTRY].copy()
        # A reservation holds its DRAM slots until committed: two at a time fit.
        for i in range(0, 6, 2):
            assert c.pool.write(keys[i:i + 2], [c.addr(i), c.addr(i + 1)]) == 2
        assert store.status()["tiers"]["ssd"]["used"] == 4  # two DRAM slots, LRU -> SSD
        assert c.pool.read(keys[:1], [c.addr(10)]) == 1  # back from SSD, intact
        assert np.array_equal(c.arena[10 * ENTRY:11 * ENTRY], want[:ENTRY])
        with path.open("r+b") as f:  # flip a byte in every SSD slot
            for slot in range(16):
                f.seek(slot * ENTRY + 100)
                f.write(b"\x5a")
        got = c.pool.read(keys[1:], [c.addr(11 + i) for i in range(5)])
        assert got < 5  # the damaged entries are misses
        assert np.array_equal(c.arena[11 * ENTRY:(11 + got) * ENTRY],
                              want[ENTRY:(1 + got) * ENTRY])
        assert store.status()["pool"]["ssd_corrupt"] >= 1
        assert "is damaged" in store.log_tail(200)


def test_etcd_restarted_loses_no_store(cluster: tuple, client: Client) -> None:
    etcd, md = cluster[0], cluster[1]
    keys = [key(i, "etcd") for i in range(4)]
    client.fill(range(4), seed=5)
    assert client.pool.write(keys, [client.addr(i) for i in range(4)]) == 4
    etcd.restart(down_s=1.0)
    wait_for(lambda: len(md.list_stores()) == 3, 30, "the stores back in etcd")
    assert client.pool.lookup(keys).held == 4


def test_an_ssd_heavy_store_is_read_and_written_in_rounds(tmp_path: Path,
                                                          cluster: tuple) -> None:
    """Two DRAM slots in front of an SSD tier: a read or write of six entries goes through
    them two at a time, and all six arrive intact."""
    with ssd_store(tmp_path, cluster[0], "rounds") as (_, c, _path):
        keys = [key(i, "rounds") for i in range(6)]
        c.fill(range(6), seed=21)
        assert c.pool.write(keys, [c.addr(i) for i in range(6)]) == 6
        assert c.pool.read(keys, [c.addr(10 + i) for i in range(6)]) == 6
        assert np.array_equal(c.arena[10 * ENTRY:16 * ENTRY], c.arena[:6 * ENTRY])
