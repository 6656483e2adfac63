"""`mooncake-vllm store`: run one node of the cluster KV pool, or show a node's status.

    mooncake-vllm store --metadata-server etcd://10.0.0.5:2379 --hostname 10.0.0.7 \\
        --dram-gib 64 --ssd-path /nvme/mooncake-pool.bin --ssd-gib 512
    mooncake-vllm store --status http://10.0.0.7:8790
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from mooncake_vllm.metadata import MetadataError, open_metadata
from mooncake_vllm.security import MIN_TOKEN_CHARS, is_loopback_host, is_wildcard_host
from mooncake_vllm.store.server import StoreServer, StoreSettings, default_name

GIB = 1 << 30


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mooncake-vllm store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--status", metavar="URL", help="print the status of the node serving URL "
                   "(its status_url) and exit")
    p.add_argument("--name", default=None, help="unique in the namespace (default: hostname)")
    p.add_argument("--hostname", default=os.environ.get("VLLM_HOST_IP", "127.0.0.1"),
                   help="address to listen on and advertise (not a wildcard)")
    p.add_argument("--metadata-server",
                   default=os.environ.get("MOONCAKE_VLLM_METADATA_SERVER", ""),
                   help="etcd://host:port[,host:port] (membership needs etcd)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--dram-gib", type=float, default=1.0, help="DRAM tier size")
    p.add_argument("--ssd-path", type=Path, default=None, help="SSD tier file (created, and "
                   "removed at exit)")
    p.add_argument("--ssd-gib", type=float, default=0.0, help="SSD tier size (0: none)")
    p.add_argument("--slot-bytes", type=int, default=1 << 20,
                   help="bytes per entry slot: at least one block of every layer of the "
                   "largest model that uses the pool")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--engine-port", type=int, default=0)
    p.add_argument("--status-port", type=int, default=0, help="HTTP /status and /metrics "
                   "(0: any free port, -1: none)")
    p.add_argument("--hot-reads", type=int, default=16, help="reads per window that ask for "
                   "one more copy of a block")
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--hot-window-s", type=float, default=10.0)
    p.add_argument("--insecure", action="store_true", help="listen on a non-loopback "
                   "address without MOONCAKE_VLLM_CLUSTER_TOKEN")
    return p


def _refusal(args: argparse.Namespace, token: str | None) -> str | None:
    if not args.metadata_server.startswith(("etcd://", "etcds://", "http://", "https://")):
        return ("--metadata-server (or MOONCAKE_VLLM_METADATA_SERVER) must name etcd: store "
                "membership lives there")
    if is_wildcard_host(args.hostname):
        return f"--hostname {args.hostname!r} is a wildcard: give the address peers reach"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return f"MOONCAKE_VLLM_CLUSTER_TOKEN is too short (at least {MIN_TOKEN_CHARS} chars)"
    if not token and not args.insecure and not is_loopback_host(args.hostname):
        return (f"--hostname {args.hostname!r} is not loopback and no cluster token is set: "
                "anyone reaching the ports could read and overwrite pooled KV. Set "
                "MOONCAKE_VLLM_CLUSTER_TOKEN, or pass --insecure on an isolated network")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.status:
        url = args.status.rstrip("/") + "/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                print(json.dumps(json.load(r), indent=2))
        except (OSError, ValueError) as e:
            print(f"mooncake-vllm store: {url}: {e}", file=sys.stderr)
            return 1
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    token = os.environ.get("MOONCAKE_VLLM_CLUSTER_TOKEN") or None
    why = _refusal(args, token)
    if why is not None:
        print(f"mooncake-vllm store: {why}", file=sys.stderr)
        return 2
    try:
        settings = StoreSettings(
            name=args.name or default_name(), hostname=args.hostname,
            slot_bytes=args.slot_bytes, dram_bytes=int(args.dram_gib * GIB),
            ssd_path=args.ssd_path, ssd_bytes=int(args.ssd_gib * GIB),
            control_port=args.control_port, engine_port=args.engine_port,
            status_port=args.status_port, cluster_token=token, hot_reads=args.hot_reads,
            max_replicas=args.max_replicas, hot_window_s=args.hot_window_s)
        metadata = open_metadata(args.metadata_server, namespace=args.namespace)
    except (ValueError, MetadataError) as e:
        print(f"mooncake-vllm store: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = StoreServer(settings, metadata)
    print(f"store {settings.name} ready: {server.info.status_url or server.info.control_endpoint}",
          flush=True)
    stop.wait()
    server.close()
    metadata.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
