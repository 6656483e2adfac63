"""Worker half: the vLLM wiring around the two sides of the protocol.

It registers the KV cache with the engine, starts the control channel, and routes vLLM's
calls and the channel's messages to the prefill side (prefill_side.py: posting, early
registrations, heartbeats) and the decode side (decode_side.py: registering, layer waits,
deadlines), where the state machines and their failure rules live. Messages from the ROUTER
(peers that called us) go to the prefill side, replies on our DEALERs to the decode side.

Threads: the model thread (bind, save_kv_layer, wait_for_save, get_finished), the control
channel thread (messages and deadlines), the completion and poster threads (prefill side) and
the health thread (a self-check of the engine every few seconds). One lock guards the
transfer tables; engine calls made under it return at once (submit).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata

from mooncake_vllm.channel.control_channel import (
    ControlChannel,
    unpin_current_thread,
    widened_affinity,
)
from mooncake_vllm.config import ConfigError, ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.core_sharing import CoreRegistry
from mooncake_vllm.connector.decode_side import DecodeSide
from mooncake_vllm.connector.doctor_probe import DoctorProbe
from mooncake_vllm.connector.layout import KVLayout, memory_regions
from mooncake_vllm.connector.pipeline_gate import GateReport
from mooncake_vllm.connector.pool_io import PoolWorker
from mooncake_vllm.connector.prefill_side import PrefillSide
from mooncake_vllm.connector.staging import StagingBuffer
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")
HEALTH_INTERVAL_S = 5.0
# The longest a step with nothing to compute waits for a transfer to finish or fail. vLLM
# steps again at once while requests wait for remote KV, which keeps a core busy (the other
# instance's, on a shared host); longer would delay new arrivals and aborts, which the engine
# handles only between steps.
IDLE_STEP_WAIT_S = 0.02


def wait_for_news(news: threading.Condition, sides: list[Any], timeout_s: float) -> bool:
    """An idle step: wait until a side has something for vLLM (a transfer finished or failed,
    blocks to free, a gate report, a pool prefetch done), at most `timeout_s`; True when it
    has."""
    with news:
        return news.wait_for(lambda: any(side.has_news() for side in sides), timeout_s)


@dataclass
class WorkerHandshake(KVConnectorHandshakeMetadata):
    """Worker -> its scheduler: where this rank's control channel and segment are."""

    control: str
    segment_name: str
    tp_rank: int
    layout: dict[str, Any]


