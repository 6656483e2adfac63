"""The stored records, their validation, the key layout and the URL syntax (no etcd needed)."""

from __future__ import annotations

import json

import pytest

from mooncake_vllm.metadata import (
    InstanceInfo,
    KVLayoutRecord,
    MalformedValueError,
    MetadataConfigError,
    parse_metadata_url,
)
from mooncake_vllm.metadata.base import SCHEMA_VERSION, decode_segment, encode_segment
from mooncake_vllm.metadata.keys import KeyLayout
from mooncake_vllm.metadata.url import Endpoint

from .helpers import make_info


def test_instance_round_trips_through_json() -> None:
    info = make_info("p-1", role="both", extra={"zone": "a"})
    raw = info.to_json()
    assert json.loads(raw)["schema"] == SCHEMA_VERSION
    assert InstanceInfo.from_json(raw) == info
    assert InstanceInfo.from_json(raw).kv_layout == info.kv_layout
    assert {info, InstanceInfo.from_json(raw)} == {info}  # hashable despite its dict fields


def test_instance_ignores_unknown_fields_from_a_newer_writer() -> None:
    d = json.loads(make_info("p-1").to_json())
    d["added_later"] = {"x": 1}
    assert InstanceInfo.from_json(json.dumps(d)) == make_info("p-1")


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.update(schema=SCHEMA_VERSION + 1), "schema"),
        (lambda d: d.pop("schema"), "schema"),
        (lambda d: d.update(kind="segment"), "kind"),
        (lambda d: d.update(role="leader"), "role"),
        (lambda d: d.pop("http_url"), "http_url"),
        (lambda d: d.update(instance_id=7), "instance_id"),
        (lambda d: d["kv_layout"].update(num_layers=0), "num_layers"),
        (lambda d: d["kv_layout"].update(tp_rank=3, tp_size=2), "tp_rank"),
        (lambda d: d["kv_layout"].update(block_size=True), "block_size"),
        (lambda d: d.update(remote_control=[1, 2]), "remote_control"),
    ],
)
def test_instance_rejects_malformed_values(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(make_info("p-1").to_json())
    mutate(d)
    with pytest.raises(MalformedValueError, match=reason):
        InstanceInfo.from_json(json.dumps(d))


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b"\xff\xfe", b'"str"'])
def test_garbage_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedValueError):
        InstanceInfo.from_json(raw)
    with pytest.raises(MalformedValueError):
        decode_segment(raw)


def test_segment_round_trip_and_validation() -> None:
    desc = {"name": "127.0.0.1:5555", "protocol": "tcp", "regions": [[4096, 1 << 20]]}
    assert decode_segment(encode_segment("127.0.0.1:5555", desc)) == ("127.0.0.1:5555", desc)
    with pytest.raises(MalformedValueError):
        encode_segment("s", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(MalformedValueError):
        encode_segment("s", {"bad": float("nan")})


def test_kv_layout_validates_on_construction() -> None:
    with pytest.raises(MalformedValueError, match="head_size"):
        KVLayoutRecord(num_layers=2, block_size=16, dtype="float16", num_kv_heads=2, head_size=-1)


def test_keys_encode_names_and_reject_foreign_paths() -> None:
    keys = KeyLayout("prod")
    key = keys.segment_key("10.0.0.1:5555/a b")
    assert key.startswith("/mooncake-vllm/prod/segments/") and key.count("/") == 4
    assert keys.parse(key) == ("segment", "10.0.0.1:5555/a b")
    assert keys.parse(keys.instance_key("i-1")) == ("instance", "i-1")
    assert keys.parse("/mooncake-vllm/prod/other/x") is None
    assert keys.parse("/mooncake-vllm/prod/instances/") is None
    assert keys.parse("/mooncake-vllm/prod/instances/a/b") is None
    assert keys.parse("/mooncake-vllm/production/instances/x") is None
    with pytest.raises(MetadataConfigError, match="namespace"):
        KeyLayout("a/b")


@pytest.mark.parametrize(
    "url, kind, endpoints, tls",
    [
        ("p2p", "p2p", (), False),
        ("embedded", "p2p", (), False),
        ("etcd://10.0.0.1:2379", "etcd", (Endpoint("10.0.0.1", 2379),), False),
        ("etcd://a:1,b:2", "etcd", (Endpoint("a", 1), Endpoint("b", 2)), False),
        ("etcds://etcd.local", "etcd", (Endpoint("etcd.local", 2379),), True),
        ("http://h:3", "etcd", (Endpoint("h", 3),), False),
        ("https://h:3/", "etcd", (Endpoint("h", 3),), True),
        ("h:4", "etcd", (Endpoint("h", 4),), False),
        ("etcd://[::1]:2379", "etcd", (Endpoint("::1", 2379),), False),
    ],
)
def test_parse_metadata_url(url: str, kind: str, endpoints: tuple[Endpoint, ...],
                            tls: bool) -> None:
    parsed = parse_metadata_url(url)
    assert (parsed.kind, parsed.endpoints, parsed.tls) == (kind, endpoints, tls)


@pytest.mark.parametrize("url", ["redis://h:1", "etcd://h:99999", "etcd://h:x", "etcd://:1",
                                 "etcd://a:1,,b:2"])
def test_parse_metadata_url_rejects_bad_input(url: str) -> None:
    with pytest.raises(MetadataConfigError, match="metadata server"):
        parse_metadata_url(url)
