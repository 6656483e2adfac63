"""Worker half: registers the KV cache with the engine, posts per-layer writes, tracks completion.

Threads: the model thread (metadata, save_kv_layer, wait_for_save, get_finished), the control
channel thread (messages and deadlines) and the completion thread (waits on write batches in
the order they were posted). One lock guards the transfer tables; engine calls made under it
return at once (submit) so no thread waits on I/O while holding it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata

from mooncake_vllm.config import ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.control import (
    ControlChannel,
    unpin_current_thread,
    widened_affinity,
)
from mooncake_vllm.connector.layout import KVLayout, layer_transfer, memory_regions
from mooncake_vllm.connector.pipeline_gate import GateReport, Watchers
from mooncake_vllm.connector.scheduler import MooncakeMetadata, RecvSpec
from mooncake_vllm.connector.staging import Slot, StagingBuffer
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.transfers import Incoming, Outgoing

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")
V = m.PROTOCOL_VERSION
# P: how often it repeats a pipelined transfer's progress to D (D's silence timeout is longer).
PIPELINE_HEARTBEAT_S = 0.5


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
        self.layer_arrived = threading.Condition(self.lock)  # pipelined loads wait on it
        self.stats = MooncakeStats()
        self.engine: Any = None
        self.layout: KVLayout | None = None
        self.layer_index: dict[str, int] = {}
        self.control: ControlChannel | None = None
        self.metadata: Any = None
        self.segment_name = f"{config.instance_id}-{self.engine_id}-tp{self.tp_rank}"
        self.handshake: WorkerHandshake | None = None
        self._meta: MooncakeMetadata | None = None
        self._next_heartbeat = 0.0
        self._early_post: dict[str, bool] = {}  # layer -> its KV is in the cache at its start
        # P side
        self.out: dict[str, Outgoing] = {}  # by transfer id
        self.early: dict[str, tuple[bytes, m.Register, float]] = {}  # registrations before P
        self.tombstones: dict[str, tuple[str, float]] = {}  # tid -> why it is gone, until
        self.watchers = Watchers()  # D schedulers waiting for a pipelined head to start
        self.finished_sending: set[str] = set()
        # (transfer, batch id, layer, bytes, blocks, staging slot), in post order.
        self._completions: queue.SimpleQueue[
            tuple[Outgoing, int, int, int, int, Slot | None] | None] = queue.SimpleQueue()
        self._completion_thread: threading.Thread | None = None
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.stager: StagingBuffer | None = None
        self._posts: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._poster_thread: threading.Thread | None = None
        self._device_kv: torch.device | None = None  # KV in device memory, read by RDMA
        # D side
        self.inc: dict[str, Incoming] = {}  # by transfer id
        self.finished_recving: set[str] = set()
        self.load_errors: set[int] = set()
        self.gate_report = GateReport()

    # ------------------------------------------------------------------ setup

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from mooncake_vllm.engine import TransferEngine

        mc = self.vllm_config.model_config
        self.layout = KVLayout.from_caches(
            kv_caches, self.kv_cache_config.num_blocks, block_size=self.block_size,
            num_kv_heads=mc.get_num_kv_heads(self.vllm_config.parallel_config),
            head_size=mc.get_head_size(), model=str(mc.served_model_name or mc.model),
            tp_rank=self.tp_rank, tp_size=self.tp_size)
        self.layer_index = {n: i for i, n in enumerate(self.layout.layer_names)}
        c = self.config
        with widened_affinity():  # the engine's threads must not share the model's core
            self.engine = TransferEngine(
                hostname=c.hostname, protocol=c.protocol, port=c.engine_port,
                cluster_token=c.cluster_token, timeout_s=c.engine_timeout_s,
                connections_per_peer=c.connections_per_peer,
                rdma_devices=list(c.rdma_devices) if c.rdma_devices else None)
        for addr, length in memory_regions(kv_caches):
            self.engine.register(addr, length)
        self.kv_caches = dict(kv_caches)
        self._setup_staging(kv_caches)
        port = c.control_port + self.tp_rank if c.control_port else 0
        self.control = ControlChannel(c.hostname, port, self._on_message, self._on_tick)
        if c.uses_etcd:
            from mooncake_vllm.connector.registry import open_store

            self.metadata = open_store(c)
            self.metadata.publish_segment(self.segment_name, self.engine.descriptor())
        self._completion_thread = threading.Thread(
            target=self._completion_loop, name="mooncake-completions", daemon=True)
        self._completion_thread.start()
        info = self.layout.info()
        self.handshake = WorkerHandshake(
            control=self.control.endpoint, segment_name=self.segment_name, tp_rank=self.tp_rank,
            layout={k: getattr(info, k) for k in ("model", "block_size", "dtype", "num_kv_heads",
                                                  "head_size", "num_layers", "tp_size")})
        logger.info("MooncakeVllmConnector worker tp%d: %d layers, %d blocks of %d B/plane, "
                    "control %s, engine %s", self.tp_rank, len(self.layout.layer_names),
                    self.layout.num_blocks, self.layout.block_bytes, self.control.endpoint,
                    self.engine.descriptor().get("endpoint"))

    def _setup_staging(self, kv_caches: dict[str, torch.Tensor]) -> None:
        on_device = any(t.device.type != "cpu" for t in kv_caches.values())
        direct = getattr(self.engine, "protocol", self.config.protocol) == "rdma"
        if on_device and direct:
            self._device_kv = next(iter(kv_caches.values())).device
            self._start_poster()
        if on_device and not direct and self.vllm_config.kv_transfer_config.is_kv_consumer:
            raise ValueError("MooncakeVllmConnector: receiving KV into device memory needs "
                             "protocol='rdma' (TCP cannot write GPU memory); got protocol="
                             f"{self.config.protocol!r}")
        if self.config.staging == "on" or (self.config.staging == "auto" and on_device
                                           and not direct):
            device = next(iter(kv_caches.values())).device
            self.stager = StagingBuffer(self.config.staging_buffer_mb << 20, device)
            self.engine.register(self.stager.base, self.stager.nbytes)
            if self.stager.stream is not None:
                self._start_poster()
            logger.info("MooncakeVllmConnector: sending through a %d MiB %s staging buffer",
                        self.config.staging_buffer_mb,
                        "pinned" if self.stager.stream is not None else "host")

    def _start_poster(self) -> None:
        if self._poster_thread is None:
            self._poster_thread = threading.Thread(
                target=self._poster_loop, name="mooncake-poster", daemon=True)
            self._poster_thread.start()

    def _poster_loop(self) -> None:
        """Posts batches once the device work they read has run: the staged copy (GPU + TCP),
        or the kernels that wrote the KV (GPU + RDMA reads device memory directly)."""
        unpin_current_thread()
        while True:
            item = self._posts.get()
            if item is None:
                return
            ev, tr, layer, arrays, nbytes, nblocks, slot = item
            try:
                ev.synchronize()
                bid = self.engine.submit(tr.segment, "write", *arrays)
            except Exception as e:
                if slot is not None and self.stager is not None:
                    self.stager.free(slot)
                with self.lock:
                    tr.inflight -= 1
                    tr.layer_inflight[layer] -= 1
                    self._fail(tr, f"posting a staged batch failed: {e}")
                    self._maybe_finish(tr)
                continue
            self._completions.put((tr, bid, layer, nbytes, nblocks, slot))

    def shutdown(self) -> None:
        self._posts.put(None)
        self._completions.put(None)
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metadata is not None:
            try:
                self.metadata.close()
            except Exception as e:
                logger.warning("closing metadata client: %s", e)
            self.metadata = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ------------------------------------------------------------------ model thread

    def bind(self, meta: MooncakeMetadata) -> None:
        """Before the forward pass: learn this step's saves, holds, receives and releases."""
        self._meta = meta
        now = time.monotonic()
        with self.lock:
            for s in meta.saves:
                tr = self.out.get(s.transfer_id)
                if tr is None:
                    tr = Outgoing(s.transfer_id, s.req_id, len(self.layer_index),
                                  s.num_prompt_tokens)
                    self.out[s.transfer_id] = tr
                    gone = self.tombstones.pop(s.transfer_id, None)
                    if gone is not None:  # D called it off before P even started
                        tr.released = True
                        tr.notified = True
                    early = self.early.pop(s.transfer_id, None)
                    if early is not None:
                        self._accept_registration(tr, early[0], early[1])
                tr.block_ids = np.asarray(s.block_ids, np.int64)
                if not tr.head_started and s.computed + s.scheduled >= s.num_prompt_tokens:
                    tr.head_started = True  # its last chunk is in this step
                    watcher = self.watchers.pop(s.transfer_id)
                    if watcher is not None:
                        self._send(watcher, m.Started(V, s.transfer_id, True))
                logger.debug("transfer %s: step computes tokens %d..%d of %d", s.transfer_id,
                             s.computed, s.computed + s.scheduled, s.num_prompt_tokens)
                # Tokens computed before this step (prefix-cache hits, earlier chunks) are
                # valid in every layer already; they are sent like freshly computed ones.
                tr.ready = [max(r, min(s.computed, s.num_prompt_tokens)) for r in tr.ready]
            for rid, ok in meta.held.items():
                tr = self._out_by_req(rid)
                if tr is None:  # nothing was ever scheduled: free at once
                    self.finished_sending.add(rid)
                    continue
                tr.held = ok
                if not ok and not tr.stopped():
                    tr.failed = "prefill request was aborted or failed"
                if tr.reg is None and not tr.stopped():
                    tr.reg_deadline = now + self.config.registration_timeout_s
                self._maybe_finish(tr)
        if meta.watches:
            with self.lock:
                self.stats.add(pipeline_gate_waits=len(meta.watches))
        for tid, rc in meta.watches:
            controls = rc.get("control") or []
            if self.tp_rank < len(controls):  # else the registration reports the mismatch
                self._send(controls[self.tp_rank], m.Watch(V, tid))
        for r in meta.recvs:
            self._register_with_prefill(r)
        for tid, rc, why in meta.releases:
            for ep in rc.get("control", []):
                self._send(ep, m.Release(V, tid, why))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Called as each attention layer starts.

        P: where the backend writes the KV cache in an op of its own before attention (and
        the cache is host memory, so the write is complete), this layer's KV is already in
        place: post it now, not after the attention and MLP, which shortens the pipeline.
        D, pipelined loads: block until P has written this layer of every head this step
        reads. A head that fails or times out is given up: its blocks are reported as load
        errors (vLLM then applies kv_load_failure_policy) and no later layer waits for it."""
        meta = self._meta
        if meta is None:
            return
        if meta.saves and self._kv_written_before_attention(layer_name):
            self.save_kv_layer(layer_name)
        layer = self.layer_index.get(layer_name)
        if not meta.recvs or layer is None:
            return
        with self.lock:
            for r in meta.recvs:
                tr = self.inc.get(r.transfer_id) if r.sync else None
                silence = self.config.pipeline_silence_timeout_s
                while tr is not None and not tr.error and tr.layers_written <= layer:
                    now = time.monotonic()
                    if now >= tr.deadline:
                        tr.error = (f"layer {layer} did not arrive within "
                                    f"{self.config.transfer_timeout_s:.1f}s")
                    elif now >= tr.heard + silence:
                        tr.error = (f"waiting for layer {layer}, no word from the prefill "
                                    f"instance for {silence:.1f}s (gone or cut off?)")
                    else:
                        self.layer_arrived.wait(min(tr.deadline, tr.heard + silence) - now)
                        continue
                    tr.releasing_for_timeout = True
                    self._send(tr.endpoint, m.Release(V, tr.transfer_id, "decode timed out"))
                if tr is not None and tr.error:
                    # Given up: the blocks stay the request's while vLLM recomputes or fails
                    # it, so a late write from P could only rewrite the same values.
                    self.inc.pop(tr.transfer_id, None)
                    self._load_failed(tr, tr.error)

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
        if meta is None or not meta.saves:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        with self.lock:
            for s in meta.saves:
                tr = self.out.get(s.transfer_id)
                if tr is None:
                    continue
                tr.ready[layer] = max(tr.ready[layer],
                                      min(s.computed + s.scheduled, s.num_prompt_tokens))
                self._post(tr, layer)

    def wait_for_save(self) -> None:
        meta = self._meta
        if meta is None or not meta.saves:
            return
        now = time.monotonic()
        with self.lock:
            for s in meta.saves:
                tr = self.out.get(s.transfer_id)
                if tr is not None and tr.fully_computed() and not tr.forward_end:
                    tr.forward_end = now
                    self._maybe_finish(tr)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        with self.lock:
            for tr in self.inc.values():
                # A pipelined load is over once its forward pass ran: every layer arrived (P
                # writes nothing more) or it was given up (and released) there.
                if tr.req_id in finished_req_ids and not tr.aborting and not tr.sync:
                    # Aborted on D while its KV is still coming: vLLM keeps the blocks until
                    # we report the request received, which waits for P to stop writing.
                    tr.aborting = True
                    tr.deadline = time.monotonic() + self.config.abort_ack_timeout_s
                    self._send(tr.endpoint, m.Release(V, tr.transfer_id, "decode aborted"))
            sending, self.finished_sending = self.finished_sending, set()
            recving, self.finished_recving = self.finished_recving, set()
        return sending, recving

    def take_load_errors(self) -> set[int]:
        with self.lock:
            errs, self.load_errors = self.load_errors, set()
        return errs

    def take_gate_report(self) -> GateReport | None:
        with self.lock:
            report, self.gate_report = self.gate_report, GateReport()
        return report if report.started or report.alive else None

    def take_stats(self) -> MooncakeStats | None:
        with self.lock:
            return self.stats.take()

    # ------------------------------------------------------------------ P: posting

    def _post(self, tr: Outgoing, layer: int) -> None:
        """Post one batched WRITE of this layer's newly valid blocks (lock held)."""
        if tr.reg is None or tr.stopped():
            return
        bs = self.block_size
        ready = tr.ready[layer]
        lo = max(tr.sent[layer], tr.reg.first_block)
        # Only whole blocks travel until the prompt's last token is computed: a block that a
        # later chunk still fills is sent once, complete. Sending it partly filled and again
        # later would put two writes to one decode block in flight on different connections,
        # and the stale one could land last.
        filled = -(-ready // bs) if ready >= tr.num_prompt_tokens else ready // bs
        hi = min(filled, tr.total_blocks, len(tr.block_ids))
        if hi <= lo:
            return
        assert self.layout is not None
        first = tr.reg.first_block
        local_ids, remote_ids = tr.block_ids[lo:hi], tr.remote_ids[lo - first:hi - first]
        local_planes = [(p.base, p.stride) for p in self.layout.planes[layer]]
        bb = self.layout.block_bytes
        slot, event = None, None
        if self.stager is not None:
            try:
                slot = self.stager.alloc(len(local_ids) * bb * len(local_planes),
                                         self.config.engine_timeout_s)
                event = self.stager.gather(self.kv_caches[self.layout.layer_names[layer]],
                                           local_planes, bb, self.layout.num_blocks,
                                           local_ids, slot)
            except Exception as e:
                if slot is not None:
                    self.stager.free(slot)
                self._fail(tr, f"staging layer {layer} failed: {e}")
                return
            n = len(local_ids)
            local_planes = [(self.stager.base + slot.offset + p * n * bb, bb)
                            for p in range(len(local_planes))]
            local_ids = np.arange(n, dtype=np.int64)
        elif self._device_kv is not None:
            # RDMA reads device memory straight away: wait (on the poster thread, not here)
            # until the kernels that wrote this layer's KV have run.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device_kv))
        la, ra, ln = layer_transfer(local_planes, tr.reg.layout.planes[layer], bb,
                                    local_ids, remote_ids)
        if event is not None:  # device copy still running: the poster thread submits
            tr.inflight += 1
            tr.layer_inflight[layer] += 1
            self._posts.put((event, tr, layer, (la, ra, ln), int(ln.sum()), hi - lo, slot))
            bid = None
        else:
            try:
                bid = self.engine.submit(tr.segment, "write", la, ra, ln)
            except Exception as e:
                if slot is not None and self.stager is not None:
                    self.stager.free(slot)
                self._fail(tr, f"posting layer {layer} failed: {e}")
                return
            tr.inflight += 1
            tr.layer_inflight[layer] += 1
        if not tr.first_post:
            tr.first_post = time.monotonic()
        if self.config.measure_non_overlapped and slot is None:
            tr.posted.append((la, ra, ln))
        tr.sent[layer] = hi
        if bid is not None:
            self._completions.put((tr, bid, layer, int(ln.sum()), hi - lo, slot))

    def _completion_loop(self) -> None:
        unpin_current_thread()
        while True:
            item = self._completions.get()
            if item is None:
                return
            tr, bid, layer, nbytes, nblocks, slot = item
            err = ""
            try:
                self.engine.wait(bid, timeout_s=self.config.engine_timeout_s + 5)
            except Exception as e:  # TransferError, timeout: the write did not land
                err = str(e) or type(e).__name__
            finally:
                with contextlib.suppress(Exception):
                    self.engine.release(bid)
                if slot is not None and self.stager is not None:
                    self.stager.free(slot)
            with self.lock:
                tr.inflight -= 1
                tr.layer_inflight[layer] -= 1
                tr.last_done = time.monotonic()
                if err:
                    self._fail(tr, f"write to decode failed: {err}")
                else:
                    tr.bytes += nbytes
                    tr.blocks += nblocks
                self._maybe_finish(tr)

    def _fail(self, tr: Outgoing, why: str) -> None:
        if not tr.stopped():
            tr.failed = why
            logger.warning("transfer %s (request %s): %s", tr.transfer_id, tr.req_id, why)

    def _maybe_finish(self, tr: Outgoing) -> None:
        """Tell D and free the blocks once nothing more will be written (lock held)."""
        if tr.reg is not None and tr.reg.layer_progress and not tr.notified \
                and not tr.stopped():
            written = tr.layers_written(self.block_size)
            if written > tr.layers_reported:
                assert tr.reply_to is not None
                tr.layers_reported = written
                self._send(tr.reply_to, m.Layers(V, tr.transfer_id, written))
        if not tr.notified and tr.inflight == 0:
            if tr.stopped() and tr.reply_to is not None:
                if tr.released:
                    self._send(tr.reply_to, m.Released(V, tr.transfer_id))
                else:
                    self.stats.add(failures=1)
                    self._send(tr.reply_to, m.Done(V, tr.transfer_id, False, tr.failed))
                tr.notified = True
            elif tr.stopped():
                # Nobody registered yet: keep the reason for a registration still on its way.
                self.tombstones[tr.transfer_id] = (
                    tr.failed or "released", time.monotonic() + self.config.registration_timeout_s)
                tr.notified = True
            elif (tr.reg is not None and tr.forward_end and tr.fully_computed()
                  and tr.fully_posted(self.block_size)):
                self._complete(tr)
        if tr.notified and tr.held is not None:
            self.finished_sending.add(tr.req_id)
            self.out.pop(tr.transfer_id, None)

    def _complete(self, tr: Outgoing) -> None:
        exposed = max(0.0, tr.last_done - tr.forward_end)
        transfer_s = max(0.0, tr.last_done - tr.first_post)
        non_overlapped = 0.0
        if self.config.measure_non_overlapped and tr.posted:
            non_overlapped = self._resend(tr)
        self.stats.add(bytes_sent=tr.bytes, blocks_sent=tr.blocks, transfers_sent=1)
        self.stats.observe("transfer_s", transfer_s)
        self.stats.observe("exposed_s", exposed)
        if non_overlapped:
            self.stats.observe("non_overlapped_s", non_overlapped)
        logger.info("mooncake transfer %s done: request=%s bytes=%d blocks=%d transfer_s=%.6f "
                    "exposed_s=%.6f non_overlapped_s=%.6f", tr.transfer_id, tr.req_id, tr.bytes,
                    tr.blocks, transfer_s, exposed, non_overlapped)
        assert tr.reply_to is not None
        self._send(tr.reply_to, m.Done(V, tr.transfer_id, True, "", tr.bytes, tr.blocks,
                                       transfer_s, exposed))
        tr.notified = True

    def _resend(self, tr: Outgoing) -> float:
        """Benchmark: the same writes, all posted after the forward pass, timed end to end."""
        t0 = time.perf_counter()
        bids = [self.engine.submit(tr.segment, "write", *arrays) for arrays in tr.posted]
        for bid in bids:
            self.engine.wait(bid, timeout_s=self.config.engine_timeout_s)
            self.engine.release(bid)
        return time.perf_counter() - t0

    def _out_by_req(self, req_id: str) -> Outgoing | None:
        return next((t for t in self.out.values() if t.req_id == req_id), None)

    # ------------------------------------------------------------------ P: registrations

    def _accept_registration(self, tr: Outgoing, reply_to: bytes, reg: m.Register) -> None:
        """Check and attach D's registration, then flush layers already computed (lock held)."""
        tr.reply_to = reply_to
        if tr.stopped():
            self._maybe_finish(tr)
            return
        assert self.layout is not None
        why = m.layout_mismatch(self.layout.info(), reg.layout)
        if why is None and reg.layout.tp_rank != self.tp_rank:
            why = (f"KV layout mismatch: tp_rank is {self.tp_rank} on prefill but "
                   f"{reg.layout.tp_rank} on decode")
        if why is None:
            try:
                desc = reg.segment
                if desc is None:
                    if self.metadata is None:
                        raise RuntimeError(f"segment {reg.segment_name!r} sent by name, but "
                                           "this instance has no metadata server (p2p mode)")
                    desc = self.metadata.get_segment(reg.segment_name)
                    if desc is None:
                        raise RuntimeError(f"segment {reg.segment_name!r} is not published")
                tr.segment = self.engine.open_segment(desc)
            except Exception as e:
                why = f"cannot open decode segment {reg.segment_name!r}: {e}"
        if why is not None:
            logger.error("transfer %s refused: %s", reg.transfer_id, why)
            tr.failed = why
            self._maybe_finish(tr)
            return
        tr.reg = reg
        tr.remote_ids = np.asarray(reg.block_ids, np.int64)
        for layer in range(len(tr.ready)):
            self._post(tr, layer)
        self._maybe_finish(tr)

    # ------------------------------------------------------------------ D: registering

    def _register_with_prefill(self, r: RecvSpec) -> None:
        assert self.layout is not None and self.engine is not None
        controls = r.remote_control.get("control") or []
        end = -(-r.num_tokens // self.block_size)
        blocks = r.block_ids[r.first_block:end]
        with self.lock:
            if self.tp_rank >= len(controls):
                # P cannot serve this rank: fail the load so vLLM applies its policy.
                logger.error("transfer %s: prefill has %d control endpoints, decode rank %d "
                             "has none (tensor parallel sizes differ)", r.transfer_id,
                             len(controls), self.tp_rank)
                self.load_errors.update(blocks)
                self.finished_recving.add(r.req_id)
                self.stats.add(failures=1)
                return
            ep = controls[self.tp_rank]
            self.inc[r.transfer_id] = Incoming(
                r.transfer_id, r.req_id, ep, blocks,
                deadline=time.monotonic() + self.config.transfer_timeout_s, sync=r.sync)
        logger.debug("transfer %s: registering %d blocks with %s", r.transfer_id, len(blocks), ep)
        self._send(ep, m.Register(
            V, r.transfer_id, self.engine_id, self.segment_name,
            None if self.config.uses_etcd else self.engine.descriptor(),
            self.layout.info(), r.first_block, blocks, r.num_tokens, layer_progress=r.sync))

    # ------------------------------------------------------------------ control thread

    def _send(self, to: bytes | str, msg: m.Message) -> None:
        if self.control is not None:
            self.control.send(to, msg)

    def _on_message(self, sender: bytes | str, msg: m.Message) -> None:
        with self.lock:
            if isinstance(msg, m.Register) and isinstance(sender, bytes):
                self._on_register(sender, msg)
            elif isinstance(msg, m.Release) and isinstance(sender, bytes):
                self._on_release(sender, msg)
            elif isinstance(msg, m.Watch) and isinstance(sender, bytes):
                self._on_watch(sender, msg)
            elif isinstance(msg, m.Started):
                (self.gate_report.started if msg.started else self.gate_report.alive).add(
                    msg.transfer_id)
            elif isinstance(msg, m.Layers):
                tr = self.inc.get(msg.transfer_id)
                if tr is not None:
                    tr.heard = time.monotonic()
                    if msg.written > tr.layers_written:
                        tr.layers_written = msg.written
                        self.layer_arrived.notify_all()
            elif isinstance(msg, m.Done | m.Released):
                self._on_reply(msg)
            else:
                logger.warning("control: refused %s from %r (wrong direction)",
                               type(msg).__name__, sender)

    def _on_register(self, sender: bytes, reg: m.Register) -> None:
        tr = self.out.get(reg.transfer_id)
        logger.debug("transfer %s: registration for %d blocks from %s (prefill %s)",
                     reg.transfer_id, len(reg.block_ids), reg.engine_id,
                     "known" if tr is not None else "not seen yet")
        if tr is not None:
            if tr.reply_to is not None:
                logger.warning("transfer %s: duplicate registration refused", reg.transfer_id)
                return
            self._accept_registration(tr, sender, reg)
            return
        gone = self.tombstones.get(reg.transfer_id)
        if gone is not None:
            self._send(sender, m.Done(V, reg.transfer_id, False, gone[0]))
            return
        # The prefill half may sit in this instance's queue for a while under load: keep the
        # registration as long as the decode side is willing to wait for it, not less
        # (a shorter wait here made D give up on requests P was about to serve).
        keep_s = max(self.config.registration_timeout_s, self.config.transfer_timeout_s)
        self.early[reg.transfer_id] = (sender, reg, time.monotonic() + keep_s)

    def _on_watch(self, sender: bytes, watch: m.Watch) -> None:
        """D waits to schedule a pipelined request until its head is started here: answer at
        once if it is (or if the transfer is already over: D then learns why when it
        registers), else when bind() schedules the head's last chunk."""
        tr = self.out.get(watch.transfer_id)
        if (tr is not None and tr.head_started) or watch.transfer_id in self.tombstones:
            self._send(sender, m.Started(V, watch.transfer_id, True))
            return
        self.watchers.add(watch.transfer_id, sender,
                          time.monotonic() + self.config.transfer_timeout_s)

    def _on_release(self, sender: bytes, rel: m.Release) -> None:
        logger.info("transfer %s released by decode: %s", rel.transfer_id, rel.reason)
        self.watchers.pop(rel.transfer_id)
        tr = self.out.get(rel.transfer_id)
        early = self.early.pop(rel.transfer_id, None)
        if tr is None or tr.notified:
            if tr is None:
                self.tombstones[rel.transfer_id] = (
                    "released by decode: " + rel.reason,
                    time.monotonic() + self.config.registration_timeout_s)
            self._send(sender, m.Released(V, rel.transfer_id))
            return
        if tr.reply_to is None:
            tr.reply_to = early[0] if early else sender
        tr.released = True
        self._maybe_finish(tr)

    def _on_reply(self, msg: m.Done | m.Released) -> None:
        tr = self.inc.pop(msg.transfer_id, None)
        if tr is None:
            return  # already timed out here; nothing waits for it
        if tr.sync:
            self._on_pipelined_reply(tr, msg)
            return
        if isinstance(msg, m.Done) and msg.ok and not tr.aborting:
            self.stats.add(bytes_received=msg.bytes, blocks_received=msg.blocks,
                           transfers_received=1)
            self.stats.observe("transfer_s", msg.transfer_s)
            self.finished_recving.add(tr.req_id)
            return
        if not tr.aborting:
            why = msg.reason if isinstance(msg, m.Done) else "released by prefill"
            if tr.releasing_for_timeout:
                why = (f"prefill did not complete the transfer within "
                       f"{self.config.transfer_timeout_s:.1f}s")
            self._load_failed(tr, why)
        else:
            self.finished_recving.add(tr.req_id)

    def _pipeline_heartbeats(self) -> None:
        """P: tell D that pipelined transfers still open are alive (lock held): D's forward
        pass is blocked on them and otherwise cannot tell a queued head from a dead peer."""
        for tr in self.out.values():
            if (tr.reg is not None and tr.reg.layer_progress and tr.reply_to is not None
                    and not tr.notified and not tr.stopped()):
                self._send(tr.reply_to, m.Layers(V, tr.transfer_id, tr.layers_reported))
        for tid, (sender, reg, _) in self.early.items():
            if reg.layer_progress:  # registered before P scheduled its half: still queued
                self._send(sender, m.Layers(V, tid, 0))
        for tid, sender in self.watchers.items():  # its head is still queued here
            self._send(sender, m.Started(V, tid, False))

    def _on_pipelined_reply(self, tr: Incoming, msg: m.Done | m.Released) -> None:
        """A pipelined load is not reported in finished_recving: vLLM never parked the request
        (the load was synchronous). A forward pass may be waiting on it: wake it."""
        if isinstance(msg, m.Done) and msg.ok:
            tr.layers_written = len(self.layer_index)
            self.stats.add(bytes_received=msg.bytes, blocks_received=msg.blocks,
                           transfers_received=1)
            self.stats.observe("transfer_s", msg.transfer_s)
        elif tr.layers_written < len(self.layer_index):
            # The forward pass that waits for (or is about to read) the missing layers reports
            # the load error: keep the record for it.
            tr.error = msg.reason if isinstance(msg, m.Done) else "released by prefill"
            self.inc[tr.transfer_id] = tr
        self.layer_arrived.notify_all()

    def _load_failed(self, tr: Incoming, why: str) -> None:
        logger.error("KV load for request %s (transfer %s) failed: %s; %d blocks affected",
                     tr.req_id, tr.transfer_id, why, len(tr.block_ids))
        self.stats.add(failures=1)
        self.load_errors.update(tr.block_ids)
        if not tr.sync:  # a pipelined request was never parked waiting for it
            self.finished_recving.add(tr.req_id)

    def _on_tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + PIPELINE_HEARTBEAT_S
                self._pipeline_heartbeats()
            self.watchers.expire(now)
            for tid, (sender, _, deadline) in list(self.early.items()):
                if now >= deadline:
                    del self.early[tid]
                    self._send(sender, m.Done(V, tid, False, "no prefill request with this "
                                              "transfer id arrived in time"))
            for tid, (_, until) in list(self.tombstones.items()):
                if now >= until:
                    del self.tombstones[tid]
            for tr in list(self.out.values()):
                if tr.reg is None and tr.reg_deadline and now >= tr.reg_deadline \
                        and not tr.stopped():
                    logger.warning(
                        "transfer %s (request %s): decode never registered within %.1fs; "
                        "freeing the prefill blocks", tr.transfer_id, tr.req_id,
                        self.config.registration_timeout_s)
                    tr.failed = "decode did not register in time"
                    self._maybe_finish(tr)
            for tid, tr in list(self.inc.items()):
                if now < tr.deadline:
                    continue
                if tr.sync:
                    # Its forward pass times it out (and reports it); this only forgets a
                    # record whose final Done never came.
                    if now >= tr.deadline + self.config.abort_ack_timeout_s:
                        del self.inc[tid]
                    continue
                if tr.aborting:
                    logger.warning("transfer %s: prefill did not confirm the release within "
                                   "%.1fs; releasing the blocks anyway", tid,
                                   self.config.abort_ack_timeout_s)
                    del self.inc[tid]
                    self.finished_recving.add(tr.req_id)
                elif not tr.releasing_for_timeout:
                    # Ask P to stop before reusing the blocks: a late write must not land in
                    # blocks that are being recomputed.
                    tr.releasing_for_timeout = True
                    tr.deadline = now + self.config.abort_ack_timeout_s
                    self._send(tr.endpoint, m.Release(V, tid, "decode timed out"))
                else:
                    del self.inc[tid]
                    self._load_failed(tr, f"prefill did not complete the transfer within "
                                      f"{self.config.transfer_timeout_s:.1f}s")