class MooncakeWorker:
    def __init__(self, vllm_config: VllmConfig, config: ConnectorConfig,
                 kv_cache_config: KVCacheConfig) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.vllm_config, self.config, self.kv_cache_config = vllm_config, config, kv_cache_config
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.engine_id = str(ktc.engine_id)
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.block_size = vllm_config.cache_config.block_size
        self.lock = threading.RLock()
        self.news = threading.Condition(self.lock)  # both sides notify; idle steps wait
        self.stats = MooncakeStats()
        self.engine: Any = None
        self.layout: KVLayout | None = None
        self.layer_index: dict[str, int] = {}
        self.control: ControlChannel | None = None
        self.metadata: Any = None
        self.segment_name = f"{config.instance_id}-{self.engine_id}-tp{self.tp_rank}"
        self.handshake: WorkerHandshake | None = None
        self.prefill: PrefillSide | None = None
        self.decode: DecodeSide | None = None
        self._meta: MooncakeMetadata | None = None
        self._early_post: dict[str, bool] = {}  # layer -> its KV is in the cache at its start
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.unhealthy = ""  # why this worker cannot serve transfers; "" when it can
        self.cores: CoreRegistry | None = None  # CPU platform: our record of cores in use
        self.doctor: DoctorProbe | None = None
        self.pool: PoolWorker | None = None  # the KV pool (pool_io.py), when configured
        self._stop = threading.Event()

    # ------------------------------------------------------------------ setup

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from mooncake_vllm.engine import TransferEngine

        c = self.config
        refusal = c.exposure_refusal()
        if refusal is not None:
            raise ConfigError(f"MooncakeVllmConnector: {refusal}")
        if c.insecure and not c.cluster_token:
            logger.warning("MooncakeVllmConnector: insecure=true and no cluster_token: the "
                           "engine and control ports on %s accept anyone who reaches them",
                           c.hostname)
        mc = self.vllm_config.model_config
        self.layout = KVLayout.from_caches(
            kv_caches, self.kv_cache_config.num_blocks, block_size=self.block_size,
            num_kv_heads=mc.get_num_kv_heads(self.vllm_config.parallel_config),
            head_size=mc.get_head_size(), model=str(mc.served_model_name or mc.model),
            tp_rank=self.tp_rank, tp_size=self.tp_size,
            total_kv_heads=mc.get_total_num_kv_heads())
        self.layer_index = {n: i for i, n in enumerate(self.layout.layer_names)}
        with widened_affinity():  # the engine's threads must not share the model's core
            self.engine = TransferEngine(
                hostname=c.hostname, protocol=c.protocol, port=c.engine_port,
                cluster_token=c.cluster_token, timeout_s=c.engine_timeout_s,
                connections_per_peer=c.connections_per_peer,
                rdma_devices=list(c.rdma_devices) if c.rdma_devices else None)
        for addr, length in memory_regions(kv_caches):
            self.engine.register(addr, length)
        self.kv_caches = dict(kv_caches)
        if all(t.device.type == "cpu" for t in kv_caches.values()):
            ktc = self.vllm_config.kv_transfer_config
            self.cores = CoreRegistry(c.instance_id, self.engine_id,
                                      str(ktc.kv_role) if ktc is not None else "")
            self.cores.announce()
        stager, device_kv = self._setup_staging(kv_caches)
        if c.uses_etcd:
            from mooncake_vllm.connector.registry import open_store

            self.metadata = open_store(c)
            self.metadata.publish_segment(self.segment_name, self.engine.descriptor())
            if c.pool:
                with widened_affinity():  # its thread waits on the network, not the model
                    self.pool = PoolWorker(self.engine, self.metadata, self.layout, c,
                                           reader=f"{c.instance_id}-tp{self.tp_rank}",
                                           stats=self.stats, news=self.news)
        self.prefill = PrefillSide(
            engine=self.engine, send=self._send, config=c, layout=self.layout,
            block_size=self.block_size, tp_rank=self.tp_rank, stats=self.stats, lock=self.lock,
            metadata=self.metadata, stager=stager, kv_caches=self.kv_caches,
            device_kv=device_kv, news=self.news)
        self.decode = DecodeSide(
            engine=self.engine, send=self._send, config=c, layout=self.layout,
            block_size=self.block_size, tp_rank=self.tp_rank, engine_id=self.engine_id,
            segment_name=self.segment_name,
            descriptor=None if c.uses_etcd else self.engine.descriptor(), stats=self.stats,
            lock=self.lock, news=self.news,
            recompute_failed_loads=str(getattr(self.vllm_config.kv_transfer_config,
                                               "kv_load_failure_policy", "")) == "recompute")
        self.prefill.start()
        self.doctor = DoctorProbe(self.engine, c.cluster_token, self._send)
        port = c.control_port + self.tp_rank if c.control_port else 0
        # zmq's I/O thread, started with the channel, inherits this thread's affinity: the
        # model's core, where it would wait for the model (and, on a host whose instances
        # share cores, for the other instance's compute) to move every control message.
        with widened_affinity():
            self.control = ControlChannel(c.hostname, port, self._on_message, self._on_tick,
                                          codec=m.CODEC, token=c.cluster_token,
                                          on_refused=self._on_refused)
        threading.Thread(target=self._health_loop, name="mooncake-health", daemon=True).start()
        info = self.layout.info()
        self.handshake = WorkerHandshake(
            control=self.control.endpoint, segment_name=self.segment_name, tp_rank=self.tp_rank,
            layout={**{k: getattr(info, k) for k in (
                "model", "block_size", "dtype", "num_kv_heads", "head_size", "num_layers",
                "tp_size", "block_bytes")}, "planes": len(info.planes[0])})
        logger.info("MooncakeVllmConnector worker tp%d: %d layers, %d blocks of %d B/plane, "
                    "control %s, engine %s, %s", self.tp_rank, len(self.layout.layer_names),
                    self.layout.num_blocks, self.layout.block_bytes, self.control.endpoint,
                    self.engine.descriptor().get("endpoint"),
                    "authenticated (cluster token)" if c.cluster_token else "no cluster token")

    def _setup_staging(self, kv_caches: dict[str, torch.Tensor]
                       ) -> tuple[StagingBuffer | None, torch.device | None]:
        on_device = any(t.device.type != "cpu" for t in kv_caches.values())
        direct = getattr(self.engine, "protocol", self.config.protocol) == "rdma"
        device_kv = next(iter(kv_caches.values())).device if on_device and direct else None
        if on_device and not direct and self.vllm_config.kv_transfer_config.is_kv_consumer:
            raise ValueError("MooncakeVllmConnector: receiving KV into device memory needs "
                             "protocol='rdma' (TCP cannot write GPU memory); got protocol="
                             f"{self.config.protocol!r}")
        stager = None
        if self.config.staging == "on" or (self.config.staging == "auto" and on_device
                                           and not direct):
            device = next(iter(kv_caches.values())).device
            stager = StagingBuffer(self.config.staging_buffer_mb << 20, device)
            self.engine.register(stager.base, stager.nbytes)
            logger.info("MooncakeVllmConnector: sending through a %d MiB %s staging buffer",
                        self.config.staging_buffer_mb,
                        "pinned" if stager.stream is not None else "host")
        return stager, device_kv

    def shutdown(self) -> None:
        self._stop.set()
        if self.cores is not None:
            self.cores.withdraw()
        if self.prefill is not None:
            self.prefill.stop()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.metadata is not None:
            try:
                self.metadata.close()
            except Exception as e:
                logger.warning("closing metadata client: %s", e)
            self.metadata = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ------------------------------------------------------------------ health

    def _health_loop(self) -> None:
        """Every few seconds: are the threads alive, and does the engine accept a transfer
        from itself (listener, handshake, a serving thread)? The answer is logged when it
        changes and counted (`vllm:mooncake_health_failures_total`) and answered to Ping on the
        control channel."""
        unpin_current_thread()
        probe = np.zeros(64, np.uint8)
        try:
            self.engine.register(probe.ctypes.data, probe.nbytes)
            seg = self.engine.open_segment(self.engine.descriptor())
        except Exception as e:
            self._set_health(f"engine self-check could not start: {e}")
            return
        addr = np.array([probe.ctypes.data], np.uint64)
        half = np.array([probe.nbytes // 2], np.uint64)
        while not self._stop.wait(HEALTH_INTERVAL_S):
            why = ""
            if self.control is not None and not self.control.alive():
                why = "the control channel's thread has died"
            elif self.prefill is not None and not self.prefill.threads_alive():
                why = "a transfer thread (completion or poster) has died"
            else:
                try:
                    self.engine.transfer_sync(seg, "write", addr, addr + half, half)
                except Exception as e:
                    why = f"the engine refused a transfer to itself: {e}"
            self._set_health(why)

    def _set_health(self, why: str) -> None:
        if why != self.unhealthy:
            if why:
                logger.error("MooncakeVllmConnector worker tp%d is not healthy: %s",
                             self.tp_rank, why)
            else:
                logger.info("MooncakeVllmConnector worker tp%d is healthy again", self.tp_rank)
        self.unhealthy = why
        if why:
            with self.lock:
                self.stats.add(health_failures=1)

    # ------------------------------------------------------------------ model thread

    def bind(self, meta: MooncakeMetadata) -> None:
        """Before the forward pass: learn this step's saves, holds, receives and releases."""
        self._meta = meta
        assert self.prefill is not None and self.decode is not None
        self.prefill.bind(meta, time.monotonic())
        self.decode.bind(meta)
        if self.pool is not None:
            self.pool.bind(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Called as each attention layer starts.

        P: where the backend writes the KV cache in an op of its own before attention (and
        the cache is host memory, so the write is complete), this layer's KV is already in
        place: post it now, not after the attention and MLP, which shortens the pipeline.
        D, pipelined loads: block until P has written this layer (decode_side.py)."""
        meta = self._meta
        if meta is None:
            return
        if meta.saves and self._kv_written_before_attention(layer_name):
            self.save_kv_layer(layer_name)
        layer = self.layer_index.get(layer_name)
        if meta.recvs and layer is not None and self.decode is not None:
            self.decode.wait_layer(meta, layer)

    def _kv_written_before_attention(self, layer_name: str) -> bool:
        known = self._early_post.get(layer_name)
        if known is None:
            known = False
            if all(t.device.type == "cpu" for t in self.kv_caches.values()):
                try:
                    from vllm.forward_context import get_forward_context

                    backend = get_forward_context().no_compile_layers[layer_name].attn_backend
                    known = not getattr(backend, "forward_includes_kv_cache_update", True)
                except (AssertionError, AttributeError, KeyError):  # no context: the safe way
                    known = False
            if not self._early_post:
                logger.info("MooncakeVllmConnector: each layer is posted %s", "as its KV is "
                            "written, before attention" if known else "after attention")
            self._early_post[layer_name] = known
        return known

    def save_kv_layer(self, layer_name: str) -> None:
        meta = self._meta
        if meta is None or not meta.saves or self.prefill is None:
            return
        layer = self.layer_index.get(layer_name)
        if layer is not None:
            self.prefill.save_layer(meta, layer)

    def wait_for_save(self) -> None:
        meta = self._meta
        if meta is not None and meta.saves and self.prefill is not None:
            self.prefill.end_forward(meta, time.monotonic())
        if meta is not None and meta.pool_saves and self.pool is not None:
            self.pool.after_forward(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        assert self.prefill is not None and self.decode is not None
        meta = self._meta
        if meta is not None and meta.idle and not finished_req_ids:
            sides = [self.prefill, self.decode, *([self.pool] if self.pool else [])]
            wait_for_news(self.news, sides, IDLE_STEP_WAIT_S)
        sending = self.prefill.take_finished()
        freed, recving = self.decode.get_finished(finished_req_ids)
        return sending | freed, recving

    def take_load_errors(self) -> set[int]:
        errors = self.decode.take_load_errors() if self.decode is not None else set()
        if self.pool is not None and self.pool.load_errors:
            errors |= self.pool.load_errors
            self.pool.load_errors = set()
        return errors

    def take_gate_report(self) -> GateReport | None:
        report = self.decode.take_gate_report() if self.decode is not None else None
        prefetched = self.pool.take_reports() if self.pool is not None else set()
        if prefetched:
            report = report or GateReport()
            report.prefetched |= prefetched
        return report

    def take_stats(self) -> MooncakeStats | None:
        with self.lock:
            return self.stats.take()

    # ------------------------------------------------------------------ control thread

    def _send(self, to: bytes | str, msg: m.Message) -> None:
        if self.control is not None:
            self.control.send(to, msg)

    def _on_message(self, sender: bytes | str, msg: m.Message) -> None:
        if isinstance(msg, m.Ping) and isinstance(sender, bytes):
            extra = self.doctor.pong_fields() if self.doctor is not None else {}
            self._send(sender, m.Pong(m.PROTOCOL_VERSION, msg.transfer_id, not self.unhealthy,
                                      self.unhealthy[:4000], self.tp_rank, **extra))
        elif isinstance(msg, m.Check) and isinstance(sender, bytes):
            if self.doctor is not None:
                self.doctor.on_check(sender, msg)
        elif isinstance(sender, bytes):  # a peer called our ROUTER: it asks us, as prefill
            if self.prefill is not None:
                self.prefill.on_message(sender, msg)
        elif self.decode is not None:  # a reply on one of our DEALERs: we are its decode
            self.decode.on_message(sender, msg)

    def _on_refused(self, endpoint: str, reason: str) -> None:
        if self.decode is not None:
            self.decode.peer_refused(endpoint, reason)

    def _on_tick(self) -> None:
        now = time.monotonic()
        if self.prefill is not None:
            self.prefill.tick(now)
        if self.decode is not None:
            self.decode.tick(now)
