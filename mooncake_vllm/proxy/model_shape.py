"""What the conductor derives from a model's shape (metadata.ModelShape), which every prefill
instance publishes: in its etcd record, and in each prefill answer's kv_transfer_params for a
conductor given static URLs. The shape comes from the network, so it is checked on arrival."""

from __future__ import annotations

import logging
from typing import Any

from mooncake_vllm.metadata import MalformedValueError, ModelShape

log = logging.getLogger(__name__)


def attention_tokens(shape: ModelShape) -> float:
    """The context length C at which a token's attention costs as much as the rest of its
    layer: the layer's non-attention MACs per token (Q, K, V and output projections, and a
    gated MLP's three matrices) over the attention's 2 x heads x head_dim per context token."""
    q = shape.num_heads * shape.head_dim
    kv = 2 * shape.num_kv_heads * shape.head_dim
    projections = shape.hidden_size * (q + kv) + q * shape.hidden_size
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    return (projections + mlp) / (2 * q)


def shape_in_answer(instance_id: str, params: Any) -> ModelShape | None:
    """The shape a prefill answer's kv_transfer_params carry, or None (absent, or unusable:
    logged with the reason)."""
    raw = params.get("model_shape") if isinstance(params, dict) else None
    if raw is None:
        return None
    try:
        return ModelShape.from_dict(raw)
    except (MalformedValueError, TypeError) as e:
        log.warning("prefill instance %s: model_shape in its answer ignored, %s",
                    instance_id, e)
        return None
