"""The connector's use of the metadata service: segments (workers) and the instance (scheduler)."""

from __future__ import annotations

import logging
from typing import Any

from mooncake_vllm.config import ConnectorConfig

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")


def open_store(config: ConnectorConfig) -> Any:
    from mooncake_vllm.metadata import open_metadata

    return open_metadata(config.metadata_server, namespace=config.namespace,
                         ttl_s=config.metadata_ttl_s)


def model_shape(vllm_config: Any) -> Any:
    """The served model's shape (metadata.ModelShape) from vLLM's config, or None (logged) for
    a model whose config does not say it: a conductor then splits pipelined prompts by tokens."""
    from mooncake_vllm.metadata import MalformedValueError, ModelShape

    try:
        mc = vllm_config.model_config
        hf = mc.hf_text_config
        heads = int(hf.num_attention_heads)
        hidden = int(hf.hidden_size)
        return ModelShape(
            num_layers=int(hf.num_hidden_layers), num_heads=heads,
            head_dim=int(getattr(hf, "head_dim", None) or hidden // heads),
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            hidden_size=hidden,
            intermediate_size=int(getattr(hf, "intermediate_size", None) or 4 * hidden),
            dtype=str(mc.dtype).removeprefix("torch."),
            block_size=int(vllm_config.cache_config.block_size))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError,
            MalformedValueError) as e:
        logger.warning("MooncakeVllmConnector: the model's shape is not published (%s)", e)
        return None


def kv_events_endpoint(vllm_config: Any, hostname: str) -> str:
    """Where a conductor subscribes to this instance's KV cache events ("" when vLLM does not
    publish them over ZMQ): vLLM binds a wildcard endpoint, which peers reach at our
    advertised hostname; any other it connects to (a broker), which is where they are."""
    kec = getattr(vllm_config, "kv_events_config", None)
    if kec is None or not kec.enable_kv_cache_events or kec.publisher != "zmq":
        return ""
    endpoint = str(kec.endpoint)
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not port.isdigit():
        return ""
    if host in ("*", "0.0.0.0", "[::]", "::"):
        host = f"[{hostname}]" if ":" in hostname else hostname
    return f"tcp://{host}:{port}"


def shard_space(layout: dict[str, Any]) -> Any:
    """Rank 0's ShardSpace (store/keys.py) from the layout its worker handed the scheduler."""
    from mooncake_vllm.store.keys import ShardSpace

    return ShardSpace(block_bytes=int(layout["block_bytes"]), planes=int(layout["planes"]),
                      num_layers=int(layout["num_layers"]), tp_rank=0)


def pool_identity(vllm_config: Any, layout: dict[str, Any]) -> dict[str, str]:
    """What a conductor needs to compute the pool keys of rank 0's entries from a prompt's
    token ids (store/keys.py): the chain's seed and the shard's salt, as hex digests."""
    from mooncake_vllm.connector.pool_plan import model_space

    return {"space": model_space(vllm_config).digest().hex(),
            "shard": shard_space(layout).digest().hex()}


def _extra(config: ConnectorConfig, vllm_config: Any, layout: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    events = kv_events_endpoint(vllm_config, config.hostname)
    if events:
        extra["kv_events"] = events
    if config.pool:
        extra["pool"] = pool_identity(vllm_config, layout)
    return extra


def register_instance(config: ConnectorConfig, vllm_config: Any, *, role: str,
                      remote_control: dict[str, Any], rank0: Any, model: str) -> Any:
    """Publish this instance so a proxy can find it; returns the open store (close to leave)."""
    from mooncake_vllm.metadata import InstanceInfo
    from mooncake_vllm.metadata.base import KVLayoutRecord

    lay = dict(rank0.layout)
    store = open_store(config)
    info = InstanceInfo(
        instance_id=config.instance_id, role=role,  # type: ignore[arg-type]
        http_url=config.http_url(), control_endpoint=rank0.control, model=model,
        engine_id=str(remote_control.get("engine_id", "")), segment_name=rank0.segment_name,
        kv_layout=KVLayoutRecord(num_layers=lay["num_layers"], block_size=lay["block_size"],
                           dtype=lay["dtype"], num_kv_heads=lay["num_kv_heads"],
                           head_size=lay["head_size"], tp_rank=0, tp_size=lay["tp_size"]),
        remote_control=remote_control, model_shape=model_shape(vllm_config),
        extra=_extra(config, vllm_config, lay))
    store.register_instance(info)
    logger.info("MooncakeVllmConnector: registered instance %s (%s) at %s in %s",
                config.instance_id, role, info.http_url, config.metadata_server)
    return store
