"""Send-side staging: KV the transport cannot read in place goes through a host buffer.

RDMA registers device memory directly. TCP cannot read GPU memory, so a layer's blocks are
gathered into a pinned host buffer with an asynchronous device-to-host copy on a side stream,
and the write is posted once the copy's event completes (on a poster thread, so the model
thread never waits). The copy of layer l overlaps the compute of layer l+1 and the send of
layer l-1. With CPU tensors (the tests here) the gather is a plain synchronous copy.

The buffer is registered with the engine once; batches take slices of it and give them back
when their write completes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch


class StagingError(RuntimeError):
    """No staging space within the deadline (the message gives the sizes)."""


@dataclass
class Slot:
    offset: int
    nbytes: int


class StagingBuffer:
    def __init__(self, nbytes: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.base = self.host.data_ptr()
        self.nbytes = nbytes
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # sorted (offset, length)
        self._cv = threading.Condition()
        self.stream = torch.cuda.Stream(device) if pin else None

    def alloc(self, nbytes: int, timeout_s: float) -> Slot:
        if nbytes > self.nbytes:
            raise StagingError(f"a batch of {nbytes} B exceeds the staging buffer of "
                               f"{self.nbytes} B (raise staging_buffer_mb)")
        end = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for i, (off, ln) in enumerate(self._free):
                    if ln >= nbytes:
                        self._free[i] = (off + nbytes, ln - nbytes)
                        if self._free[i][1] == 0:
                            del self._free[i]
                        return Slot(off, nbytes)
                left = end - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    raise StagingError(f"no {nbytes} B of staging space freed within "
                                       f"{timeout_s:.1f}s")

    def free(self, slot: Slot) -> None:
        with self._cv:
            self._free.append((slot.offset, slot.nbytes))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for off, ln in self._free:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + ln)
                else:
                    merged.append((off, ln))
            self._free = merged
            self._cv.notify_all()

    def gather(self, layer: torch.Tensor, planes: list[tuple[int, int]], block_bytes: int,
               num_blocks: int, block_ids: np.ndarray, slot: Slot) -> torch.cuda.Event | None:
        """Copy the raw bytes of the given blocks of every plane into `slot`, plane by plane.

        Works on bytes as laid out in memory (planes as (base, stride)), so the staged copy is
        exactly what the receiver's blocks must hold. Returns an event to wait on before the
        bytes may be sent (None: they are there already).
        """
        storage = layer.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=layer.device).set_(storage)
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=layer.device)
        n = len(block_ids)
        dst = self.host[slot.offset:slot.offset + slot.nbytes].view(len(planes), n, block_bytes)

        def copy_all(non_blocking: bool) -> None:
            for p, (base, stride) in enumerate(planes):
                blocks = raw.as_strided((num_blocks, block_bytes), (stride, 1),
                                        base - storage.data_ptr())
                dst[p].copy_(blocks.index_select(0, ids), non_blocking=non_blocking)

        if self.stream is None:
            copy_all(False)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(layer.device))
        with torch.cuda.stream(self.stream):
            copy_all(True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev
