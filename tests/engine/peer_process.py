"""A transfer engine in its own process, driven by JSON lines on stdin (tests and benchmark).

Start: python peer_process.py --size BYTES [--port P] [--token T] [--timeout S] [--connections N]
       [--remote-read] [--idle-timeout S] [--max-connections N] [--max-per-address N]
First stdout line: {"descriptor": {...}, "base": ADDR}. Then one JSON answer per command:
  {"cmd": "fill", "offset": O, "length": N, "seed": S}   deterministic bytes at O
  {"cmd": "digest", "offset": O, "length": N}            sha256 hex of the bytes at O
  {"cmd": "zero"}                                        clear the whole buffer
  {"cmd": "rss"}                                         resident memory in KiB
  {"cmd": "quit"}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

from mooncake_vllm.engine import TransferEngine


def pattern(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--token", default=None)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--remote-read", action="store_true")
    parser.add_argument("--idle-timeout", type=float, default=120.0)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--max-per-address", type=int, default=64)
    args = parser.parse_args()
    buffer = np.zeros(args.size, dtype=np.uint8)
    engine = TransferEngine(
        protocol="tcp",
        port=args.port,
        cluster_token=args.token,
        timeout_s=args.timeout,
        connections_per_peer=args.connections,
        idle_timeout_s=args.idle_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_per_address,
    )
    engine.register(buffer.ctypes.data, buffer.nbytes, remote_read=args.remote_read)
    print(json.dumps({"descriptor": engine.descriptor(), "base": buffer.ctypes.data}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "quit":
            break
        if name == "fill":
            start = cmd["offset"]
            buffer[start : start + cmd["length"]] = pattern(cmd["length"], cmd["seed"])
            answer: dict = {"ok": True}
        elif name == "digest":
            start = cmd["offset"]
            view = buffer[start : start + cmd["length"]]
            answer = {"sha256": hashlib.sha256(view.tobytes()).hexdigest()}
        elif name == "rss":
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            answer = {"rss_kib": rss}
        elif name == "zero":
            buffer[:] = 0
            answer = {"ok": True}
        else:
            answer = {"error": f"unknown command {name!r}"}
        print(json.dumps(answer), flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
