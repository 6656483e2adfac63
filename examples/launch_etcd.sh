#!/usr/bin/env bash
# etcd for one host (or one node of a small cluster): where instances register and the
# conductor finds them. ETCD_HOST is the address other hosts reach it at.
#   ETCD_HOST=10.0.0.5 examples/launch_etcd.sh
set -euo pipefail
ETCD_HOST=${ETCD_HOST:-127.0.0.1}
ETCD_PORT=${ETCD_PORT:-2379}
ETCD_DATA=${ETCD_DATA:-${TMPDIR:-/tmp}/mooncake-vllm-etcd}

exec etcd \
  --name mooncake-vllm-etcd \
  --data-dir "$ETCD_DATA" \
  --listen-client-urls "http://${ETCD_HOST}:${ETCD_PORT}" \
  --advertise-client-urls "http://${ETCD_HOST}:${ETCD_PORT}" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "mooncake-vllm-etcd=http://127.0.0.1:$((ETCD_PORT + 1))"
