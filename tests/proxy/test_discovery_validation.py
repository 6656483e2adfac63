"""Instance records are checked before the conductor routes to them: whoever can write the
metadata store must not be able to point the conductor's requests, or a decode instance's
control connections, at arbitrary addresses."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mooncake_vllm.metadata import InstanceInfo, open_metadata
from mooncake_vllm.proxy.discovery import Discovery
from mooncake_vllm.proxy.upstreams import Registry
from mooncake_vllm.proxy.validation import http_url_problem
from mooncake_vllm.remote_control import MAX_CONTROL_ENDPOINTS, remote_control_problem
from mooncake_vllm.testing.etcd_server import EtcdServer

GOOD_RC = {"v": 1, "control": ["tcp://10.0.0.5:5555", "tcp://[fd00::1]:5556"]}


@pytest.mark.parametrize("url,ok", [
    ("http://10.0.0.5:8100", True), ("https://p1.example:443/", True),
    ("http://[fd00::1]:8100", True),
    ("file:///etc/passwd", False), ("gopher://10.0.0.5:70", False), ("http://:8100", False),
    ("http://10.0.0.5", False), ("http://10.0.0.5:0", False), ("http://10.0.0.5:70000", False),
    ("http://10.0.0.5:x", False), ("http://user:pw@10.0.0.5:8100", False),
    ("http://10.0.0.5:8100/?a=b", False), ("http://10.0.0.5:8100\r\nX: y", False),
    ("", False), (None, False), (8100, False),
])
def test_http_url_checks(url: Any, ok: bool) -> None:
    assert (http_url_problem(url) is None) == ok, http_url_problem(url)


@pytest.mark.parametrize("rc,ok", [
    (GOOD_RC, True),
    ({"control": []}, False), ({"control": "tcp://10.0.0.5:5555"}, False), ({}, False),
    ({"control": ["http://10.0.0.5:5555"]}, False), ({"control": ["tcp://10.0.0.5"]}, False),
    ({"control": ["tcp://10.0.0.5:5555/x"]}, False), ({"control": [5555]}, False),
    ({"control": ["tcp://" + "h" * 400 + ":1"]}, False),
    ({"control": ["tcp://10.0.0.5:5555"] * (MAX_CONTROL_ENDPOINTS + 1)}, False),
    ({"control": ["tcp://10.0.0.5:5555"], "pad": "x" * 100_000}, False),
    (["tcp://10.0.0.5:5555"], False),
])
def test_remote_control_checks(rc: Any, ok: bool) -> None:
    assert (remote_control_problem(rc) is None) == ok, remote_control_problem(rc)


async def _until(pred: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.etcd
def test_discovery_skips_invalid_records(etcd_server: EtcdServer,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def info(iid: str, url: str, rc: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> InstanceInfo:
        return InstanceInfo(iid, "prefill", url, "", "m", remote_control=rc or {},
                            extra=extra or {})

    bad = {
        "to-a-file": info("to-a-file", "file:///etc/passwd"),
        "no-port": info("no-port", "http://169.254.169.254"),
        "rc-http": info("rc-http", "http://127.0.0.1:8101", {"control": ["http://10.0.0.5:1"]}),
        "rc-empty": info("rc-empty", "http://127.0.0.1:8102", {"control": []}),
        "events-http": info("events-http", "http://127.0.0.1:8103", GOOD_RC,
                            {"kv_events": "http://10.0.0.5:5557"}),
    }

    async def go() -> None:
        registry = Registry()
        discovery = Discovery(registry, etcd_server.url, "default")
        await asyncio.to_thread(discovery.start, asyncio.get_running_loop())
        try:
            with open_metadata(etcd_server.url, ttl_s=5) as writer:
                for record in bad.values():
                    writer.register_instance(record)
                writer.register_instance(info("good", "http://127.0.0.1:8100", GOOD_RC,
                                              {"kv_events": "tcp://10.0.0.5:5557"}))
                # Events arrive in order: once the last record is in, every earlier one was seen.
                await _until(lambda: registry.get("good") is not None, "good record added")
                assert [i.instance_id for i in registry] == ["good"]
                good = registry.get("good")
                assert good is not None and good.remote_control == GOOD_RC
                assert good.kv_events_endpoint == "tcp://10.0.0.5:5557"
                # A known instance whose record turns bad leaves rotation.
                writer.register_instance(info("good", "http://127.0.0.1:8100",
                                              {"control": ["tcp://x:1"] * 1000}))
                await _until(lambda: registry.get("good") is None, "changed record dropped")
        finally:
            await asyncio.to_thread(discovery.close)

    with caplog.at_level(logging.WARNING, logger="mooncake_vllm.proxy.discovery"):
        asyncio.run(go())
    warnings = {r.getMessage() for r in caplog.records}
    for iid, field in (("to-a-file", "http_url"), ("no-port", "http_url"),
                       ("rc-http", "remote_control"), ("rc-empty", "remote_control"),
                       ("events-http", "extra.kv_events"), ("good", "remote_control")):
        assert any(m.startswith(f"instance {iid}: record skipped, {field}") for m in warnings), \
            (iid, warnings)


@pytest.mark.parametrize("endpoint", ["tcp://[zz]:1", "tcp://h:5?", "tcp://a%b:1",
                                      "tcp://[fe80::1%eth0]:5"])
def test_endpoints_urlsplit_cannot_parse_or_would_pass_are_refused(endpoint: str) -> None:
    """urlsplit raises on some of these (the check must answer, not raise) and lets others
    through that zmq does not take as tcp://HOST:PORT."""
    assert remote_control_problem({"control": [endpoint]}) is not None
    assert http_url_problem("http://[zz]:80") == "not a URL"
