"""Many batches in flight at once, submitted from several Python threads."""

from __future__ import annotations

import socket
import threading
import time

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


def test_gil_is_released_while_waiting(engine_factory) -> None:
    # A listener that accepts connections but never speaks: the batch can only time out.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        a = engine_factory(1 << 20, timeout_s=2.0)
        desc = {
            "name": "silent",
            "protocol": "tcp",
            "endpoint": f"127.0.0.1:{silent.getsockname()[1]}",
            "regions": [[4096, 1 << 20]],
        }
        seg = a.engine.open_segment(desc)
        bid = a.engine.submit(seg, "write", [a.base], [4096], [4096])
        # the raw native wait: blocks until the batch's deadline
        waiter = threading.Thread(target=a.engine._native.wait, args=(bid, -1.0))
        waiter.start()
        time.sleep(0.2)  # the waiter is inside the native wait now
        started = time.monotonic()
        sum(range(200_000))  # needs the GIL
        assert time.monotonic() - started < 0.5, "the native wait held the GIL"
        waiter.join(timeout=10)
        assert a.engine.status(bid).state is BatchState.FAILED
    finally:
        silent.close()
