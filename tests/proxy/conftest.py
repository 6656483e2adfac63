"""Fixtures of the proxy tests: the tiny model and real `vllm serve` instances (at most two at a
time on this 2-core machine; each start costs ~30-70 s, so modules share them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_http import KV_EVENTS

from mooncake_vllm.testing.ports import free_port
from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model
from mooncake_vllm.testing.vllm_server import VllmServer


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_tiny_model(default_model_dir())


@pytest.fixture(scope="module")
def two_plain_servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[tuple[VllmServer, VllmServer]]:
    """Two plain vLLM servers (no connector): the proxy serves each request on one alone.
    Each publishes its KV cache events at `kv_events_endpoint(server)`, and serves vLLM's
    development routes (POST /reset_prefix_cache)."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers = []
    for i in range(2):
        port = free_port()
        config = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://*:{port}"}
        server = VllmServer(tiny_model, name=f"plain{i}", cpus=[i],
                            log_path=logs / f"plain{i}.log", env={"VLLM_SERVER_DEV_MODE": "1"},
                            extra_args=["--kv-events-config", json.dumps(config)])
        KV_EVENTS[server.url] = f"tcp://127.0.0.1:{port}"
        servers.append(server)
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()
