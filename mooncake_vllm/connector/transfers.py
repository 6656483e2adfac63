"""Per-transfer state on each side, kept apart from the threads that drive it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.tp_mapping import HeadRun


@dataclass
class Outgoing:
    """P: one request's KV on its way to a decode instance."""

    transfer_id: str
    req_id: str
    num_layers: int
    num_prompt_tokens: int
    block_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # Tokens whose KV is valid in each layer, and logical blocks already posted per layer
    # (a block is posted once, when complete or when the whole prompt is computed).
    ready: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    # Registration from D: reply address, record, opened segment, D's block ids as array.
    reply_to: bytes | None = None
    reg: m.Register | None = None
    segment: int = -1
    remote_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # The decode rank it writes into (None until the first registration says), and, with
    # another tensor-parallel size there, the runs of heads it writes (else whole blocks).
    dst_rank: int | None = None
    head_runs: list[HeadRun] | None = None
    inflight: int = 0
    layer_inflight: list[int] = field(default_factory=list)  # writes in flight per layer
    layers_reported: int = 0  # pipelined: layers [0, n) reported written to D
    head_started: bool = False  # P has scheduled the prompt's last chunk (told to watchers)
    bytes: int = 0
    blocks: int = 0
    first_post: float = 0.0
    forward_end: float = 0.0
    last_done: float = 0.0
    failed: str = ""  # why no more writes are posted (D told once inflight drains)
    released: bool = False  # D called it off; it is owed a Released, not a Done
    notified: bool = False  # D has had its Done / Released
    held: bool | None = None  # scheduler holds the blocks (ok flag) -> report when notified
    reg_deadline: float = 0.0
    write_until: float = float("inf")  # no write is posted after this (D's wait is over)
    registered_at: float = 0.0  # when D's registration arrived
    slow_reported: bool = False  # logged as slow once, with every thread's stack
    posted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ready = [0] * self.num_layers
        self.sent = [0] * self.num_layers
        self.layer_inflight = [0] * self.num_layers

    def sibling(self, dst_rank: int) -> Outgoing:
        """The same request's transfer into another decode rank, awaiting its registration."""
        other = Outgoing(self.transfer_id, self.req_id, self.num_layers, self.num_prompt_tokens,
                         block_ids=self.block_ids, dst_rank=dst_rank)
        other.ready = list(self.ready)
        other.head_started, other.forward_end = self.head_started, self.forward_end
        other.held, other.reg_deadline = self.held, self.reg_deadline
        return other

    @property
    def total_blocks(self) -> int:
        return self.reg.first_block + len(self.reg.block_ids) if self.reg else 0

    def fully_computed(self) -> bool:
        return all(r >= self.num_prompt_tokens for r in self.ready)

    def _end_block(self, block_size: int) -> int:
        return min(-(-self.num_prompt_tokens // block_size), self.total_blocks)

    def fully_posted(self, block_size: int) -> bool:
        end = self._end_block(block_size)
        return all(s >= end for s in self.sent)

    def layers_written(self, block_size: int) -> int:
        """How many leading layers have every block posted and no write still in flight."""
        end, n = self._end_block(block_size), 0
        while n < self.num_layers and self.sent[n] >= end and self.layer_inflight[n] == 0:
            n += 1
        return n

    def stopped(self) -> bool:
        return bool(self.failed) or self.released


@dataclass
class Incoming:
    """D: one request waiting for its KV from a prefill instance: from one prefill rank, or,
    between tensor-parallel sizes, from each rank that holds some of its heads (`endpoints`,
    the feeders). Each feeder answers for itself; the KV is in once every one has."""

    transfer_id: str
    req_id: str
    endpoints: tuple[str, ...]
    block_ids: list[int]  # the blocks the prefill side writes (D's ids)
    deadline: float
    started: float = field(default_factory=time.monotonic)
    aborting: bool = False  # request finished here; waiting for P's Released
    releasing_for_timeout: bool = False
    # Pipelined (synchronous) load: this step's forward pass waits for each layer in turn.
    sync: bool = False
    written: dict[str, int] = field(default_factory=dict)  # layers written, by feeder
    heard: dict[str, float] = field(default_factory=dict)  # each feeder's last word on it
    pending: set[str] = field(default_factory=set)  # feeders that have not answered Done
    released_to: set[str] = field(default_factory=set)  # feeders asked to stop
    idle: tuple[str, ...] = ()  # prefill ranks holding none of its heads, released at once
    bytes: int = 0
    blocks: int = 0
    transfer_s: float = 0.0
    error: str = ""  # why the rest will never arrive
    reported: bool = False  # the failure has been handed to vLLM (load errors)
    settled: bool = False  # P can write nothing more: the blocks are D's again
    horizon: float = float("inf")  # no write of P's can land after this, whatever P says

    def __post_init__(self) -> None:
        now = time.monotonic()
        self.written = dict.fromkeys(self.endpoints, 0)
        self.heard = dict.fromkeys(self.endpoints, now)
        self.pending = set(self.endpoints)

    @property
    def layers_written(self) -> int:
        """Leading layers that every feeder has written."""
        return min(self.written.values())

    def last_heard(self) -> float:
        """The longest silence among feeders still writing: the one a pipelined wait fears."""
        return min((self.heard[e] for e in self.pending), default=time.monotonic())
