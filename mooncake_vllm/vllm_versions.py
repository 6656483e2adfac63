"""The vLLM versions this plugin supports: tested at both ends with `make compat` (README,
"Supported vLLM versions"; compat/vllm-<version>.txt holds each run).

Older vLLM binds the block pool, not the KV cache manager, to a connector's scheduler half
(`bind_gpu_block_pool`), and the scheduler half reads each prefill request's block ids from the
manager; newer vLLM has not been run. So an older one is refused at start, naming both, and a
newer one is warned about.
"""

from __future__ import annotations

OLDEST = (0, 30)
NEWEST_TESTED = (0, 32)
SUPPORTED = "vLLM 0.30 to 0.32"


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def refusal(version: str) -> str | None:
    """Why this vLLM cannot run the connector; None when it can."""
    if _release(version) < OLDEST:
        return (f"MooncakeVllmConnector supports {SUPPORTED}, and this is vLLM {version}: "
                "upgrade vLLM (pip install 'vllm>=0.30,<0.33')")
    return None


def warning(version: str) -> str | None:
    """A note for a vLLM newer than any tested; None for a tested one."""
    if _release(version) > NEWEST_TESTED:
        return (f"MooncakeVllmConnector is tested with {SUPPORTED}; this is vLLM {version}, "
                "whose connector API may differ: run `make compat VLLM_VERSION=...` first")
    return None
