"""TransferEngine: a thin typed wrapper over the C++ engine in `mooncake_vllm._engine`.

Batches go to C++ as three uint64 numpy arrays (no Python object per block); the C++ side
releases the GIL for everything that can block.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mooncake_vllm import _engine  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)

TransferError = _engine.TransferError
"""Raised when a batch fails or times out, or a peer cannot be reached (a RuntimeError)."""

ArrayLike = npt.ArrayLike | Sequence[int]


class BatchState(enum.Enum):
    PENDING = _engine.STATE_PENDING
    DONE = _engine.STATE_DONE
    FAILED = _engine.STATE_FAILED


@dataclass(frozen=True)
class BatchStatus:
    state: BatchState
    error: str = ""


def compiled_transports() -> list[str]:
    """Transports built into the native module, e.g. ["tcp", "rdma"]."""
    return list(_engine.TRANSPORTS)


def _as_u64(values: ArrayLike, what: str) -> np.ndarray:
    if (
        isinstance(values, np.ndarray)
        and values.dtype == np.uint64
        and values.ndim == 1
        and values.flags.c_contiguous
    ):
        return values
    array = np.ascontiguousarray(values, dtype=np.uint64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    return array


def _status(raw: tuple[int, str]) -> BatchStatus:
    return BatchStatus(BatchState(raw[0]), raw[1])


class TransferEngine:
    """Moves bytes between registered memory of this process and of remote engines."""

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "auto",
        port: int = 0,
        cluster_token: str | None = None,
        timeout_s: float = 30.0,
        connections_per_peer: int = 4,
        rdma_devices: list[str] | None = None,
        *,
        verbs: str = "ibverbs",
        fake_nics: int = 2,
        rdma_slice_bytes: int = 1 << 20,
        rdma_signal_every: int = 16,
        rdma_gid_index: int = -1,
        rdma_port: int = 0,
        rdma_cq_depth: int = 4096,
        max_connections: int = 256,
        max_connections_per_address: int = 64,
        idle_timeout_s: float = 120.0,
    ) -> None:
        """`verbs="fake"` swaps the ibverbs library for the in-process software NIC test double
        (FakeVerbs, `fake_nics` devices): for tests of the RDMA transport's logic only.

        The listener serves at most `max_connections` connections at once, at most
        `max_connections_per_address` from one peer address, and closes a connection that sends
        no request for `idle_timeout_s`. `rdma_gid_index` (-1: chosen, a RoCE v2 IPv4-mapped GID
        preferred) and `rdma_port` (0: the first active port) override the RDMA address choice;
        `rdma_cq_depth` is each NIC's completion queue size, which also caps the work requests
        outstanding on it."""
        self._native = _engine.Engine(
            hostname,
            protocol,
            port,
            cluster_token or "",
            float(timeout_s),
            int(connections_per_peer),
            list(rdma_devices or []),
            verbs=verbs,
            fake_nics=fake_nics,
            rdma_slice_bytes=rdma_slice_bytes,
            rdma_signal_every=rdma_signal_every,
            rdma_gid_index=int(rdma_gid_index),
            rdma_port=int(rdma_port),
            rdma_cq_depth=int(rdma_cq_depth),
            max_connections=int(max_connections),
            max_connections_per_address=int(max_connections_per_address),
            idle_timeout_s=float(idle_timeout_s),
        )
        self.timeout_s = float(timeout_s)
        if self._native.protocol_note:
            logger.info("%s", self._native.protocol_note)

    @property
    def protocol(self) -> str:
        return str(self._native.protocol)

    @property
    def endpoint(self) -> str:
        return str(self._native.endpoint)

    @property
    def name(self) -> str:
        return str(self._native.endpoint)

    def register(self, addr: int, length: int, *, remote_read: bool = False) -> None:
        """Makes [addr, addr+length) a transfer source and a target of peers' WRITEs; peers
        may READ it only when `remote_read` is True."""
        self._native.register(int(addr), int(length), bool(remote_read))

    def unregister(self, addr: int) -> None:
        """Removes the region; returns once no transfer touches its memory any more."""
        self._native.unregister(int(addr))

    def descriptor(self) -> dict[str, Any]:
        return dict(self._native.descriptor())

    def open_segment(self, desc: dict[str, Any]) -> int:
        if not isinstance(desc, dict):
            raise ValueError(f"segment descriptor must be a dict, got {type(desc).__name__}")
        return int(self._native.open_segment(desc))

    def submit(
        self, seg: int, op: str, local: ArrayLike, remote: ArrayLike, lengths: ArrayLike
    ) -> int:
        return int(
            self._native.submit(
                int(seg),
                op,
                _as_u64(local, "local"),
                _as_u64(remote, "remote"),
                _as_u64(lengths, "lengths"),
            )
        )

    def status(self, bid: int) -> BatchStatus:
        return _status(self._native.status(int(bid)))

    def wait(self, bid: int, timeout_s: float | None = None) -> BatchStatus:
        """Blocks until the batch is done; raises TransferError if it failed or is still
        pending after `timeout_s` (None: the engine's own deadline for the batch)."""
        status = _status(self._native.wait(int(bid), -1.0 if timeout_s is None else timeout_s))
        if status.state is BatchState.FAILED:
            raise TransferError(f"batch {bid} failed: {status.error}")
        if status.state is BatchState.PENDING:
            raise TransferError(f"batch {bid} still pending after {timeout_s} s")
        return status

    def release(self, bid: int) -> None:
        self._native.release(int(bid))

    def transfer_sync(
        self, seg: int, op: str, local: ArrayLike, remote: ArrayLike, lengths: ArrayLike
    ) -> BatchStatus:
        bid = self.submit(seg, op, local, remote, lengths)
        try:
            return self.wait(bid)
        finally:
            self.release(bid)

    def stats(self) -> dict[str, int]:
        """Transport counters (TCP: messages_sent, send_calls, bytes_sent, connects,
        server_connections, server_refused_connections, peers_with_links, evicted_peers)."""
        return dict(self._native.stats())

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
