"""Fixtures of the proxy tests: the tiny model and real `vllm serve` instances (at most two at a
time on this 2-core machine; each start costs ~30-70 s, so modules share them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model
from mooncake_vllm.testing.vllm_server import VllmServer


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_tiny_model(default_model_dir())


@pytest.fixture(scope="module")
def two_plain_servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[tuple[VllmServer, VllmServer]]:
    """Two plain vLLM servers (no connector): the proxy serves each request on one alone."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers = [VllmServer(tiny_model, name=f"plain{i}", cpus=[i], log_path=logs / f"plain{i}.log")
               for i in range(2)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()
