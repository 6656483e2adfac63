"""`python -m mooncake_vllm.bench NAME [...]`: one module per benchmark in this package."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "transfer": "engine throughput between two processes vs the machine's ceilings",
    "layerwise": "exposed vs non-overlapped KV transfer time for one long prefill",
    "routing": "cache-aware vs round-robin routing on a multi-turn workload",
    "serve": "P/D vs a single instance (and vLLM's built-in connectors) under load",
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
