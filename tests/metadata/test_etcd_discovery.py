"""Registration, discovery, watches, validation and namespaces against a real etcd."""

from __future__ import annotations

import logging
import time

import pytest

from mooncake_vllm.metadata import MetadataStore, open_metadata
from mooncake_vllm.testing.etcd_server import EtcdServer

from .helpers import EventLog, make_info, wait_until

pytestmark = pytest.mark.etcd


def test_registration_and_discovery_across_stores(etcd_server: EtcdServer) -> None:
    with open_metadata(etcd_server.url, ttl_s=5) as prefill, \
            open_metadata(etcd_server.url, ttl_s=5) as decode, \
            open_metadata(etcd_server.url, ttl_s=5) as proxy:
        p, d = make_info("p0", role="prefill"), make_info("d0", role="decode")
        prefill.register_instance(p)
        prefill.publish_segment("seg-p0", {"name": "seg-p0", "regions": [[4096, 8192]]})
        decode.register_instance(d)
        # Read-your-writes: the writer sees its own record at once.
        assert prefill.get_instance("p0") == p
        assert prefill.get_segment("seg-p0") == {"name": "seg-p0", "regions": [[4096, 8192]]}
        wait_until(lambda: len(proxy.list_instances()) == 2, 5, "the proxy to see both")
        assert proxy.list_instances() == [d, p]  # sorted by id
        assert proxy.list_instances(role="prefill") == [p]
        assert proxy.list_instances(role="decode") == [d]
        wait_until(lambda: decode.get_segment("seg-p0") is not None, 5, "segment discovery")
        assert decode.get_segment("seg-p0") == {"name": "seg-p0", "regions": [[4096, 8192]]}
        assert decode.get_segment("nope") is None
        assert etcd_server.etcdctl("get", "--prefix", "--keys-only",
                                   "/mooncake-vllm/default/").stdout.split() == [
            "/mooncake-vllm/default/instances/d0",
            "/mooncake-vllm/default/instances/p0",
            "/mooncake-vllm/default/segments/seg-p0",
        ]


def test_lookups_come_from_the_cache(etcd_server: EtcdServer) -> None:
    with open_metadata(etcd_server.url, ttl_s=5) as writer, \
            open_metadata(etcd_server.url, ttl_s=5) as reader:
        writer.register_instance(make_info("p0"))
        writer.publish_segment("s", {"name": "s"})
        wait_until(lambda: reader.get_segment("s") is not None, 5, "segment in the cache")
        etcd_server.kill()  # any lookup that went to etcd would now fail or block
        start = time.perf_counter()
        for _ in range(10_000):
            assert reader.get_segment("s") == {"name": "s"}
            assert len(reader.list_instances("prefill")) == 1
        per_lookup_us = (time.perf_counter() - start) / 20_000 * 1e6
        assert per_lookup_us < 50, f"lookups took {per_lookup_us:.1f} us each"


def test_watchers_see_puts_updates_and_deletes(etcd_server: EtcdServer) -> None:
    with open_metadata(etcd_server.url, ttl_s=5) as writer, \
            open_metadata(etcd_server.url, ttl_s=5) as reader:
        writer.register_instance(make_info("early"))
        wait_until(lambda: reader.get_instance("early") is not None, 5, "early instance")
        log = EventLog()
        unsubscribe = reader.watch_instances(log)
        assert log.pairs() == [("put", "early")]  # replay of what is already known

        writer.register_instance(make_info("late", role="decode"))
        wait_until(lambda: log.seen("put", "late") is not None, 5, "put of late")
        updated = make_info("late", role="decode", http_url="http://127.0.0.1:8001/")
        writer.register_instance(updated)
        wait_until(lambda: reader.get_instance("late") == updated, 5, "update of late")
        writer.register_instance(updated)  # unchanged: no event
        writer.deregister_instance("early")
        wait_until(lambda: log.seen("delete", "early") is not None, 5, "delete of early")
        assert log.pairs() == [("put", "early"), ("put", "late"), ("put", "late"),
                               ("delete", "early")]
        unsubscribe()
        writer.deregister_instance("late")
        wait_until(lambda: reader.get_instance("late") is None, 5, "late gone")
        assert ("delete", "late") not in log.pairs()


