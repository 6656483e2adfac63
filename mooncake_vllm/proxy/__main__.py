"""`mooncake-vllm proxy` / `python -m mooncake_vllm.proxy`: run the conductor.

    mooncake-vllm proxy --port 8000 --prefill http://p1:8100 --decode http://d1:8200
    mooncake-vllm proxy --port 8000 --metadata-server etcd://10.0.0.5:2379
    mooncake-vllm proxy --port 8000 --both http://a:8100 --both http://b:8100   # no P/D split

Security: only the conductor writes a request's kv_transfer_params (a client's are dropped);
with a cluster token (MOONCAKE_VLLM_CLUSTER_TOKEN, as the instances' connectors) it signs
them, and connectors with the token refuse unsigned ones. A client's Authorization header is
passed to the instances, so vLLM's --api-key works behind the conductor. /instances and
/admission need the admin token, or without one are served to loopback clients only. Secrets
are best given in the environment: command lines are visible to every local user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from .config import POLICIES, ProxyConfig, ProxyConfigError

ENV_CLUSTER_TOKEN = "MOONCAKE_VLLM_CLUSTER_TOKEN"  # the connector's name for the same secret
ENV_ADMIN_TOKEN = "MOONCAKE_VLLM_ADMIN_TOKEN"
ENV_UPSTREAM_API_KEY = "MOONCAKE_VLLM_UPSTREAM_API_KEY"


def _secret(flag: str | None, env: str) -> str | None:
    return flag or os.environ.get(env) or None


def _kv_events(text: str) -> tuple[str, str]:
    url, sep, endpoint = text.partition("=")
    if not sep or not url or not endpoint:
        raise argparse.ArgumentTypeError(f"{text!r}: expected URL=tcp://HOST:PORT")
    return url, endpoint


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds or 'none'") from None


def _count_or_auto(text: str) -> float | None:
    """An override (a number) or 'auto'; integers stay integers."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or 'auto'") from None
    return int(value) if value.is_integer() else value


