"""The connector's statistics and the Prometheus series vLLM exports for them
(`vllm:mooncake_*`), in a module without vLLM so that a dashboard check can read them."""

from __future__ import annotations

COUNTERS = (
    "bytes_sent", "blocks_sent", "bytes_received", "blocks_received",
    "transfers_sent", "transfers_received", "failures", "pipeline_gate_waits",
    "health_failures",
    # Decode side, one per request whose KV comes from a prefill instance, by path; and each
    # failed load by what vLLM's kv_load_failure_policy then does with the request.
    "remote_prefills", "pipelined_prefills", "failed_loads_recomputed", "failed_loads_failed",
    # The KV pool: prefix lookups and those that found blocks (the hit rate; the scheduler's,
    # reported by rank 0), entries read into the cache and written to the pool per worker,
    # with their bytes.
    "pool_lookups", "pool_hits", "pool_blocks_loaded", "pool_bytes_read",
    "pool_blocks_saved", "pool_bytes_written", "pool_replicas_written", "pool_buffer_full",
)
SERIES = ("transfer_s", "exposed_s", "non_overlapped_s", "pool_lookup_s", "pool_read_s")


def counter_name(key: str) -> str:
    return f"vllm:mooncake_{key}"


def histogram_name(key: str) -> str:
    return f"vllm:mooncake_{key.removesuffix('_s')}_seconds"


def exported_series() -> set[str]:
    """Every series name a scrape of an instance shows for the connector."""
    names = {counter_name(k) + "_total" for k in COUNTERS}
    for k in SERIES:
        names |= {histogram_name(k) + s for s in ("_bucket", "_sum", "_count")}
    return names
