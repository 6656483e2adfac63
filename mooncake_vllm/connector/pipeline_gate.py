"""Pipelined prefill: D schedules its part of a prompt only once P is computing the head.

D's forward pass waits for P layer by layer, so a step that holds a tail whose head P has not
started waits for P's queue: D's running decodes stall with it, and the tails of a burst that
P spreads over several steps all wait for the last of them. So D's scheduler holds a pipelined
request back (vLLM's "cannot tell yet" answer to get_num_new_matched_tokens) until P reports
that the head's last chunk is in the step P is running:

  D scheduler --watches (connector metadata)--> D worker --Watch--> P worker
  P worker (bind: the head's last chunk is scheduled) --Started--> D worker
  D worker --GateReport (worker metadata)--> D scheduler: the gate opens

While the head waits in P's queue, P repeats "not started" every half second. A gate that has
heard nothing for `silence_s`, or has waited `max_wait_s` in all, opens anyway: the load then
runs under its own deadlines, so a vanished P fails the request instead of holding it forever.

Opt-in, per request (`"pipeline_gate": true` in kv_transfer_params; the conductor's
`--pipeline-gate`): it protects D's running decodes, but costs the pipelined request's TTFT:
the tail starts a D step after P's report instead of being scheduled ahead and waiting in
layer 0 (`bench serve` measures the difference side by side).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

# A child of "vllm" so that our lines go through vLLM's handlers, format and level.
logger = logging.getLogger("vllm.mooncake_vllm.connector")


@dataclass
class GateReport(KVConnectorWorkerMetadata):
    """A worker -> its scheduler, once per step (vLLM merges the ranks' reports): on D,
    transfers whose head P has started and transfers P said are still queued (alive); on any
    instance, the pool prefetches that ended."""

    started: set[str] = field(default_factory=set)
    alive: set[str] = field(default_factory=set)
    # Pipelined requests whose load was given up while P's writes may still land in their
    # blocks, and those for which that is over, as (request id, decode rank): vLLM must not
    # preempt the former (decode_side.py), so the scheduler answers has_pending_block_frees
    # until every rank that reported one has reported it settled (ranks' feeders differ).
    unsettled: set[tuple[str, int]] = field(default_factory=set)
    settled: set[tuple[str, int]] = field(default_factory=set)
    # The KV pool: (request id, rank, entries prefetched), one per rank and prefetch.
    prefetched: set[tuple[str, int, int]] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> GateReport:
        if not isinstance(other, GateReport):
            return self
        return GateReport(self.started | other.started, self.alive | other.alive,
                          self.unsettled | other.unsettled, self.settled | other.settled,
                          self.prefetched | other.prefetched)

    def __bool__(self) -> bool:
        return bool(self.started or self.alive or self.unsettled or self.settled
                    or self.prefetched)


@dataclass
class _Gate:
    transfer_id: str
    since: float
    heard: float
    open: bool = False


class Gates:
    """D scheduler: one gate per pipelined request not yet scheduled."""

    def __init__(self, silence_s: float, max_wait_s: float) -> None:
        self.silence_s, self.max_wait_s = silence_s, max_wait_s
        self._by_req: dict[str, _Gate] = {}
        self._req_of: dict[str, str] = {}  # transfer id -> request id
        self._watches: list[tuple[str, dict[str, Any]]] = []

    def may_schedule(self, req_id: str, transfer_id: str, remote_control: dict[str, Any],
                     now: float) -> bool:
        gate = self._by_req.get(req_id)
        if gate is None:
            self._by_req[req_id] = _Gate(transfer_id, now, now)
            self._req_of[transfer_id] = req_id
            self._watches.append((transfer_id, remote_control))
            return False
        if not gate.open:
            if now >= gate.heard + self.silence_s:
                why = f"no word from the prefill instance for {self.silence_s:.1f}s"
            elif now >= gate.since + self.max_wait_s:
                why = f"its head was not started within {self.max_wait_s:.1f}s"
            else:
                return False
            logger.warning("pipelined request %s (transfer %s): %s; scheduling it anyway, "
                           "its load has its own deadlines", req_id, transfer_id, why)
            gate.open = True
        return True

    def on_report(self, report: GateReport, now: float) -> None:
        for tid in report.alive | report.started:
            gate = self._by_req.get(self._req_of.get(tid, ""))
            if gate is not None:
                gate.heard = now
                gate.open = gate.open or tid in report.started

    def forget(self, req_id: str) -> None:
        gate = self._by_req.pop(req_id, None)
        if gate is not None:
            self._req_of.pop(gate.transfer_id, None)

    def take_watches(self) -> list[tuple[str, dict[str, Any]]]:
        out, self._watches = self._watches, []
        return out

    def has_pending(self) -> bool:
        return bool(self._watches)


class Watchers:
    """P worker: who waits to hear that a head has started, until when."""

    def __init__(self) -> None:
        self._by_tid: dict[str, tuple[bytes, float]] = {}

    def __len__(self) -> int:
        return len(self._by_tid)

    def add(self, transfer_id: str, reply_to: bytes, until: float) -> None:
        self._by_tid[transfer_id] = (reply_to, until)

    def pop(self, transfer_id: str) -> bytes | None:
        entry = self._by_tid.pop(transfer_id, None)
        return entry[0] if entry else None

    def expire(self, now: float) -> None:
        for tid in [t for t, (_, until) in self._by_tid.items() if now >= until]:
            del self._by_tid[tid]

    def items(self) -> list[tuple[str, bytes]]:
        return [(tid, reply_to) for tid, (reply_to, _) in self._by_tid.items()]
