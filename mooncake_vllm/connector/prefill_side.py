"""The prefill (P) side of the control protocol: posting each layer's KV into D's blocks.

Driven by the model thread (bind, save_layer, end_forward), the control thread (on_message,
tick) and the completion thread (one engine batch at a time, in post order). It takes an
engine and a `send(to, message)` function, so unit tests drive it message by message.

Failure rules (the only place they are stated for P):
- A registration is accepted once per transfer; later ones, and every message about a
  transfer from anyone but the peer that registered it, are refused and logged.
- A block of D's is written only between D's registration and P's Done/Released for it, and
  never later than `Register.wait_s` after the registration arrived: past that, D may already
  have taken its blocks back, so P posts nothing more and fails the transfer.
- P answers Released (D's Release) or Done only once no write of its own is in flight, so D
  gets its blocks back only when nothing of P's can still land in them.
- A request that vLLM preempts on P had its blocks freed, and another request may overwrite
  them while writes read from them: its transfer fails, so D never uses what was sent.
- Anything wrong with one message or one batch fails that transfer (D is told why); the
  threads go on.
- Tables that strangers can grow (early registrations, tombstones, watchers) are bounded.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from mooncake_vllm.channel.control_channel import unpin_current_thread
from mooncake_vllm.config import ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.head_slices import head_transfer
from mooncake_vllm.connector.layout import HeadGeometry, KVLayout, Plane, layer_transfer
from mooncake_vllm.connector.pipeline_gate import Watchers
from mooncake_vllm.connector.staging import Slot, StagingBuffer
from mooncake_vllm.connector.stats import MooncakeStats, measuring_non_overlapped
from mooncake_vllm.connector.step_schema import MooncakeMetadata
from mooncake_vllm.connector.thread_dump import thread_stacks
from mooncake_vllm.connector.tp_mapping import TPMismatch, decode_ranks_fed, head_runs_into
from mooncake_vllm.connector.transfers import Outgoing

logger = logging.getLogger("vllm.mooncake_vllm.connector")
V = m.PROTOCOL_VERSION
Send = Callable[[bytes | str, m.Message], None]
# How often P repeats a pipelined transfer's progress to D (D's silence timeout is longer).
PIPELINE_HEARTBEAT_S = 0.5
# A transfer still writing this long after D registered is logged once, with what every
# thread is doing: on one host it should take milliseconds past P's forward pass.
SLOW_TRANSFER_S = 5.0
# Bounds on what peers can make P remember.
MAX_EARLY = 4096
MAX_EARLY_BLOCKS = 1 << 20  # block ids held by early registrations, all together
MAX_TOMBSTONES = 65536


class PrefillSide:
    def __init__(self, *, engine: Any, send: Send, config: ConnectorConfig, layout: KVLayout,
                 block_size: int, tp_rank: int, stats: MooncakeStats,
                 lock: threading.RLock, metadata: Any = None,
                 stager: StagingBuffer | None = None,
                 kv_caches: dict[str, Any] | None = None, device_kv: Any = None,
                 news: threading.Condition | None = None) -> None:
        self.engine, self._send, self.config, self.layout = engine, send, config, layout
        self.block_size, self.tp_rank, self.stats, self.lock = block_size, tp_rank, stats, lock
        # Notified (under `lock`) whenever has_news() may have turned true: an idle step
        # waits on it instead of spinning (worker.py).
        self.news = news if news is not None else threading.Condition(lock)
        self.measure_non_overlapped = measuring_non_overlapped()  # benchmark hook
        self.metadata, self.stager, self.device_kv = metadata, stager, device_kv
        self.kv_caches = kv_caches or {}
        self.num_layers = len(layout.layer_names)
        # By transfer id: one Outgoing per decode rank this rank writes into (one between
        # equal tensor-parallel sizes); before the first registration, one of unknown rank.
        self.out: dict[str, list[Outgoing]] = {}
        # Registrations that came before P scheduled the request, by (transfer id, decode
        # rank): (from, record, arrived).
        self.early: OrderedDict[tuple[str, int], tuple[bytes, m.Register, float]] = \
            OrderedDict()
        self.tombstones: OrderedDict[str, tuple[str, float]] = OrderedDict()  # tid -> why, until
        self.watchers = Watchers()  # D schedulers waiting for a pipelined head to start
        self.finished_sending: set[str] = set()
        self._next_heartbeat = 0.0
        # (transfer, batch id, layer, bytes, blocks, staging slot), in post order.
        self._completions: queue.SimpleQueue[
            tuple[Outgoing, int, int, int, int, Slot | None] | None] = queue.SimpleQueue()
        self._posts: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        self._spawn(self._completion_loop, "mooncake-completions")
        if self.device_kv is not None or (self.stager is not None
                                          and self.stager.stream is not None):
            self._spawn(self._poster_loop, "mooncake-poster")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._posts.put(None)
        self._completions.put(None)

    def threads_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ model thread

    def bind(self, meta: MooncakeMetadata, now: float) -> None:
        """Before the forward pass: this step's saves and the requests now held for us."""
        with self.lock:
            for tid in meta.preempted:
                for tr in list(self.out.get(tid, ())):
                    self._fail(tr, "the prefill request was preempted: its blocks were freed "
                               "while writes from them could still be in flight")
                    self._maybe_finish(tr)
            for s in meta.saves:
                group = self.out.get(s.transfer_id)
                if group is not None and group[0].req_id != s.req_id:
                    continue  # a second request under one transfer id: it sends nothing
                if group is None:
                    group = self._start(s.transfer_id, s.req_id, s.num_prompt_tokens)
                head_started = s.computed + s.scheduled >= s.num_prompt_tokens
                if head_started and not group[0].head_started:  # its last chunk is in this step
                    watcher = self.watchers.pop(s.transfer_id)
                    if watcher is not None:
                        self._send(watcher, m.Started(V, s.transfer_id, True))
                for tr in group:
                    tr.block_ids = np.asarray(s.block_ids, np.int64)
                    tr.head_started = tr.head_started or head_started
                    # Tokens computed before this step (prefix-cache hits, earlier chunks) are
                    # valid in every layer already; they are sent like freshly computed ones.
                    tr.ready = [max(r, min(s.computed, s.num_prompt_tokens)) for r in tr.ready]
            for rid, ok in meta.held.items():
                group = self._out_by_req(rid)
                if group is None:  # nothing was ever scheduled: free at once
                    self.finished_sending.add(rid)
                    continue
                for tr in list(group):
                    tr.held = ok
                    if not ok and not tr.stopped():
                        tr.failed = "prefill request was aborted or failed"
                    if tr.reg is None and not tr.stopped():
                        tr.reg_deadline = now + self.config.registration_timeout_s
                    self._maybe_finish(tr)
            if meta.watches:
                self.stats.add(pipeline_gate_waits=len(meta.watches))

    def _start(self, tid: str, req_id: str, num_prompt_tokens: int) -> list[Outgoing]:
        """The request's first step here: its transfer, and the registrations that came
        first (lock held)."""
        tr = Outgoing(tid, req_id, self.num_layers, num_prompt_tokens)
        group = self.out[tid] = [tr]
        if self.tombstones.pop(tid, None) is not None:  # D called it off before P started
            tr.released = True
            tr.notified = True
        for key in [k for k in self.early if k[0] == tid]:
            sender, reg, arrived = self.early.pop(key)
            self._on_register(sender, reg, arrived)
        return group

    def save_layer(self, meta: MooncakeMetadata, layer: int) -> None:
        """Layer `layer` of this step's tokens is in the cache: post what it completed."""
        with self.lock:
            for s in meta.saves:
                for tr in self.out.get(s.transfer_id, ()):
                    if tr.req_id != s.req_id:
                        break
                    tr.ready[layer] = max(tr.ready[layer],
                                          min(s.computed + s.scheduled, s.num_prompt_tokens))
                    self._post(tr, layer)

    def end_forward(self, meta: MooncakeMetadata, now: float) -> None:
        with self.lock:
            for s in meta.saves:
                for tr in list(self.out.get(s.transfer_id, ())):
                    if tr.req_id == s.req_id and tr.fully_computed() and not tr.forward_end:
                        tr.forward_end = now
                        self._maybe_finish(tr)

    def has_news(self) -> bool:
        """Something for vLLM's next step: blocks to give back (lock held)."""
        return bool(self.finished_sending)

    def take_finished(self) -> set[str]:
        with self.lock:
            done, self.finished_sending = self.finished_sending, set()
        return done

    # ------------------------------------------------------------------ posting

    def _post(self, tr: Outgoing, layer: int) -> None:
        """Post one batched WRITE of this layer's newly valid blocks (lock held)."""
        if tr.reg is None or tr.stopped():
            return
        if time.monotonic() >= tr.write_until:
            self._fail(tr, f"decode's wait of {tr.reg.wait_s:.1f}s for this transfer is over; "
                       "its blocks may no longer be ours to write")
            self._maybe_finish(tr)
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
        first = tr.reg.first_block
        local_ids, remote_ids = tr.block_ids[lo:hi], tr.remote_ids[lo - first:hi - first]
        local_planes = [(p.base, p.stride) for p in self.layout.planes[layer]]
        bb = self.layout.block_bytes
        slot, event = None, None
        try:
            if self.stager is not None:
                # Under the lock every thread waits with us: a short wait only (the slots
                # are freed by the completion thread outside the lock).
                slot = self.stager.alloc(len(local_ids) * bb * len(local_planes), 1.0)
                event = self.stager.gather(self.kv_caches[self.layout.layer_names[layer]],
                                           local_planes, bb, self.layout.num_blocks,
                                           local_ids, slot)
                n = len(local_ids)
                local_planes = [(self.stager.base + slot.offset + p * n * bb, bb)
                                for p in range(len(local_planes))]
                local_ids = np.arange(n, dtype=np.int64)
            elif self.device_kv is not None:
                import torch

                # RDMA reads device memory straight away: wait (on the poster thread, not
                # here) until the kernels that wrote this layer's KV have run.
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device_kv))
            if tr.head_runs is None:
                la, ra, ln = layer_transfer(local_planes, tr.reg.layout.planes[layer], bb,
                                            local_ids, remote_ids)
            else:
                la, ra, ln = self._head_writes(tr, layer, local_ids, remote_ids)
            bid = None
            if event is None:
                bid = self.engine.submit(tr.segment, "write", la, ra, ln)
        except Exception as e:  # a bad address from D, a full staging buffer, ...
            if slot is not None and self.stager is not None:
                self.stager.free(slot)
            self._fail(tr, f"posting layer {layer} failed: {e}")
            self._maybe_finish(tr)
            return
        tr.inflight += 1
        tr.layer_inflight[layer] += 1
        if not tr.first_post:
            tr.first_post = time.monotonic()
        if self.measure_non_overlapped and slot is None:
            tr.posted.append((la, ra, ln))
        tr.sent[layer] = hi
        if bid is None:  # device copy still running: the poster thread submits
            self._posts.put((event, tr, layer, (la, ra, ln), int(ln.sum()), hi - lo, slot))
        else:
            self._completions.put((tr, bid, layer, int(ln.sum()), hi - lo, slot))

    def _head_writes(self, tr: Outgoing, layer: int, local_ids: np.ndarray,
                     remote_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Between tensor-parallel sizes: this rank's runs of heads, each into its place in
        the decode rank's blocks (head_slices.py), one range per block, plane and run."""
        assert tr.reg is not None and tr.head_runs and self.layout.heads is not None
        theirs = HeadGeometry(*tr.reg.layout.heads)  # type: ignore[misc]
        remote = [Plane(b, st) for b, st in tr.reg.layout.planes[layer]]
        parts = [head_transfer(self.layout.planes[layer], self.layout.heads, remote, theirs,
                               local_ids, remote_ids, run.src_head, run.dst_head, run.count)
                 for run in tr.head_runs]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))  # type: ignore[return-value]

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
                with self.lock:  # the device work may have taken past D's wait
                    if tr.stopped() or time.monotonic() >= tr.write_until:
                        raise RuntimeError("decode's wait was over before the batch was ready")
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
            try:
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
            except Exception:  # one transfer's bookkeeping must not end the thread
                logger.exception("transfer %s: completion handling failed", tr.transfer_id)

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
                    self._send(tr.reply_to, m.Done(V, tr.transfer_id, False, tr.failed[:4000]))
                tr.notified = True
            elif tr.stopped():
                # Nobody registered yet: keep the reason for a registration still on its way.
                self._tombstone(tr.transfer_id, tr.failed or "released")
                tr.notified = True
            elif (tr.reg is not None and tr.forward_end and tr.fully_computed()
                  and tr.fully_posted(self.block_size)):
                self._complete(tr)
        group = self.out.get(tr.transfer_id, [])
        if tr.notified and tr.held is not None and all(t.notified for t in group):
            # Every decode rank it feeds is told: the request's blocks may go.
            self.finished_sending.add(tr.req_id)
            self.out.pop(tr.transfer_id, None)
            self.news.notify_all()

    def _complete(self, tr: Outgoing) -> None:
        exposed = max(0.0, tr.last_done - tr.forward_end)
        transfer_s = max(0.0, tr.last_done - tr.first_post)
        non_overlapped = 0.0
        if self.measure_non_overlapped and tr.posted:
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

    def _out_by_req(self, req_id: str) -> list[Outgoing] | None:
        return next((g for g in self.out.values() if g[0].req_id == req_id), None)

    def _all_out(self) -> list[Outgoing]:
        return [tr for group in self.out.values() for tr in group]

    def _tombstone(self, tid: str, why: str) -> None:
        self.tombstones[tid] = (why, time.monotonic() + self.config.registration_timeout_s)
        self.tombstones.move_to_end(tid)
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    # ------------------------------------------------------------------ registrations

    def _accept_registration(self, tr: Outgoing, reply_to: bytes, reg: m.Register,
                             arrived: float) -> None:
        """Check and attach D's registration, then flush layers already computed (lock held)."""
        tr.reply_to = reply_to
        if tr.stopped():
            self._maybe_finish(tr)
            return
        mine = self.layout.info()
        why = m.layout_mismatch(mine, reg.layout)
        if why is None:
            try:
                tr.head_runs = head_runs_into(mine, reg.layout)
            except TPMismatch as e:
                why = f"KV layout mismatch: {e}"
        if why is None and tr.head_runs is None and reg.layout.tp_rank != self.tp_rank:
            why = (f"KV layout mismatch: tp_rank is {self.tp_rank} on prefill but "
                   f"{reg.layout.tp_rank} on decode")
        if why is None and tr.head_runs is not None and self.stager is not None:
            why = ("a prefill of another tensor-parallel size than its decode writes heads "
                   "out of each block, which the staging buffer does not do yet")
        last_landing = self.config.last_write_landing_s(reg.wait_s)
        if why is None and last_landing > reg.horizon_s + 1e-6:
            why = (f"decode takes its blocks back {reg.horizon_s:.1f}s after registering, but "
                   f"a write of this prefill may land up to {last_landing:.1f}s after it "
                   f"(engine_timeout_s={self.config.engine_timeout_s:g} here): give both "
                   "sides the same engine_timeout_s")
        if why is None:
            try:
                desc = reg.segment
                if desc is None:
                    if self.metadata is None:
                        raise RuntimeError(f"segment {reg.segment_name!r} sent by name, but "
                                           "this instance has no metadata server (p2p mode)")
                    # D just registered, so it is alive even if its key lapsed.
                    desc = self.metadata.last_segment(reg.segment_name)
                    if desc is None:
                        raise RuntimeError(f"segment {reg.segment_name!r} is not published")
                tr.segment = self.engine.open_segment(desc)
            except Exception as e:
                why = f"cannot open decode segment {reg.segment_name!r}: {e}"
        if why is not None:
            logger.error("transfer %s refused: %s", reg.transfer_id, why)
            tr.failed = why
            if tr.dst_rank is None:  # the decode's other ranks learn why when they register
                self._tombstone(reg.transfer_id, why)
            self._maybe_finish(tr)
            return
        if tr.dst_rank is None:
            # The first registration says the decode's size: one transfer per decode rank
            # this rank writes into (rank to rank between equal sizes).
            tr.dst_rank = reg.layout.tp_rank
            others = decode_ranks_fed(mine, reg.layout) - {tr.dst_rank}
            self.out[tr.transfer_id].extend(tr.sibling(r) for r in sorted(others))
        tr.reg = reg
        tr.write_until = arrived + reg.wait_s
        tr.registered_at = arrived
        tr.remote_ids = np.asarray(reg.block_ids, np.int64)
        for layer in range(len(tr.ready)):
            self._post(tr, layer)
        self._maybe_finish(tr)

    # ------------------------------------------------------------------ control thread

    def on_message(self, sender: bytes, msg: m.Message) -> None:
        with self.lock:
            if isinstance(msg, m.Register):
                self._on_register(sender, msg)
            elif isinstance(msg, m.Release):
                self._on_release(sender, msg)
            elif isinstance(msg, m.Watch):
                self._on_watch(sender, msg)
            else:
                logger.warning("control: refused %s from %r (wrong direction)",
                               type(msg).__name__, sender)

    def _on_register(self, sender: bytes, reg: m.Register, arrived: float | None = None
                     ) -> None:
        now = time.monotonic() if arrived is None else arrived
        tid, rank = reg.transfer_id, reg.layout.tp_rank
        group = self.out.get(tid)
        logger.debug("transfer %s: registration for %d blocks from %s rank %d (prefill %s)",
                     tid, len(reg.block_ids), reg.engine_id, rank,
                     "known" if group is not None else "not seen yet")
        if group is not None:
            tr = _dest_for(group, rank)
            first = next((t.reg for t in group if t.reg is not None), None)
            if tr is None or (tr.reply_to is None and first is not None and (
                    first.engine_id, first.layout.tp_size, first.layout.total_kv_heads) != (
                    reg.engine_id, reg.layout.tp_size, reg.layout.total_kv_heads)):
                # Not a rank of the decode instance (and layout) the first registration set.
                self._send(sender, m.Done(V, tid, False, (
                    f"prefill rank {self.tp_rank} writes into no decode rank {rank} of this "
                    "transfer's decode instance")[:4000]))
                return
            if tr.notified and tr.reply_to != sender:
                # Over before this rank registered (failed, preempted, or the first rank's
                # registration refused): say why at once.
                self._send(sender, m.Done(V, tid, False, (tr.failed or "released")[:4000]))
                return
            if tr.reply_to is not None:
                logger.warning("transfer %s: duplicate registration refused", tid)
                return
            self._accept_registration(tr, sender, reg, now)
            return
        gone = self.tombstones.get(tid)
        if gone is not None:
            self._send(sender, m.Done(V, tid, False, gone[0]))
            return
        if (tid, rank) in self.early:
            logger.warning("transfer %s: duplicate registration refused", tid)
            return
        held = sum(len(r.block_ids) for _, r, _ in self.early.values())
        if len(self.early) >= MAX_EARLY or held + len(reg.block_ids) > MAX_EARLY_BLOCKS:
            logger.warning("transfer %s: refused, %d registrations already wait for their "
                           "prefill request", tid, len(self.early))
            self._send(sender, m.Done(V, tid, False,
                                      "prefill has too many registrations waiting"))
            return
        # The prefill half may sit in this instance's queue for a while under load: keep the
        # registration as long as the decode side is willing to wait for it, not less
        # (a shorter wait here made D give up on requests P was about to serve).
        self.early[(tid, rank)] = (sender, reg, now)

    def _on_watch(self, sender: bytes, watch: m.Watch) -> None:
        """D waits to schedule a pipelined request until its head is started here: answer at
        once if it is (or if the transfer is already over: D then learns why when it
        registers), else when bind() schedules the head's last chunk."""
        group = self.out.get(watch.transfer_id)
        if (group and group[0].head_started) or watch.transfer_id in self.tombstones:
            self._send(sender, m.Started(V, watch.transfer_id, True))
            return
        if len(self.watchers) >= MAX_EARLY:
            logger.warning("transfer %s: watch refused, %d already wait", watch.transfer_id,
                           len(self.watchers))
            return
        self.watchers.add(watch.transfer_id, sender,
                          time.monotonic() + self.config.transfer_timeout_s)

    def _on_release(self, sender: bytes, rel: m.Release) -> None:
        """D calls a transfer off: the part it registered, or, before it registered, the
        parts nobody has registered yet (every decode rank of a request calls it off)."""
        tid = rel.transfer_id
        group = self.out.get(tid, [])
        early = [k for k, (who, _, _) in self.early.items() if k[0] == tid and who == sender]
        mine = [t for t in group if t.reply_to == sender] or [
            t for t in group if t.reply_to is None]
        if not mine and not early and group and all(t.notified for t in group):
            self._send(sender, m.Released(V, tid))  # over already: nothing of ours can land
            return
        if not mine and not early and (group or any(k[0] == tid for k in self.early)):
            logger.warning("transfer %s: refused a Release from %r, which did not register "
                           "it", tid, sender)
            return
        logger.info("transfer %s released by decode: %s", tid, rel.reason)
        self.watchers.pop(tid)
        for key in early:
            del self.early[key]
        live = [t for t in mine if not t.notified]
        if not live:
            if not group:
                self._tombstone(tid, "released by decode: " + rel.reason)
            self._send(sender, m.Released(V, tid))
            return
        for tr in live:
            if tr.reply_to is None:
                tr.reply_to = sender
            tr.released = True
            self._maybe_finish(tr)

    def _heartbeats(self) -> None:
        """Tell D that pipelined transfers still open are alive (lock held): D's forward
        pass is blocked on them and otherwise cannot tell a queued head from a dead peer."""
        for tr in self._all_out():
            if (tr.reg is not None and tr.reg.layer_progress and tr.reply_to is not None
                    and not tr.notified and not tr.stopped()):
                self._send(tr.reply_to, m.Layers(V, tr.transfer_id, tr.layers_reported))
        for (tid, _), (sender, reg, _) in self.early.items():
            if reg.layer_progress:  # registered before P scheduled its half: still queued
                self._send(sender, m.Layers(V, tid, 0))
        for tid, sender in self.watchers.items():  # its head is still queued here
            self._send(sender, m.Started(V, tid, False))

    def tick(self, now: float) -> None:
        with self.lock:
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + PIPELINE_HEARTBEAT_S
                self._heartbeats()
            self.watchers.expire(now)
            for key, (sender, reg, arrived) in list(self.early.items()):
                if now >= arrived + reg.wait_s:
                    del self.early[key]
                    tid = key[0]
                    self._send(sender, m.Done(V, tid, False, "no prefill request with this "
                                              "transfer id arrived in time"))
            for tid, (_, until) in list(self.tombstones.items()):
                if now >= until:
                    del self.tombstones[tid]
            for tr in self._all_out():
                if tr.reg is None and tr.reg_deadline and now >= tr.reg_deadline \
                        and not tr.stopped():
                    logger.warning(
                        "transfer %s (request %s): decode never registered within %.1fs; "
                        "freeing the prefill blocks", tr.transfer_id, tr.req_id,
                        self.config.registration_timeout_s)
                    tr.failed = "decode did not register in time"
                    self._maybe_finish(tr)
                elif (tr.reg is not None and now >= tr.write_until and not tr.stopped()
                      and not tr.notified):
                    self._fail(tr, f"decode's wait of {tr.reg.wait_s:.1f}s is over before "
                               "every layer was written")
                    self._maybe_finish(tr)
                elif (tr.reg is not None and not tr.notified and not tr.slow_reported
                      and now - tr.registered_at >= SLOW_TRANSFER_S):
                    tr.slow_reported = True
                    self._report_slow(tr, now)

    def _report_slow(self, tr: Outgoing, now: float) -> None:
        """Where a slow transfer stands (lock held): computed (tokens per layer), posted
        (blocks per layer), writes in flight, and what each thread is doing."""
        since_done = f"{now - tr.last_done:.1f}s ago" if tr.last_done else "never"
        logger.warning(
            "transfer %s (request %s): still not done %.1fs after decode registered: "
            "%d prompt tokens, computed per layer %s, blocks posted per layer %s, writes in "
            "flight per layer %s, last write landed %s%s; threads: %s",
            tr.transfer_id, tr.req_id, now - tr.registered_at, tr.num_prompt_tokens,
            tr.ready, tr.sent, tr.layer_inflight, since_done,
            f", failed: {tr.failed}" if tr.failed else "", thread_stacks())


def _dest_for(group: list[Outgoing], rank: int) -> Outgoing | None:
    """The part of a request's transfer for decode rank `rank`: its own, or, before the
    first registration, the one of unknown rank; None when this rank feeds no such rank."""
    for tr in group:
        if tr.dst_rank == rank:
            return tr
    return group[0] if group[0].dst_rank is None else None
