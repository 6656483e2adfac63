"""`python -m mooncake_vllm.bench NAME [...]`: one module per benchmark in this package."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "transfer": "engine throughput on 1 and N connections vs iperf3 -P 1 and -P N",
    "layerwise": "exposed vs non-overlapped KV transfer time for one long prefill",
    "routing": "cache-aware vs round-robin routing on a multi-turn workload",
    "serve": "goodput under TTFT and ITL SLOs: P/D vs one instance vs vLLM's MooncakeConnector",
    "pool": "the cluster KV pool on a multi-turn shared-document workload: none, DRAM, SSD",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python -m mooncake_vllm.bench NAME [--json] [...]\n", file=sys.stderr)
        for name, what in BENCHMARKS.items():
            print(f"  {name:10s} {what}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mooncake_vllm.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