def test_close_removes_our_keys_and_watchers_see_it(etcd_server: EtcdServer) -> None:
    with open_metadata(etcd_server.url, ttl_s=30) as reader:
        log = EventLog()
        reader.watch_instances(log)
        writer = open_metadata(etcd_server.url, ttl_s=30)
        writer.register_instance(make_info("p0"))
        writer.publish_segment("seg-p0", {"name": "seg-p0"})
        wait_until(lambda: reader.get_segment("seg-p0") is not None, 5, "segment")
        closed_at = time.monotonic()
        writer.close()
        writer.close()  # idempotent
        wait_until(lambda: log.seen("delete", "p0") is not None, 2, "delete after close")
        assert reader.get_segment("seg-p0") is None
        assert log.seen("delete", "p0") - closed_at < 2  # type: ignore[operator]
        assert etcd_server.etcdctl("get", "--prefix", "/mooncake-vllm/").stdout == ""


def test_malformed_and_foreign_values_are_skipped_with_a_warning(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    ns = "/mooncake-vllm/default"
    good = make_info("good")
    mismatched = make_info("other-id")
    bad_values = {
        f"{ns}/instances/not-json": "{{{",
        f"{ns}/instances/newer": good.to_json().decode().replace('"schema":1', '"schema":2'),
        f"{ns}/instances/mismatch": mismatched.to_json().decode(),
        f"{ns}/instances/segment-kind": '{"schema":1,"kind":"segment","name":"x",'
                                        '"descriptor":{}}',
        f"{ns}/segments/list": "[1,2,3]",
        f"{ns}/foreign/thing": "hello",
    }
    for key, value in bad_values.items():
        etcd_server.etcdctl("put", key, value)
    etcd_server.etcdctl("put", f"{ns}/instances/good", good.to_json().decode())
    caplog.set_level(logging.WARNING, logger="mooncake_vllm.metadata")
    with open_metadata(etcd_server.url, ttl_s=5) as reader:
        assert reader.list_instances() == [good]
        assert reader.get_segment("list") is None
        for key in bad_values:
            assert key in caplog.text, f"no warning about {key}"
        log = EventLog()
        reader.watch_instances(log)
        # Live: garbage over a good record is a delete; a foreign put changes nothing.
        etcd_server.etcdctl("put", f"{ns}/instances/good", "garbage")
        etcd_server.etcdctl("put", f"{ns}/foreign/live", "x")
        wait_until(lambda: log.seen("delete", "good") is not None, 5, "delete of corrupted")
        assert reader.list_instances() == []
        # The store still works after all that.
        etcd_server.etcdctl("put", f"{ns}/instances/good", good.to_json().decode())
        wait_until(lambda: reader.list_instances() == [good], 5, "good again")


def test_namespaces_are_isolated(etcd_server: EtcdServer) -> None:
    # "a" is a string prefix of "ab": the key layout must still keep them apart.
    stores: list[MetadataStore] = [
        open_metadata(etcd_server.url, namespace=ns, ttl_s=5) for ns in ("a", "ab")
    ]
    try:
        a, ab = stores
        a.register_instance(make_info("in-a"))
        a.publish_segment("s", {"name": "s", "ns": "a"})
        ab.register_instance(make_info("in-ab"))
        ab.publish_segment("s", {"name": "s", "ns": "ab"})
        time.sleep(0.3)  # give a leak time to show
        assert [i.instance_id for i in a.list_instances()] == ["in-a"]
        assert [i.instance_id for i in ab.list_instances()] == ["in-ab"]
        assert a.get_segment("s") == {"name": "s", "ns": "a"}
        assert ab.get_segment("s") == {"name": "s", "ns": "ab"}
    finally:
        for s in stores:
            s.close()


def test_environment_variables_configure_the_store(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONCAKE_VLLM_METADATA_SERVER", etcd_server.url)
    monkeypatch.setenv("MOONCAKE_VLLM_NAMESPACE", "from-env")
    monkeypatch.setenv("MOONCAKE_VLLM_METADATA_TTL_S", "4")
    with open_metadata() as md:
        md.register_instance(make_info("e0"))
        assert md.ttl_s == 4  # type: ignore[attr-defined]
        keys = etcd_server.etcdctl("get", "--prefix", "--keys-only", "/mooncake-vllm/")
        assert keys.stdout.split() == ["/mooncake-vllm/from-env/instances/e0"]
        lease = etcd_server.etcdctl("lease", "timetolive", f"{md.lease_id:x}")  # type: ignore[attr-defined]
        assert "granted with TTL(4s)" in lease.stdout
