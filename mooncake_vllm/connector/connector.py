"""`MooncakeVllmConnector`: vLLM's KVConnectorBase_V1, delegating to its two halves.

vLLM builds one instance per role: in the scheduler process (SCHEDULER) and in each worker
(WORKER). This class only routes calls; the halves live in scheduler.py and worker.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from mooncake_vllm import vllm_versions
from mooncake_vllm.config import ConfigError, ConnectorConfig
from mooncake_vllm.connector.scheduler import MooncakeScheduler
from mooncake_vllm.connector.stats import MooncakePromMetrics, MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from mooncake_vllm.connector.worker import MooncakeWorker


class MooncakeVllmConnector(KVConnectorBase_V1):
    try:  # vLLM >= 0.32 reports prefix hits by source; this connector's come from a peer
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        _cache_hit_source = CacheHitSource.P2P
        del CacheHitSource
    except ImportError:
        pass

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        why = vllm_versions.refusal(vllm.__version__)
        if why is not None:
            raise ConfigError(why)
        note = vllm_versions.warning(vllm.__version__)
        if note is not None:
            logger.warning("%s", note)
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.config = ConnectorConfig.from_sources(ktc.kv_connector_extra_config)
        self.sched: MooncakeScheduler | None = None
        self.worker: MooncakeWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.sched = MooncakeScheduler(vllm_config, self.config)
        else:
            from mooncake_vllm.connector.worker import MooncakeWorker

            self.worker = MooncakeWorker(vllm_config, self.config, kv_cache_config)

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.handshake if self.worker is not None else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, MooncakeMetadata):
            self.worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Loads are pushed by the prefill side; registration already went out in bind, and a
        # pipelined load is waited for layer by layer in wait_for_layer_load.
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self.worker is not None
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        assert self.worker is not None
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        assert self.worker is not None
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def get_kv_connector_stats(self) -> MooncakeStats | None:
        return self.worker.take_stats() if self.worker is not None else None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.take_gate_report() if self.worker is not None else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.sched is not None:
            self.sched.shutdown()

    # ---------------------------------------------------------------- scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self.sched is not None
        self.sched.bind(kv_cache_manager)

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        return

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        assert self.sched is not None
        self.sched.set_worker_info(metadata)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.sched is not None
        return self.sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self.sched is not None
        self.sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.sched is not None
        return self.sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.sched is not None
        self.sched.update_connector_output(connector_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.sched is not None
        return self.sched.request_finished(request, block_ids)

    def has_pending_block_frees(self) -> bool:
        return self.sched is not None and self.sched.has_pending_block_frees()

    def has_pending_push_work(self) -> bool:
        return self.sched is not None and self.sched.has_pending_work()

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # The transfer fills the request's own blocks in every (the only) group.
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    # ---------------------------------------------------------------- class-level hooks

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer runs between layers

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MooncakeStats:
        return MooncakeStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: Any,
                           per_engine_labelvalues: Any) -> MooncakePromMetrics:
        return MooncakePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
