"""The decode (D) side of the control protocol: lending blocks to P's writes, getting them back.

Driven by the model thread (bind, wait_layer, get_finished) and the control thread
(on_message, tick). It takes an engine and a `send(to, message)` function, so unit tests drive
it message by message.

Failure rules (the only place they are stated for D):
- D lends a request's blocks to P when it sends the registration, and takes them back only
  when P has said that no write of its own can still land (Done, or Released after D's
  Release), or when P's write deadline has certainly passed: the write horizon
  (`ConnectorConfig.write_horizon_s` after the registration), derived from D's wait, the
  control channel's delivery bound and the engine's batch timeout. Until then vLLM keeps
  the blocks: a request parked for remote KV is not reported received, a pipelined
  request that finished has its blocks freed late (the scheduler delays the free), and a
  running pipelined request whose load was given up is reported unsettled, so that the
  scheduler keeps vLLM from preempting it (`has_pending_block_frees`).
- D waits `transfer_timeout_s` for the KV (a pipelined load also gives up after
  `pipeline_silence_timeout_s` without a word from P); then it asks P to stop (Release) and
  reports the load as failed to vLLM, whose `kv_load_failure_policy` applies.
- Replies are accepted only from the endpoint the registration went to; anything else about
  a transfer is refused and logged. An error in handling one message fails that transfer.
- Between tensor-parallel sizes a request's KV comes from every prefill rank that holds some
  of this rank's heads (its feeders, tp_mapping.py): each is registered with and answers for
  itself, the blocks come back only once every feeder has answered, and a failure of one
  asks the others to stop.
- A prefill worker that refuses our frames for want of our cluster token (control.py's
  notice) fails every transfer registered with it at once: it cannot write into our blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mooncake_vllm.channel.control_channel import REFUSED_TOKEN, endpoint_refusal
from mooncake_vllm.config import ConnectorConfig
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.layout import KVLayout
from mooncake_vllm.connector.pipeline_gate import GateReport
from mooncake_vllm.connector.stats import MooncakeStats
from mooncake_vllm.connector.step_schema import MooncakeMetadata, RecvSpec
from mooncake_vllm.connector.tp_mapping import TPMismatch, feeders, head_map
from mooncake_vllm.connector.transfers import Incoming

logger = logging.getLogger("vllm.mooncake_vllm.connector")
V = m.PROTOCOL_VERSION
Send = Callable[[bytes | str, m.Message], None]
class DecodeSide:
    def __init__(self, *, engine: Any, send: Send, config: ConnectorConfig, layout: KVLayout,
                 block_size: int, tp_rank: int, engine_id: str, segment_name: str,
                 descriptor: dict | None, stats: MooncakeStats,
                 lock: threading.RLock, news: threading.Condition | None = None,
                 recompute_failed_loads: bool = False) -> None:
        self.engine, self._send, self.config, self.layout = engine, send, config, layout
        # vLLM's kv_load_failure_policy is "recompute": a failed load is counted as such.
        self.recompute_failed_loads = recompute_failed_loads
        self.block_size, self.tp_rank, self.stats, self.lock = block_size, tp_rank, stats, lock
        self.engine_id, self.segment_name, self.descriptor = engine_id, segment_name, descriptor
        self.num_layers = len(layout.layer_names)
        self.layer_arrived = threading.Condition(lock)  # pipelined loads wait on it
        # Notified (under `lock`) whenever has_news() may have turned true: an idle step
        # waits on it instead of spinning (worker.py).
        self.news = news if news is not None else threading.Condition(lock)
        self.inc: dict[str, Incoming] = {}  # by transfer id
        self.finished_recving: set[str] = set()
        # Pipelined requests whose blocks vLLM holds after they finished, until settled.
        self.finished_sending: set[str] = set()
        self._finished_here: set[str] = set()  # pipelined, finished in vLLM, not settled
        self._settled_sync: set[str] = set()  # pipelined, settled, not finished in vLLM
        self.load_errors: set[int] = set()
        self.gate_report = GateReport()
        self.watching: dict[str, tuple[str, float]] = {}  # tid -> (P's endpoint, until)

    # ------------------------------------------------------------------ model thread

    def bind(self, meta: MooncakeMetadata) -> None:
        now = time.monotonic()
        for tid, rc in meta.watches:
            ep = self._endpoint(rc)
            if ep is not None:  # else the registration reports the mismatch
                with self.lock:
                    self.watching[tid] = (ep, now + self.config.transfer_timeout_s)
                self._send(ep, m.Watch(V, tid))
        for r in meta.recvs:
            self._register(r, now)
        for tid, rc, why in meta.releases:
            feeding, idle, _ = self._feeders(rc)
            for ep in (*feeding, *idle):
                self._send(ep, m.Release(V, tid, why))

    def _endpoint(self, rc: dict[str, Any]) -> str | None:
        controls = rc.get("control")
        if not isinstance(controls, list) or self.tp_rank >= len(controls):
            return None
        return controls[self.tp_rank] if endpoint_refusal(controls[self.tp_rank]) is None \
            else None

    def _feeders(self, rc: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
        """(the prefill ranks' control endpoints this rank's KV comes from, those of prefill
        ranks that feed no decode rank at all, why not) for P's `remote_control`. Equal
        tensor-parallel sizes: rank r from rank r. Different: every rank holding some of our
        heads (tp_mapping.py); with replicated heads some prefill ranks feed nobody."""
        controls = rc.get("control")
        if not isinstance(controls, list) or not controls:
            return (), (), "remote_control names no control endpoints"
        p_tp, d_tp = len(controls), self.layout.tp_size
        idle: list[int] = []
        if p_tp == d_tp:
            ranks = [self.tp_rank]
        else:
            total = self.layout.total_kv_heads or self.layout.num_kv_heads * d_tp
            try:
                runs = head_map(total, p_tp, d_tp)
            except TPMismatch as e:
                return (), (), f"prefill tensor-parallel size {p_tp}, decode {d_tp}: {e}"
            ranks = sorted(feeders(runs, self.tp_rank))
            if self.tp_rank == 0:  # one decode rank tells them, once
                idle = sorted(set(range(p_tp)) - {r.src_rank for r in runs})
        for r in ranks:
            why = endpoint_refusal(controls[r])
            if why is not None:
                return (), (), why
        return (tuple(controls[r] for r in ranks),
                tuple(controls[r] for r in idle if endpoint_refusal(controls[r]) is None), None)

    def _register(self, r: RecvSpec, now: float) -> None:
        end = -(-r.num_tokens // self.block_size)
        blocks = r.block_ids[r.first_block:end]
        with self.lock:
            endpoints, idle, why = self._feeders(r.remote_control)
            if why is None and r.transfer_id in self.inc:
                # Two requests under one transfer id (a client's n > 1 sent disaggregated):
                # P serves the first registration only; this one must not wait on it.
                why = (f"transfer id already in use here by request "
                       f"{self.inc[r.transfer_id].req_id}")
            if why is not None:
                logger.error("transfer %s: %s", r.transfer_id, why)
                self._count_failed_load()
                self.load_errors.update(blocks)
                if r.sync:  # nothing was lent: its blocks may go as soon as it finishes
                    self._settled_sync.add(r.req_id)
                else:
                    self.finished_recving.add(r.req_id)
                self.stats.add(failures=1)
                return
            self.stats.add(**{"pipelined_prefills" if r.sync else "remote_prefills": 1})
            wait = self.config.transfer_timeout_s
            self.inc[r.transfer_id] = Incoming(
                r.transfer_id, r.req_id, endpoints, blocks, deadline=now + wait,
                horizon=now + self.config.write_horizon_s, sync=r.sync, idle=idle)
        logger.debug("transfer %s: registering %d blocks with %s", r.transfer_id, len(blocks),
                     ", ".join(endpoints))
        for ep in endpoints:
            self._send(ep, m.Register(
                V, r.transfer_id, self.engine_id, self.segment_name, self.descriptor,
                self.layout.info(), r.first_block, blocks, r.num_tokens,
                layer_progress=r.sync, wait_s=wait, horizon_s=self.config.write_horizon_s))
        for ep in idle:  # they hold the request's blocks until told
            self._send(ep, m.Release(V, r.transfer_id, "this prefill rank holds none of the "
                                     "decode instance's KV heads"))

    def _release(self, tr: Incoming, why: str) -> None:
        """Ask every feeder that has not answered yet to stop (once each; lock held)."""
        for ep in sorted(tr.pending - tr.released_to):
            tr.released_to.add(ep)
            self._send(ep, m.Release(V, tr.transfer_id, why))

    def wait_layer(self, meta: MooncakeMetadata, layer: int) -> None:
        """Pipelined loads: block until P has written this layer of every head this step
        reads. A head that fails or times out is given up: its blocks are reported as load
        errors (vLLM then applies kv_load_failure_policy) and no later layer waits for it."""
        with self.lock:
            for r in meta.recvs:
                tr = self.inc.get(r.transfer_id) if r.sync else None
                silence = self.config.pipeline_silence_timeout_s
                while tr is not None and not tr.error and tr.layers_written <= layer:
                    now = time.monotonic()
                    if now >= tr.deadline:
                        tr.error = (f"layer {layer} did not arrive within "
                                    f"{self.config.transfer_timeout_s:.1f}s")
                    elif now >= tr.last_heard() + silence:
                        tr.error = (f"waiting for layer {layer}, no word from the prefill "
                                    f"instance for {silence:.1f}s (gone or cut off?)")
                    else:
                        self.layer_arrived.wait(min(tr.deadline, tr.last_heard() + silence)
                                                - now)
                        continue
                    tr.releasing_for_timeout = True
                    self._release(tr, "decode timed out")
                if tr is not None and tr.error and not tr.reported:
                    # Given up: the record stays until P confirms or the write horizon
                    # passes; the request's blocks are freed only then, and until then the
                    # scheduler keeps vLLM from preempting it (which frees them at once).
                    tr.reported = True
                    self.gate_report.unsettled.add((tr.req_id, self.tp_rank))
                    self._load_failed(tr, tr.error)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests whose blocks vLLM may free now, requests whose KV has arrived)."""
        with self.lock:
            for tr in self.inc.values():
                if tr.req_id not in finished_req_ids:
                    continue
                if tr.sync:
                    self._finished_here.add(tr.req_id)
                    if not tr.settled and not tr.releasing_for_timeout:
                        tr.releasing_for_timeout = True
                        self._release(tr, "decode finished")
                elif not tr.aborting:
                    # Aborted on D while its KV is still coming: vLLM keeps the blocks until
                    # we report the request received, which waits for P to stop writing.
                    tr.aborting = True
                    self._release(tr, "decode aborted")
            # Pipelined requests that finished after their transfer was settled.
            pending = {tr.req_id for tr in self.inc.values() if tr.sync}
            for rid in finished_req_ids:
                if rid in self._settled_sync and rid not in pending:
                    self.finished_sending.add(rid)
                    self._settled_sync.discard(rid)
            sending, self.finished_sending = self.finished_sending, set()
            recving, self.finished_recving = self.finished_recving, set()
        return sending, recving

    def has_news(self) -> bool:
        """Something for vLLM's next step: KV arrived or failed, blocks to free, a gate
        report (lock held)."""
        return bool(self.finished_recving or self.finished_sending or self.load_errors
                    or self.gate_report)

    def take_load_errors(self) -> set[int]:
        with self.lock:
            errs, self.load_errors = self.load_errors, set()
        return errs

    def take_gate_report(self) -> GateReport | None:
        with self.lock:
            report, self.gate_report = self.gate_report, GateReport()
        return report if report else None

    # ------------------------------------------------------------------ control thread

    def on_message(self, sender: str, msg: m.Message) -> None:
        with self.lock:
            if isinstance(msg, m.Started):
                watch = self.watching.get(msg.transfer_id)
                if watch is None or watch[0] != sender:
                    self._refuse(msg, sender)
                    return
                if msg.started:
                    self.watching.pop(msg.transfer_id, None)
                (self.gate_report.started if msg.started else self.gate_report.alive).add(
                    msg.transfer_id)
                self.news.notify_all()
                return
            tr = self.inc.get(msg.transfer_id)
            if tr is None or tr.settled:
                return  # already over here; nothing waits for it
            if sender not in tr.written:
                if sender not in tr.idle:  # an idle rank's Released: expected, no news
                    self._refuse(msg, sender)
                return
            tr.heard[sender] = time.monotonic()
            if isinstance(msg, m.Layers):
                if msg.written > tr.written[sender]:
                    tr.written[sender] = min(msg.written, self.num_layers)
                    self.layer_arrived.notify_all()
            elif isinstance(msg, m.Done | m.Released):
                self._on_reply(tr, sender, msg)
            else:
                logger.warning("control: refused %s from %r (wrong direction)",
                               type(msg).__name__, sender)

    def peer_refused(self, endpoint: str, reason: str) -> None:
        """The prefill worker at `endpoint` refused a frame of ours (control.py's notice).
        With another cluster token it refuses every frame of ours and holds no engine
        connection to us (the engine demands the same token), so no write of its can land:
        every transfer registered with it fails now, naming the cause, instead of at its
        deadline. Any other reason may concern one frame only: logged (by the channel)."""
        if reason != REFUSED_TOKEN:
            return
        why = (f"prefill {endpoint} refused this instance's control frames: the two "
               "instances' cluster_token differ; set the same cluster_token on both (and on "
               "the conductor)")
        with self.lock:
            for tr in [t for t in self.inc.values() if endpoint in t.pending]:
                if not tr.error:
                    tr.error = why
                tr.pending.discard(endpoint)
                if tr.pending:  # other prefill ranks may still be writing: stop them first
                    self._release(tr, "another prefill rank failed: " + why[:200])
                else:
                    self._settle(tr, False)
            for tid in [t for t, (ep, _) in self.watching.items() if ep == endpoint]:
                del self.watching[tid]
            self.layer_arrived.notify_all()  # a pipelined step waiting on one of them

    def _refuse(self, msg: m.Message, sender: str) -> None:
        logger.warning("control: refused %s for transfer %s from %r: not the prefill worker "
                       "it was registered with", type(msg).__name__,
                       getattr(msg, "transfer_id", "?"), sender)

    def _on_reply(self, tr: Incoming, sender: str, msg: m.Done | m.Released) -> None:
        """A feeder will write nothing more into this transfer's blocks; once every feeder
        has said so, settle it (lock held)."""
        if sender not in tr.pending:
            return  # its second answer
        tr.pending.discard(sender)
        if isinstance(msg, m.Done) and msg.ok:
            tr.written[sender] = self.num_layers
            tr.bytes, tr.blocks = tr.bytes + msg.bytes, tr.blocks + msg.blocks
            tr.transfer_s = max(tr.transfer_s, msg.transfer_s)
        elif not tr.error:
            tr.error = msg.reason if isinstance(msg, m.Done) else "released by prefill"
            if tr.releasing_for_timeout and not tr.sync:
                tr.error = (f"prefill did not complete the transfer within "
                            f"{self.config.transfer_timeout_s:.1f}s")
        if tr.pending:
            if tr.error:  # the KV cannot be whole: the other feeders may stop
                self._release(tr, "another prefill rank failed: " + tr.error[:200])
            self.layer_arrived.notify_all()
            return
        ok = not tr.error
        if ok:
            logger.info("KV of request %s arrived: transfer %s, %d blocks, %d bytes in %.3fs",
                        tr.req_id, tr.transfer_id, tr.blocks, tr.bytes, tr.transfer_s)
            self.stats.add(bytes_received=tr.bytes, blocks_received=tr.blocks,
                           transfers_received=1)
            self.stats.observe("transfer_s", tr.transfer_s)
        self._settle(tr, ok)
        self.layer_arrived.notify_all()

    def _settle(self, tr: Incoming, ok: bool) -> None:
        """No write of P's can land any more: give the blocks back to vLLM (lock held)."""
        tr.settled = True
        self.inc.pop(tr.transfer_id, None)
        if tr.sync:
            # A pipelined load was never parked: its forward pass reports a failure (if any
            # layer is missing) and the request's blocks are freed once it has finished.
            if tr.reported:
                self.gate_report.settled.add((tr.req_id, self.tp_rank))
            if tr.error and not tr.reported and tr.layers_written < self.num_layers:
                # No forward pass has waited on it yet: keep the error for the one that will.
                tr.reported = True
                self._load_failed(tr, tr.error)
            if tr.req_id in self._finished_here:
                self._finished_here.discard(tr.req_id)
                self.finished_sending.add(tr.req_id)
            else:
                self._settled_sync.add(tr.req_id)
            self.news.notify_all()
            return
        if not ok and not tr.aborting:
            self._load_failed(tr, tr.error)
        # Parked for remote KV: vLLM frees (or, aborted, forgets) it once we report it.
        self.finished_recving.add(tr.req_id)
        self.news.notify_all()

    def _load_failed(self, tr: Incoming, why: str) -> None:
        logger.error("KV load for request %s (transfer %s) failed: %s; %d blocks affected",
                     tr.req_id, tr.transfer_id, why, len(tr.block_ids))
        self.stats.add(failures=1)
        self._count_failed_load()
        self.load_errors.update(tr.block_ids)
        self.news.notify_all()

    def _count_failed_load(self) -> None:
        self.stats.add(**{"failed_loads_recomputed" if self.recompute_failed_loads
                          else "failed_loads_failed": 1})

    def tick(self, now: float) -> None:
        with self.lock:
            for tid in [t for t, (_, until) in self.watching.items() if now >= until]:
                del self.watching[tid]
            for tr in list(self.inc.values()):
                if now >= tr.horizon:
                    logger.warning(
                        "transfer %s: no word from prefill %s; its write deadline has passed "
                        "(%.1fs after registering), so its blocks are given back", tr.transfer_id,
                        ", ".join(sorted(tr.pending)), self.config.write_horizon_s)
                    if not tr.error:
                        tr.error = (f"prefill did not complete the transfer within "
                                    f"{self.config.transfer_timeout_s:.1f}s")
                    self._settle(tr, False)
                elif now >= tr.deadline and not tr.sync and not tr.releasing_for_timeout \
                        and not tr.aborting:
                    # Ask P to stop; the blocks come back with its answer, or at the horizon.
                    tr.releasing_for_timeout = True
                    self._release(tr, "decode timed out")
