"""`python -m mooncake_vllm.bench transfer [--json]`: engine WRITE throughput between two
processes on loopback, like for like against iperf3: the engine on 1 connection per peer next
to `iperf3 -P 1`, and on N connections next to `iperf3 -P N`; memcpy is the other ceiling.

The receiving engine runs in a child process (`--serve`, driven by JSON lines on stdin); this
process submits the transfers. Every measurement is the median of several runs, and the bytes
are verified (sha256 on both sides) after each pattern. iperf3 runs before and after the
engine runs and its median is taken, which guards against a neighbour that came or went.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mooncake_vllm.bench import results
from mooncake_vllm.engine import TransferEngine
from mooncake_vllm.testing.ports import free_port

KiB = 1 << 10
MiB = 1 << 20
SINGLE_SIZES = [64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
LAYER_BLOCKS, LAYER_BLOCK = 256, 16 * KiB
BUFFER = 128 * MiB


def _runs_for(nbytes: int, scale: float) -> int:
    base = 40 if nbytes <= MiB else 15 if nbytes <= 16 * MiB else 9
    return max(3, int(base * scale))


def _median_seconds(fn: Callable[[], None], runs: int) -> float:
    fn()  # warm-up: connections, page faults
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _result(name: str, nbytes: int, seconds: float) -> dict[str, Any]:
    return {"name": name, "bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9}


def iperf3_gbps(streams: int, seconds: float = 3.0) -> float | None:
    """Loopback throughput (GB/s) of `iperf3 -P streams`, or None without iperf3."""
    if shutil.which("iperf3") is None:
        return None
    port = free_port()
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while True:  # the server needs a moment to listen; a probe would use up its one test
            out = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                 "-P", str(streams), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 20,
            )
            report = json.loads(out.stdout)
            if "error" not in report:
                break
            if "connect" not in report["error"] or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 -P {streams}: {report['error']}")
            time.sleep(0.1)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 8 / 1e9
    finally:
        server.kill()
        server.wait(timeout=10)


def memcpy_gbps(nbytes: int = 64 * MiB, runs: int = 9) -> float:
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    seconds = _median_seconds(lambda: np.copyto(dst, src), runs)
    return nbytes / seconds / 1e9


def serve(connections: int) -> int:
    """The receiving side: one registered buffer; answers digest requests on stdin."""
    buffer = np.zeros(BUFFER, dtype=np.uint8)
    engine = TransferEngine(protocol="tcp", connections_per_peer=connections, timeout_s=60)
    engine.register(buffer.ctypes.data, buffer.nbytes)
    print(json.dumps({"descriptor": engine.descriptor()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        digests = [
            hashlib.sha256(buffer[off : off + length].tobytes()).hexdigest()
            for off, length in cmd["ranges"]
        ]
        print(json.dumps({"sha256": digests}), flush=True)
    engine.close()
    return 0


class _Receiver:
    def __init__(self, connections: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mooncake_vllm.bench.transfer", "--serve",
             "--connections", str(connections)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the receiving benchmark process did not start")
        self.descriptor: dict[str, Any] = json.loads(line)["descriptor"]
        self.base = int(self.descriptor["regions"][0][0])

    def digests(self, ranges: list[tuple[int, int]]) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": "digest", "ranges": ranges}) + "\n")
        self.proc.stdin.flush()
        return list(json.loads(self.proc.stdout.readline())["sha256"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)


def _verify(receiver: _Receiver, local: np.ndarray, pairs: list[tuple[int, int, int]]) -> None:
    """pairs: (local offset, remote offset, length)."""
    remote = receiver.digests([(r, n) for _, r, n in pairs])
    for (lo, _, n), digest in zip(pairs, remote, strict=True):
        if hashlib.sha256(local[lo : lo + n].tobytes()).hexdigest() != digest:
            raise RuntimeError(f"benchmark data mismatch at local offset {lo} ({n} bytes)")


def measure_engine(connections: int, scale: float) -> list[dict[str, Any]]:
    receiver = _Receiver(connections)
    local = np.random.default_rng(1).integers(0, 256, BUFFER, dtype=np.uint8)
    engine = TransferEngine(protocol="tcp", connections_per_peer=connections, timeout_s=60)
    try:
        engine.register(local.ctypes.data, local.nbytes)
        seg = engine.open_segment(receiver.descriptor)
        measured = []
        for size in SINGLE_SIZES:
            l_addr = np.array([local.ctypes.data], dtype=np.uint64)
            r_addr = np.array([receiver.base + size], dtype=np.uint64)  # not offset 0: no aliasing
            lengths = np.array([size], dtype=np.uint64)

            def one(l_addr=l_addr, r_addr=r_addr, lengths=lengths) -> None:  # noqa: B008
                engine.transfer_sync(seg, "write", l_addr, r_addr, lengths)

            seconds = _median_seconds(one, _runs_for(size, scale))
            _verify(receiver, local, [(0, size, size)])
            measured.append(_result(f"single_{size // KiB}KiB", size, seconds))

        # one layer of paged KV: 256 blocks of 16 KiB scattered over both buffers
        rng = np.random.default_rng(2)
        slots = BUFFER // LAYER_BLOCK
        local_blocks = rng.choice(slots, LAYER_BLOCKS, replace=False).astype(np.uint64)
        remote_blocks = rng.choice(slots, LAYER_BLOCKS, replace=False).astype(np.uint64)
        l_addr = local.ctypes.data + local_blocks * LAYER_BLOCK
        r_addr = receiver.base + remote_blocks * LAYER_BLOCK
        lengths = np.full(LAYER_BLOCKS, LAYER_BLOCK, dtype=np.uint64)
        seconds = _median_seconds(
            lambda: engine.transfer_sync(seg, "write", l_addr, r_addr, lengths),
            _runs_for(LAYER_BLOCKS * LAYER_BLOCK, scale * 2),
        )
        _verify(
            receiver,
            local,
            [(int(lb) * LAYER_BLOCK, int(rb) * LAYER_BLOCK, LAYER_BLOCK)
             for lb, rb in zip(local_blocks, remote_blocks, strict=True)],
        )
        name = f"layer_{LAYER_BLOCKS}x{LAYER_BLOCK // KiB}KiB"
        measured.append(_result(name, LAYER_BLOCKS * LAYER_BLOCK, seconds))
        return measured
    finally:
        engine.close()
        receiver.close()


def compare(connections: int, scale: float) -> dict[str, Any]:
    """The engine on `connections` per peer beside `iperf3 -P connections`."""
    before = iperf3_gbps(connections)
    measured = measure_engine(connections, scale)
    after = iperf3_gbps(connections)
    iperf = [v for v in (before, after) if v is not None]
    out: dict[str, Any] = {"connections": connections, "engine": measured,
                           "iperf3_streams": connections,
                           "iperf3_gbps_runs": iperf,
                           "iperf3_gbps": statistics.median(iperf) if iperf else None}
    if iperf:
        out["vs_iperf3"] = {r["name"]: round(r["gbps"] / out["iperf3_gbps"], 3)
                            for r in measured}
    return out


def _print_table(report: dict[str, Any]) -> None:
    runs = report["runs"]
    header = f"{'pattern':18s}" + "".join(
        f" | {run['connections']} conn GB/s  vs iperf3 -P {run['connections']}" for run in runs)
    print(header)
    for i, r in enumerate(runs[0]["engine"]):
        row = f"{r['name']:18s}"
        for run in runs:
            e = run["engine"][i]
            ratio = run.get("vs_iperf3", {}).get(e["name"])
            ratio_text = f"{ratio:.2f}x" if ratio is not None else "no iperf3"
            row += f" | {e['gbps']:11.2f}  {ratio_text:>19s}"
        print(row)
    for run in runs:
        if run["iperf3_gbps"] is not None:
            print(f"ceiling iperf3 -P {run['connections']}: {run['iperf3_gbps']:.2f} GB/s")
    print(f"ceiling memcpy: {report['memcpy_gbps']:.2f} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mooncake_vllm.bench transfer")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document and keep it in the results folder")
    parser.add_argument("--connections", type=int, default=2,
                        help="N: the engine on N connections per peer against iperf3 -P N, "
                        "beside 1 against -P 1 (2 suits a 2-core loopback)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the run counts")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.connections)
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, got {args.connections}")

    started, host = results.started_at(), results.host_info()
    counts = sorted({1, args.connections})
    report: dict[str, Any] = {
        "unit": "GB/s (1e9 bytes per second)",
        "runs": [compare(n, args.scale) for n in counts],
        "memcpy_gbps": memcpy_gbps(),
    }
    if args.json:
        path = results.write_result("transfer", report, started, host, args.note,
                                    args.results_dir)
        print(json.dumps(report, indent=2))
        print(f"kept in {path}", file=sys.stderr)
    else:
        _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
