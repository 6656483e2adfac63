"""Many batches in flight at once, submitted from several Python threads."""

from __future__ import annotations

import threading

import numpy as np
from engine_helpers import pattern, sha256

from mooncake_vllm.engine import BatchState


def test_many_concurrent_batches_from_threads(engine_factory, peer_factory) -> None:
    threads_n, batches_per_thread, block = 6, 12, 64 << 10
    size = threads_n * batches_per_thread * 4 * block
    local = engine_factory(size)
    peer = peer_factory(size)
    local.buffer[:] = pattern(size, seed=21)
    seg = local.engine.open_segment(peer.descriptor)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            pending = []
            for i in range(batches_per_thread):
                first = (t * batches_per_thread + i) * 4
                # 4 blocks per batch, written in reverse order to non-adjacent places
                idx = np.arange(first, first + 4, dtype=np.uint64)[::-1].copy()
                offs = idx * block
                lengths = np.full(4, block, np.uint64)
                pending.append(
                    local.engine.submit(seg, "write", local.base + offs, peer.base + offs, lengths)
                )
            for bid in pending:
                assert local.engine.wait(bid, timeout_s=20).state is BatchState.DONE
                local.engine.release(bid)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    assert peer.digest(0, size) == sha256(local.buffer)
    assert local.engine._native.live_batches == 0
