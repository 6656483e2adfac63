"""Scheduler half: decides what is remote, holds blocks while they are in flight.

Prefill side (request has `do_remote_decode`): every step, tell the workers which of the
request's blocks this step computes (they push each layer as it is computed); when the request
finishes, keep its blocks (`request_finished` returns True) until the workers report the
transfer done, refused, released or timed out; answer with `remote_control` so a proxy can
reach the workers.

Decode side (`do_remote_prefill`): report the prompt tokens it lacks as an asynchronous
external hit; once blocks are allocated, hand the registration to the workers, which send it
to the prefill workers and report the request received (or failed) later.

Pipelined prefill (`do_remote_prefill` with `pipeline_tokens`: N): P computes only the first N
tokens; D reports them as a *synchronous* external hit, so vLLM schedules the rest of the
prompt at once and D's forward pass waits for P layer by layer (`wait_for_layer_load`). Both
instances prefill at the same time, one layer apart (Mooncake's chunked pipeline prefill, with
D as the second stage). With `pipeline_gate`: true, D schedules such a request only once P
has started its head (pipeline_gate.py), so that D's step never waits on P's queue.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from mooncake_vllm.config import ConnectorConfig
from mooncake_vllm.connector.pipeline_gate import GateReport, Gates
from mooncake_vllm.connector.pool_plan import PoolPlanner, model_space
from mooncake_vllm.connector.step_schema import MooncakeMetadata, RecvSpec, SaveSpec
from mooncake_vllm.remote_control import remote_control_problem
from mooncake_vllm.security import transfer_params_refusal

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")


def params_refusal(p: Any, token: str | None) -> str | None:
    """Why a request's kv_transfer_params must not drive a transfer; None when they may.

    The conductor alone writes them (and, with a cluster token, signs them): a client that
    sets them itself could make D read blocks that still hold another request's KV."""
    if not isinstance(p, dict):
        return f"kv_transfer_params is a {type(p).__name__}, not an object"
    if not (p.get("do_remote_prefill") or p.get("do_remote_decode")):
        return None  # not ours to check: no transfer is asked for
    why = transfer_params_refusal(token, p)
    if why is not None:
        return why
    tid = p.get("transfer_id")
    if p.get("probe") and tid is None:
        return None
    if not isinstance(tid, str) or not 1 <= len(tid) <= 256:
        return f"transfer_id {tid!r} is not a string of 1..256 characters"
    if not p.get("do_remote_prefill"):
        return None
    why = remote_control_problem(p.get("remote_control"))
    if why is not None:
        return f"remote_control: {why}"
    tokens = p.get("pipeline_tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)
                               or tokens < 0):
        return f"pipeline_tokens {tokens!r} is not a non-negative integer"
    return None


class MooncakeScheduler:
    def __init__(self, vllm_config: VllmConfig, config: ConnectorConfig) -> None:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.config = config
        self.engine_id = str(ktc.engine_id)
        self.is_producer = bool(ktc.is_kv_producer)
        self.is_consumer = bool(ktc.is_kv_consumer)
        self.block_size = vllm_config.cache_config.block_size
        self.model_name = vllm_config.model_config.served_model_name
        if isinstance(self.model_name, list | tuple):
            self.model_name = self.model_name[0]
        self.vllm_config = vllm_config
        self.kv_cache_manager: KVCacheManager | None = None
        self.remote_control: dict[str, Any] | None = None
        from mooncake_vllm.connector.registry import model_shape

        shape = model_shape(vllm_config)  # in every prefill answer, for a static conductor
        self.model_shape: dict[str, Any] | None = shape.to_dict() if shape else None
        self._instance_registered = False
        self._metadata: Any = None
        # P state
        self._p_reqs: dict[str, Request] = {}
        self._p_held: set[str] = set()
        self._pending_held: dict[str, bool] = {}
        # D state
        self._d_local_hit: dict[str, int] = {}
        self._d_handled: set[str] = set()
        self._pending_recvs: list[RecvSpec] = []
        self._pending_releases: list[tuple[str, dict[str, Any], str]] = []
        self._gates = Gates(silence_s=config.pipeline_silence_timeout_s,
                            max_wait_s=config.transfer_timeout_s)
        # D: pipelined requests whose blocks stay lent to P after they finish (the workers
        # report them in finished_sending once no write of P's can land).
        self._d_delayed: set[str] = set()
        self._d_pipelined: set[str] = set()
        # (request, decode rank): see has_pending_block_frees
        self._d_unsettled: set[tuple[str, int]] = set()
        # D: requests parked until their KV arrives (whole-prompt loads).
        self._d_awaiting: set[str] = set()
        # Each request's parameters are checked once, when it is first seen, and the verdict
        # kept until it finishes: a signature that expires while the request runs must not
        # turn it into a plain request half-way (its blocks would be freed under P's writes).
        self._checked: dict[str, dict[str, Any]] = {}
        # The KV pool (pool_plan.py): requests that prefill here, by id.
        self.pool = (PoolPlanner(model_space(vllm_config), config.pool_lookup_timeout_s)
                     if config.pool else None)
        self._pool_reqs: dict[str, Request] = {}
        self._pool_lookup: Any = None

    def _params(self, request: Request) -> dict[str, Any]:
        """The request's kv_transfer_params when they may drive a transfer, else {}."""
        rid = request.request_id
        known = self._checked.get(rid)
        if known is not None:
            return known
        p = request.kv_transfer_params
        why = params_refusal(p, self.config.cluster_token) if p else None
        if why is not None:
            logger.error("request %s: kv_transfer_params refused (%s); served as a plain "
                         "request, with no KV transfer", rid, why)
        self._checked[rid] = p if p and why is None else {}
        return self._checked[rid]

    # ---- handshake: worker endpoints -> remote_control, instance registry ----

    def set_worker_info(self, per_rank: dict[int, Any]) -> None:
        ranks = sorted(per_rank)
        self.remote_control = {
            "v": 1,
            "engine_id": self.engine_id,
            "instance_id": self.config.instance_id,
            "control": [per_rank[r].control for r in ranks],
            "tp_size": len(ranks),
        }
        logger.info("MooncakeVllmConnector: remote_control=%s", self.remote_control)
        if self.config.uses_etcd:
            self._register_instance(per_rank[ranks[0]])
        if self.pool is not None and self._metadata is not None:
            self._attach_pool(per_rank[ranks[0]].layout)

    def _attach_pool(self, layout: dict[str, Any]) -> None:
        """Look the pool up from here (rank 0's entries), as pool_plan.py describes."""
        from mooncake_vllm.connector.registry import shard_space
        from mooncake_vllm.store.client import PoolLookup

        assert self.pool is not None
        shard = shard_space(layout)
        c = self.config
        self._pool_lookup = PoolLookup(self._metadata, hostname=c.hostname,
                                       token=c.cluster_token, entry_bytes=shard.entry_bytes,
                                       ask_timeout_s=c.pool_lookup_timeout_s)
        lookup = self._pool_lookup
        self.pool.attach(lookup.lookup,
                         lambda: bool(lookup.live_stores()), shard.digest())

    def _register_instance(self, rank0: Any) -> None:
        from mooncake_vllm.connector.registry import register_instance

        role = "both" if (self.is_producer and self.is_consumer) else (
            "prefill" if self.is_producer else "decode")
        self._metadata = register_instance(self.config, self.vllm_config, role=role,
                                           remote_control=self.remote_control or {},
                                           rank0=rank0, model=str(self.model_name))
        self._instance_registered = self._metadata is not None

    # ---- both sides ----

    def bind(self, kv_cache_manager: KVCacheManager) -> None:
        self.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        p = self._params(request)
        if not (self.is_consumer and p.get("do_remote_prefill")):  # prefilled here
            if self.pool is not None and not p.get("probe"):
                return self.pool.matched(request, num_computed_tokens), False
            return 0, False
        if request.request_id in self._d_handled:
            return 0, False
        self._d_local_hit[request.request_id] = num_computed_tokens
        head = self._pipeline_head(request)
        if head is not None:
            count = head - num_computed_tokens
            if count <= 0:
                return 0, False
            rc = p.get("remote_control")
            gated = p.get("pipeline_gate") is True and isinstance(rc, dict)
            if gated and not self._gates.may_schedule(
                    request.request_id, str(p.get("transfer_id", "")), rc, time.monotonic()):
                return None, False  # not yet: P has not started the head
            return count, False
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def _pipeline_head(self, request: Request) -> int | None:
        """Tokens P computes in a pipelined prefill (whole blocks, at least one token left for
        D to compute); None when the request is not pipelined."""
        asked = self._params(request).get("pipeline_tokens")
        if not isinstance(asked, int) or isinstance(asked, bool) or asked <= 0:
            return None
        bs = self.block_size
        return min(asked, request.num_prompt_tokens - 1) // bs * bs

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        p = self._params(request)
        rid = request.request_id
        if self.pool is not None and not (self.is_consumer and p.get("do_remote_prefill")):
            self.pool.allocated(request, list(blocks.get_block_ids()[0]), num_external_tokens)
            self._pool_reqs[rid] = request
        if self.is_producer and p.get("do_remote_decode") and not p.get("probe"):
            self._p_reqs[rid] = request
            logger.debug("prefill request %s: transfer %s", rid, p.get("transfer_id"))
            return
        if not (self.is_consumer and p.get("do_remote_prefill")) or rid in self._d_handled:
            return
        self._d_handled.add(rid)
        self._gates.forget(rid)  # scheduled: the gate (if any) has done its job
        tid, rc = str(p.get("transfer_id", "")), p.get("remote_control")
        if not tid or not isinstance(rc, dict):
            logger.error("request %s: do_remote_prefill without transfer_id/remote_control "
                         "(kv_transfer_params=%s); computing the prompt locally", rid, p)
            return
        if num_external_tokens <= 0:
            # Everything is cached here already: tell P not to wait for a registration.
            self._pending_releases.append((tid, rc, "decode already holds the prompt"))
            return
        hit = self._d_local_hit.pop(rid, 0)
        head = self._pipeline_head(request)
        logger.debug("request %s: %d tokens to receive (local hit %d, %s)", rid,
                     num_external_tokens, hit, "pipelined" if head else "whole prompt")
        if head is not None:
            self._d_pipelined.add(rid)
        else:
            self._d_awaiting.add(rid)
        self._pending_recvs.append(RecvSpec(
            req_id=rid, transfer_id=tid, remote_control=rc,
            block_ids=list(blocks.get_block_ids()[0]), first_block=hit // self.block_size,
            num_tokens=head or request.num_prompt_tokens, sync=head is not None))

    def build_connector_meta(self, out: SchedulerOutput) -> MooncakeMetadata:
        meta = MooncakeMetadata(recvs=self._pending_recvs, releases=self._pending_releases,
                                held=self._pending_held, watches=self._gates.take_watches(),
                                idle=self.idle_step(out))
        self._pending_recvs, self._pending_releases, self._pending_held = [], [], {}
        if self.pool is not None:
            self.pool.fill(meta)
            if self._pool_reqs:
                assert self.kv_cache_manager is not None
                kvm = self.kv_cache_manager
                meta.pool_saves = self.pool.saves(out, self._pool_reqs,
                                                  lambda rid: kvm.get_block_ids(rid)[0])
        for rid in getattr(out, "preempted_req_ids", None) or ():
            req = self._p_reqs.get(rid)
            if req is not None:
                meta.preempted.append(str(self._params(req)["transfer_id"]))
        if self._p_reqs:
            computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
            cached = out.scheduled_cached_reqs
            computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
            for rid, n in out.num_scheduled_tokens.items():
                req = self._p_reqs.get(rid)
                if req is None or rid not in computed:
                    continue
                assert self.kv_cache_manager is not None
                meta.saves.append(SaveSpec(
                    req_id=rid, transfer_id=str(self._params(req)["transfer_id"]),
                    block_ids=list(self.kv_cache_manager.get_block_ids(rid)[0]),
                    computed=computed[rid], scheduled=n,
                    num_prompt_tokens=req.num_prompt_tokens))
        return meta

    def idle_step(self, out: SchedulerOutput) -> bool:
        """Nothing to compute this step, and requests wait on transfers (D: KV to arrive; P:
        blocks held until D has them): the workers may wait for one instead of spinning."""
        return out.total_num_scheduled_tokens == 0 and bool(
            self._d_awaiting or self._p_held or self._pending_held or self._d_delayed
            or (self.pool is not None and self.pool.waiting()))

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        p = self._params(request)
        rid = request.request_id
        if self.pool is not None:
            self.pool.finished(rid)
            self._pool_reqs.pop(rid, None)
        asked = self._d_local_hit.pop(rid, None) is not None  # D saw it and allocated nothing
        self._gates.forget(rid)
        self._checked.pop(rid, None)
        self._d_unsettled = {u for u in self._d_unsettled if u[0] != rid}
        self._d_awaiting.discard(rid)
        if rid in self._d_pipelined:
            # Pipelined: its blocks were lent to P's writes while it ran; the workers report
            # it in finished_sending once none can land any more (decode_side.py).
            self._d_pipelined.discard(rid)
            self._d_handled.discard(rid)
            self._d_delayed.add(rid)
            return True, None
        if self.is_consumer and p.get("do_remote_prefill"):
            # (vLLM may also finish a request object this connector never saw, e.g. an abort
            # after a failed load: that one has nothing to release.)
            if rid not in self._d_handled and asked and isinstance(p.get("remote_control"),
                                                                    dict):
                # Finished (aborted) before any block was allocated: no registration will
                # ever reach P, so release it now instead of letting it time out.
                self._pending_releases.append(
                    (str(p.get("transfer_id", "")), p["remote_control"], "decode aborted"))
            self._d_handled.discard(rid)
            # A request aborted while WAITING_FOR_REMOTE_KVS keeps its blocks in vLLM until
            # the workers report it received; the workers see it in finished_req_ids.
            return False, None
        if p.get("probe") and p.get("do_remote_decode"):
            # A conductor or the doctor asks where this instance's workers listen (any role:
            # the doctor checks decode instances from their control endpoints too).
            self._p_reqs.pop(rid, None)
            return False, {"remote_control": self.remote_control, "transfer_id": None,
                           "model_shape": self.model_shape}
        if not (self.is_producer and p.get("do_remote_decode")):
            return False, None
        answer = {"remote_control": self.remote_control, "transfer_id": p.get("transfer_id"),
                  "model_shape": self.model_shape}
        req = self._p_reqs.pop(rid, None)
        if req is None or not block_ids:
            return False, answer
        logger.debug("prefill request %s finished: transfer %s, scheduled %s, %d blocks",
                     rid, p.get("transfer_id"), req is not None, len(block_ids))
        ok = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                RequestStatus.FINISHED_STOPPED)
        self._p_held.add(rid)
        self._pending_held[rid] = ok
        return True, answer

    def update_connector_output(self, out: KVConnectorOutput) -> None:
        self._d_awaiting.difference_update(out.finished_recving or ())
        for rid in out.finished_sending or ():
            self._p_held.discard(rid)
            self._d_delayed.discard(rid)
        report = out.kv_connector_worker_meta
        if isinstance(report, GateReport):
            self._gates.on_report(report, time.monotonic())
            self._d_unsettled -= report.settled
            self._d_unsettled |= {u for u in report.unsettled if u[0] in self._d_pipelined}
            if self.pool is not None and report.prefetched:
                self.pool.on_prefetched(report.prefetched)

    def has_pending_block_frees(self) -> bool:
        """True while a running pipelined request's load was given up and P's writes may still
        land in its blocks: vLLM then waits instead of preempting (which would free them at
        once, to another request). Bounded: every such load settles by the write horizon."""
        return bool(self._d_unsettled)

    def has_pending_work(self) -> bool:
        # Keeps the engine stepping (so workers get polled) while blocks are held for a
        # transfer or a message is still to be handed to the workers.
        return bool(self._p_held or self._d_delayed or self._pending_held or self._pending_recvs
                    or self._pending_releases or self._gates.has_pending()
                    or (self.pool is not None and self.pool.has_pending()))

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self._pool_lookup is not None:
            self._pool_lookup.close()
        if self._metadata is not None:
            try:
                self._metadata.close()
            except Exception as e:  # shutdown must go on
                logger.warning("closing metadata client: %s", e)
            self._metadata = None
