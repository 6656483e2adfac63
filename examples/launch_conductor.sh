#!/usr/bin/env bash
# The conductor: the address clients use. With etcd it discovers every instance that registers;
# without (METADATA_SERVER=p2p) give it the instances' URLs.
#   examples/launch_conductor.sh
#   METADATA_SERVER=p2p PREFILL=http://127.0.0.1:8100 DECODE=http://127.0.0.1:8200 \
#     examples/launch_conductor.sh
# MOONCAKE_VLLM_CLUSTER_TOKEN (environment): the instances' cluster token; the conductor signs
# the transfer parameters it writes with it (instances with a token refuse unsigned ones).
set -euo pipefail
PORT=${PORT:-8000}
METADATA_SERVER=${METADATA_SERVER:-etcd://127.0.0.1:2379}

if [[ "$METADATA_SERVER" == p2p ]]; then
  args=()
  for url in ${PREFILL:?set PREFILL to prefill URLs (space-separated)}; do args+=(--prefill "$url"); done
  for url in ${DECODE:?set DECODE to decode URLs (space-separated)}; do args+=(--decode "$url"); done
  exec mooncake-vllm proxy --host 0.0.0.0 --port "$PORT" "${args[@]}" "$@"
fi
exec mooncake-vllm proxy --host 0.0.0.0 --port "$PORT" --metadata-server "$METADATA_SERVER" "$@"
