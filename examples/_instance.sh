# Shared by launch_prefill.sh and launch_decode.sh (sourced, not run): starts `vllm serve` with
# MooncakeVllmConnector in the role $KV_ROLE. Every setting is an environment variable:
#   MODEL            model directory or hub name (required)
#   PORT             HTTP port of this instance
#   HOST_IP          the address other hosts reach this one at (transfer engine, control, URL)
#   METADATA_SERVER  etcd://HOST:PORT, or p2p (then start the conductor with --prefill/--decode)
#   PROTOCOL         tcp | rdma | auto
#   CLUSTER_TOKEN    the cluster's shared secret (README, Security); required when HOST_IP is
#                    not a loopback address (the instance refuses to start without it)
#   VLLM_ARGS        anything else for `vllm serve` (e.g. "--tensor-parallel-size 2")
set -euo pipefail
: "${MODEL:?set MODEL to a model directory or hub name}"
HOST_IP=${HOST_IP:-127.0.0.1}
METADATA_SERVER=${METADATA_SERVER:-etcd://127.0.0.1:2379}
PROTOCOL=${PROTOCOL:-auto}

KV_TRANSFER_CONFIG=$(cat <<JSON
{"kv_connector": "MooncakeVllmConnector", "kv_role": "${KV_ROLE}",
 "kv_connector_extra_config": {"metadata_server": "${METADATA_SERVER}",
   "protocol": "${PROTOCOL}", "hostname": "${HOST_IP}",
   "advertise_url": "http://${HOST_IP}:${PORT}"}}
JSON
)
if [[ -n "${CLUSTER_TOKEN:-}" ]]; then
  export MOONCAKE_VLLM_CLUSTER_TOKEN=$CLUSTER_TOKEN  # env, not argv: keeps it out of `ps`
fi
export VLLM_HOST_IP=$HOST_IP

# shellcheck disable=SC2086  # VLLM_ARGS is a list of words
exec vllm serve "$MODEL" --host 0.0.0.0 --port "$PORT" \
  --kv-transfer-config "$KV_TRANSFER_CONFIG" ${VLLM_ARGS:-}
