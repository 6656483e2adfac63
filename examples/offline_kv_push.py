"""What the connector does under the hood, with the transfer engine's Python API alone.

A "decode" process owns a paged KV cache (layers x blocks x block bytes) and registers it with
its transfer engine; a "prefill" process computes a prompt's KV (here: deterministic bytes) and
pushes it layer by layer into the decode process's blocks with one batched one-sided WRITE per
layer, coalescing runs of contiguous blocks, exactly as the connector does in `save_kv_layer`.
The decode process then checks every byte.

The decode process's segment descriptor reaches the prefill process through etcd when
`--metadata-server etcd://HOST:PORT` is given (as in a deployment), else through a pipe (the
embedded "p2p" mode, where the decode worker sends it inside its registration message).

    python examples/offline_kv_push.py
    python examples/offline_kv_push.py --metadata-server etcd://127.0.0.1:2379
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection

import numpy as np

from mooncake_vllm.engine import TransferEngine
from mooncake_vllm.metadata import open_metadata

LAYERS = 8
BLOCK_BYTES = 64 << 10  # one layer's K and V for one block of tokens
CACHE_BLOCKS = 64
PROMPT_BLOCKS = 12
SEGMENT = "example-decode-0"


def layer_kv(layer: int, nblocks: int) -> np.ndarray:
    """The prefill side's KV of one layer: reproducible bytes, different for every layer."""
    rng = np.random.default_rng(layer)
    return rng.integers(0, 256, size=(nblocks, BLOCK_BYTES), dtype=np.uint8)


def contiguous_runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, ...]:
    """(src_start, dst_start, count) of the runs where both block ids advance together."""
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(src)])))
    return src[starts], dst[starts], counts


def decode_process(conn: Connection, metadata_server: str | None) -> None:
    kv = np.zeros((LAYERS, CACHE_BLOCKS, BLOCK_BYTES), dtype=np.uint8)
    engine = TransferEngine(hostname="127.0.0.1", protocol="tcp")
    engine.register(kv.ctypes.data, kv.nbytes)
    md = open_metadata(metadata_server) if metadata_server else None
    if md is not None:
        md.publish_segment(SEGMENT, engine.descriptor())
        conn.send({"base": kv.ctypes.data, "segment": SEGMENT})
    else:
        conn.send({"base": kv.ctypes.data, "descriptor": engine.descriptor()})
    # Free blocks the decode scheduler picked for this prompt: two contiguous runs and strays.
    block_ids = np.array([3, 4, 5, 6, 20, 21, 22, 23, 24, 40, 9, 50], dtype=np.int64)
    conn.send(block_ids)
    conn.recv()  # "done": every layer's WRITE completed on the prefill side
    ok = all(np.array_equal(kv[layer, block_ids], layer_kv(layer, PROMPT_BLOCKS))
             for layer in range(LAYERS))
    others = np.setdiff1d(np.arange(CACHE_BLOCKS), block_ids)
    untouched = not kv[:, others].any()
    conn.send((ok, untouched, hashlib.sha256(kv[:, block_ids].tobytes()).hexdigest()[:16]))
    if md is not None:
        md.close()
    engine.unregister(kv.ctypes.data)
    engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata-server", default=None, help="etcd://HOST:PORT (default: p2p)")
    args = parser.parse_args(argv)

    here, there = mp.Pipe()
    decode = mp.get_context("spawn").Process(
        target=decode_process, args=(there, args.metadata_server), daemon=True)
    decode.start()
    try:
        if not here.poll(60):
            raise SystemExit("the decode process sent nothing within 60 s")
        hello = here.recv()
        md = open_metadata(args.metadata_server) if args.metadata_server else None
        descriptor = md.get_segment(hello["segment"]) if md else hello["descriptor"]
        if descriptor is None:
            sys.exit(f"segment {hello['segment']!r} not found in {args.metadata_server}")
        dst_blocks = here.recv()

        engine = TransferEngine(hostname="127.0.0.1", protocol="tcp")
        kv = np.stack([layer_kv(layer, PROMPT_BLOCKS) for layer in range(LAYERS)])
        engine.register(kv.ctypes.data, kv.nbytes)
        seg = engine.open_segment(descriptor)
        src, dst, counts = contiguous_runs(np.arange(PROMPT_BLOCKS), dst_blocks)
        print(f"{PROMPT_BLOCKS} blocks -> {len(counts)} writes per layer (runs {counts.tolist()})")

        t0 = time.perf_counter()
        batches = []
        for layer in range(LAYERS):  # as each layer's forward pass finishes
            local = kv.ctypes.data + (layer * PROMPT_BLOCKS + src) * BLOCK_BYTES
            remote = hello["base"] + (layer * CACHE_BLOCKS + dst) * BLOCK_BYTES
            lengths = counts * BLOCK_BYTES
            batches.append(engine.submit(seg, "write", local.astype(np.uint64),
                                         remote.astype(np.uint64), lengths.astype(np.uint64)))
        for bid in batches:
            engine.wait(bid, timeout_s=30)
            engine.release(bid)
        elapsed = time.perf_counter() - t0
        here.send("done")
        ok, untouched, digest = here.recv()
        print(f"pushed {kv.nbytes / 2**20:.1f} MiB in {elapsed * 1e3:.1f} ms over "
              f"{engine.protocol}; decode checked: blocks equal={ok}, others untouched="
              f"{untouched}, sha256 {digest}")
        engine.unregister(kv.ctypes.data)
        engine.close()
        if md is not None:
            md.close()
        return 0 if ok and untouched else 1
    finally:
        decode.join(timeout=30)
        if decode.is_alive():
            decode.kill()


if __name__ == "__main__":
    sys.exit(main())
