"""The `mooncake-vllm` command: one subcommand per module, imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv) -> int`, one-line help)
SUBCOMMANDS = {
    "doctor": ("mooncake_vllm.doctor", "this host's engine and RDMA, or a P/D cluster"),
    "proxy": ("mooncake_vllm.proxy.__main__", "the conductor: OpenAI-compatible P/D proxy"),
    "store": ("mooncake_vllm.store.__main__", "a node of the cluster KV pool (DRAM, SSD)"),
    "demo": ("mooncake_vllm.demo", "run the whole stack on loopback and check its answers"),
    "bench": ("mooncake_vllm.bench.__main__", "benchmarks: transfer, layerwise, routing, serve"),
    "tiny-model": ("mooncake_vllm.testing.tiny_model", "write the hub-free tiny test model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: mooncake-vllm COMMAND [...]\n\ncommands:", file=sys.stderr)
        for name, (_, what) in SUBCOMMANDS.items():
            print(f"  {name:11s} {what}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
