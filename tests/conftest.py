"""Shared pytest fixtures. Each block belongs to one part of the project; add yours below."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mooncake_vllm.testing.etcd_server import EtcdServer

# ----------------------------------------------------------------------------- etcd (metadata)
# A real etcd server (Debian's etcd-server binary) on free loopback ports, one per test, with a
# temporary data dir. Tests that need auth/TLS/restart build their own `EtcdServer`.


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()
