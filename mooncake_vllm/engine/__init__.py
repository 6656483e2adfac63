"""The native transfer engine's Python face (contract: docs/architecture.md, "Engine")."""

from __future__ import annotations

from mooncake_vllm.engine.transfer_engine import (
    BatchState,
    BatchStatus,
    TransferEngine,
    TransferError,
    compiled_transports,
)

__all__ = [
    "BatchState",
    "BatchStatus",
    "TransferEngine",
    "TransferError",
    "compiled_transports",
]
