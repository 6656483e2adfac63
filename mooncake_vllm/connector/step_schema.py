"""What the scheduler tells the workers each step (vLLM's connector metadata).

Its own module so that the workers never import the scheduler half: both import this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class SaveSpec:
    """P: this step computes tokens [computed, computed + scheduled) of the request."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    computed: int
    scheduled: int
    num_prompt_tokens: int


@dataclass
class RecvSpec:
    """D: ask the prefill workers for these blocks."""

    req_id: str
    transfer_id: str
    remote_control: dict[str, Any]
    block_ids: list[int]  # all of the request's blocks
    first_block: int  # blocks already held locally (prefix-cache hit)
    num_tokens: int  # prompt tokens whose KV P sends: all of them, or the pipelined head
    sync: bool = False  # pipelined: this step's forward pass waits for each layer


@dataclass
class PoolPrefetch:
    """Any instance: read these prompt blocks from the pool into the workers' pool buffer
    (chain keys, from the prompt's block `first` on); each worker reports how many landed."""

    req_id: str
    keys: list[bytes]
    first: int
    copies: list[int] = field(default_factory=list)  # per key: owners that should hold it


@dataclass
class PoolPlace:
    """Copy the request's prefetched entries into these blocks (before this step's forward
    pass, which counts their tokens as computed), then free the buffer."""

    req_id: str
    block_ids: list[int]


@dataclass
class PoolSave:
    """After this step's forward pass: the prompt blocks it completed, to write to the pool."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class MooncakeMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    # P: requests whose blocks the scheduler now holds for the workers: req_id -> finished ok
    # (False: aborted or errored on P; the workers tell D and stop).
    held: dict[str, bool] = field(default_factory=dict)
    recvs: list[RecvSpec] = field(default_factory=list)
    # D: transfers to call off without ever registering: (transfer_id, remote_control, why).
    releases: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    # P: transfers whose request vLLM preempted (its blocks were freed and may be reused while
    # writes from them are still in flight): they fail, so D never uses what they sent.
    preempted: list[str] = field(default_factory=list)
    # D: pipelined transfers whose head D waits to hear P has started: (transfer_id, rc).
    watches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # The step schedules no tokens and requests wait on transfers: the workers wait (briefly)
    # for a transfer to finish or fail instead of returning at once, so that the engine's
    # loop does not spin while it waits for remote KV.
    idle: bool = False
    # The KV pool (pool_plan.py, pool_io.py).
    pool_prefetches: list[PoolPrefetch] = field(default_factory=list)
    pool_places: list[PoolPlace] = field(default_factory=list)
    pool_saves: list[PoolSave] = field(default_factory=list)
    pool_drops: list[str] = field(default_factory=list)  # prefetched entries nobody placed
    # The scheduler's pool lookups since the last step, and those that found blocks: rank 0
    # counts them in the exported stats (vLLM exports the workers' stats only).
    pool_lookups: int = 0
    pool_hits: int = 0
    pool_lookup_s: list[float] = field(default_factory=list)
