"""`mooncake-vllm doctor`: checks an installation, or a whole P/D cluster.

    mooncake-vllm doctor                                    this host: engine build, RDMA
    mooncake-vllm doctor --metadata-server etcd://H:2379    every instance registered there
    mooncake-vllm doctor --prefill URL --decode URL         a p2p pair (no metadata server)

The cluster checks (cluster.py) print one line per finding and, for each failure, the fix;
the exit status is 1 when anything failed. The cluster token comes from --token-file, else
MOONCAKE_VLLM_CLUSTER_TOKEN, as the instances and the conductor take it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from mooncake_vllm.doctor.cluster import (
    Finding,
    diagnose,
    members_from_metadata,
    members_from_urls,
)
from mooncake_vllm.doctor.local import collect, print_report

__all__ = ["Finding", "collect", "main"]

ENV_CLUSTER_TOKEN = "MOONCAKE_VLLM_CLUSTER_TOKEN"


def _token(path: str | None) -> str | None:
    if path is None:
        return os.environ.get(ENV_CLUSTER_TOKEN) or None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError as e:
        raise SystemExit(f"mooncake-vllm doctor: --token-file {path}: {e.strerror}") from None


def cluster_findings(args: argparse.Namespace) -> list[Finding]:
    token = _token(args.token_file)
    if args.metadata_server:
        from mooncake_vllm.metadata import MetadataError, parse_metadata_url

        try:
            endpoints = parse_metadata_url(args.metadata_server).endpoints
        except MetadataError as e:
            raise SystemExit(f"mooncake-vllm doctor: --metadata-server: {e}") from None
        metadata_host = endpoints[0].host if endpoints else None
        members, found = members_from_metadata(args.metadata_server, args.namespace)
        findings = [found]
    else:
        urls = [("prefill", u) for u in args.prefill] + [("decode", u) for u in args.decode]
        members, findings = members_from_urls(urls, token)
        metadata_host = None
    if args.metadata_server and not findings[0].ok:
        return findings
    return findings + diagnose(members, token, metadata_host)


def print_findings(findings: list[Finding]) -> None:
    width = max((len(f.check) for f in findings), default=5)
    for f in findings:
        print(f"{'ok ' if f.ok else 'FAIL'} {f.check:<{width}}  {f.subject}: {f.detail}")
        if not f.ok and f.fix:
            print(f"     {'':<{width}}  fix: {f.fix}")
    failed = sum(not f.ok for f in findings)
    print(f"{len(findings)} checks, {failed} failed" if findings else "nothing to check")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mooncake-vllm doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--metadata-server", metavar="URL",
                    help="check every instance registered here (etcd://host:port)")
    ap.add_argument("--namespace", default=None, help="the cluster's metadata namespace")
    ap.add_argument("--prefill", action="append", default=[], metavar="URL",
                    help="a prefill instance's HTTP URL (p2p; repeat for several)")
    ap.add_argument("--decode", action="append", default=[], metavar="URL",
                    help="a decode instance's HTTP URL (p2p; repeat for several)")
    ap.add_argument("--token-file", default=None, metavar="F",
                    help=f"the cluster token (default: ${ENV_CLUSTER_TOKEN})")
    args = ap.parse_args(argv)
    if args.metadata_server and (args.prefill or args.decode):
        ap.error("--metadata-server or --prefill/--decode, not both")
    if not (args.metadata_server or args.prefill or args.decode):
        report = collect()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report)
        return 0 if report["engine"]["ok"] else 1
    findings = cluster_findings(args)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print_findings(findings)
    return 0 if findings and all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