def parse_args(argv: list[str] | None) -> ProxyConfig:
    ap = argparse.ArgumentParser(prog="mooncake-vllm proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ProxyConfig()
    ap.add_argument("--host", default=d.host)
    ap.add_argument("--port", type=int, default=d.port)
    ap.add_argument("--prefill", action="append", default=[], metavar="URL",
                    help="prefill instance (repeatable)")
    ap.add_argument("--decode", action="append", default=[], metavar="URL",
                    help="decode instance (repeatable)")
    ap.add_argument("--both", action="append", default=[], metavar="URL",
                    help="instance that serves requests alone, without disaggregation")
    ap.add_argument("--kv-events", action="append", default=[], type=_kv_events,
                    metavar="URL=tcp://HOST:PORT",
                    help="an instance's vLLM KV cache events (its --kv-events-config "
                    "endpoint): its prefix index then follows what vLLM caches and evicts "
                    "(repeatable)")
    ap.add_argument("--metadata-server", default="", metavar="etcd://HOST:PORT",
                    help="discover instances in etcd (they may come and go)")
    ap.add_argument("--namespace", default=d.namespace)
    ap.add_argument("--policy", choices=POLICIES, default=d.policy)
    ap.add_argument("--slo-ttft-s", type=_seconds_or_none, default=d.slo_ttft_s,
                    metavar="S|none", help="time-to-first-token SLO. Given, admission is on: "
                    "a request predicted to miss it (or to miss the ITL SLO on every path) is "
                    "refused at once with 503 + Retry-After (default: none, admit all)")
    ap.add_argument("--slo-itl-s", type=_seconds_or_none, default=d.slo_itl_s,
                    metavar="S|none", help="inter-token-latency SLO: a decode instance "
                    "prefills a prompt itself (locally or pipelined) only while its running "
                    "decodes' predicted gap between tokens stays within it (default "
                    "%(default)s s: ten tokens a second, faster than anyone reads; none: no "
                    "bound)")
    ap.add_argument("--local-prefill-max-tokens", type=_count_or_auto,
                    default=d.local_prefill_max_tokens, metavar="N|auto",
                    help="override: prompts of at most N tokens are always prefilled on the "
                    "decode instance, longer ones never (unless --local-prefill-when-faster); "
                    "0: never by size (default auto: by predicted TTFT and ITL)")
    ap.add_argument("--local-prefill-when-faster", action="store_true",
                    help="with --local-prefill-max-tokens: also prefill on the decode "
                    "instance when its predicted TTFT beats the prefill instances'")
    ap.add_argument("--pipeline-prefill-min-tokens", type=_count_or_auto,
                    default=d.pipeline_prefill_min_tokens, metavar="N|auto",
                    help="override: prompts of at least N tokens are always prefilled by P and "
                    "D at once, one layer apart; 0: never (default auto: by prediction)")
    ap.add_argument("--pipeline-prefill-share", type=float,
                    default=d.pipeline_prefill_share, metavar="F",
                    help="the prefill instance's share of a pipelined prompt's compute "
                    "(default %(default)s)")
    ap.add_argument("--pipeline-attention-tokens", type=_count_or_auto,
                    default=d.pipeline_attention_tokens, metavar="C|auto",
                    help="override: context length at which a token's attention costs as "
                    "much as the rest of its layer; 0: split tokens (default auto: from the "
                    "model shape the prefill instance publishes)")
    ap.add_argument("--pipeline-gate", action="store_true",
                    help="D schedules a pipelined request's part only once P has started its "
                    "head: D's running decodes never wait on P's queue, at the price of the "
                    "pipelined request's TTFT")
    ap.add_argument("--prefill-window-tokens", type=_count_or_auto,
                    default=d.prefill_window_tokens, metavar="N|auto",
                    help="override: at most N prompt tokens in flight at each prefill "
                    "instance; later requests wait at the conductor, first come first served; "
                    "0: off (default auto: what P prefills in "
                    f"{d.prefill_window_target_s:g} s at its measured speed)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (model path) for exact prefix blocks; else text chunks")
    ap.add_argument("--block-tokens", type=int, default=d.block_tokens,
                    help="tokens per prefix block (vLLM's --block-size)")
    ap.add_argument("--prefix-capacity-blocks", type=int, default=d.prefix_capacity_blocks)
    ap.add_argument("--health-interval-s", type=float, default=d.health_interval_s)
    ap.add_argument("--health-timeout-s", type=float, default=d.health_timeout_s)
    ap.add_argument("--connect-timeout-s", type=float, default=d.connect_timeout_s)
    ap.add_argument("--prefill-timeout-s", type=float, default=d.prefill_timeout_s)
    ap.add_argument("--first-token-timeout-s", type=float, default=d.first_token_timeout_s)
    ap.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s)
    ap.add_argument("--max-attempts", type=int, default=d.max_attempts)
    ap.add_argument("--prior-tokens-per-s", type=float, default=d.prior_tokens_per_s)
    ap.add_argument("--prior-overhead-s", type=float, default=d.prior_overhead_s)
    ap.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                    metavar="N", help="generation requests served at once; more are refused "
                    "at once with 503 + Retry-After (default %(default)s). Also sizes the "
                    "upstream connection pool")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="BYTES",
                    help="larger request bodies are refused with 413 (default %(default)s)")
    ap.add_argument("--cluster-token", default=None, metavar="TOKEN",
                    help=f"sign the kv_transfer_params the conductor writes (env "
                    f"{ENV_CLUSTER_TOKEN}, which the instances' connectors read too); "
                    "without it they are written unsigned")
    ap.add_argument("--admin-token", default=None, metavar="TOKEN",
                    help=f"/instances and /admission need 'Authorization: Bearer TOKEN' (env "
                    f"{ENV_ADMIN_TOKEN}); without it they are served to loopback clients only")
    ap.add_argument("--upstream-api-key", default=None, metavar="KEY",
                    help=f"the instances' vLLM --api-key, for the conductor's own calls "
                    f"(health checks, remote_control probes; env {ENV_UPSTREAM_API_KEY}). "
                    "Client requests carry the client's own Authorization header")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ProxyConfig(
        host=a.host, port=a.port, prefill_urls=tuple(a.prefill), decode_urls=tuple(a.decode),
        both_urls=tuple(a.both), metadata_server=a.metadata_server, namespace=a.namespace,
        policy=a.policy, local_prefill_max_tokens=a.local_prefill_max_tokens,
        local_prefill_when_faster=a.local_prefill_when_faster,
        pipeline_prefill_min_tokens=a.pipeline_prefill_min_tokens,
        pipeline_prefill_share=a.pipeline_prefill_share,
        pipeline_attention_tokens=a.pipeline_attention_tokens, pipeline_gate=a.pipeline_gate,
        prefill_window_tokens=a.prefill_window_tokens,
        slo_ttft_s=a.slo_ttft_s, slo_itl_s=a.slo_itl_s, tokenizer=a.tokenizer,
        block_tokens=a.block_tokens, prefix_capacity_blocks=a.prefix_capacity_blocks,
        kv_events=tuple(a.kv_events),
        health_interval_s=a.health_interval_s, health_timeout_s=a.health_timeout_s,
        connect_timeout_s=a.connect_timeout_s, prefill_timeout_s=a.prefill_timeout_s,
        first_token_timeout_s=a.first_token_timeout_s, idle_timeout_s=a.idle_timeout_s,
        max_attempts=a.max_attempts, prior_tokens_per_s=a.prior_tokens_per_s,
        prior_overhead_s=a.prior_overhead_s,
        max_concurrent_requests=a.max_concurrent_requests, max_body_bytes=a.max_body_bytes,
        cluster_token=_secret(a.cluster_token, ENV_CLUSTER_TOKEN),
        admin_token=_secret(a.admin_token, ENV_ADMIN_TOKEN),
        upstream_api_key=_secret(a.upstream_api_key, ENV_UPSTREAM_API_KEY),
    ).validate()


async def _run(config: ProxyConfig) -> None:
    from .app import start_server

    runner, port = await start_server(config)
    print(f"mooncake-vllm proxy listening on http://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ProxyConfigError as e:
        print(f"mooncake-vllm proxy: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(config))
    except OSError as e:  # port in use, metadata store unreachable, ...
        print(f"mooncake-vllm proxy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
