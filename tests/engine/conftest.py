"""Fixtures for the engine tests: engines in this process, and engines in peer processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import LocalEngine, PeerProcess


@pytest.fixture
def peer_factory() -> Iterator[Any]:
    peers: list[PeerProcess] = []

    def make(size: int = 8 << 20, **kwargs: Any) -> PeerProcess:
        peer = PeerProcess(size, **kwargs)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    engines: list[LocalEngine] = []

    def make(size: int = 8 << 20, **kwargs: Any) -> LocalEngine:
        local = LocalEngine(size, **kwargs)
        engines.append(local)
        return local

    yield make
    for local in engines:
        local.close()
