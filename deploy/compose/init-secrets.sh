#!/usr/bin/env bash
# Once per host, before the first `docker compose up`: the secrets compose.yaml requires.
#   deploy/compose/secrets/   etcd's CA, server and client certificates (deploy/etcd/make-certs.sh)
#   deploy/compose/.env       random tokens and passwords, and ETCD_TLS_DIR (mode 600)
# Both are git-ignored (deploy/compose/.gitignore). Nothing is overwritten: delete them to
# start over (and the etcd-data volume too, whose auth already holds the old passwords).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
env_file="$here/.env"
tls_dir="$here/secrets"
if [ -e "$env_file" ]; then
  echo "$env_file exists: not overwriting" >&2
  exit 1
fi
"$here/../etcd/make-certs.sh" "$tls_dir"
umask 077
{
  echo "# Written by init-secrets.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Keep private."
  echo "MOONCAKE_VLLM_CLUSTER_TOKEN=$(openssl rand -hex 32)"
  echo "MOONCAKE_VLLM_ADMIN_TOKEN=$(openssl rand -hex 32)"
  echo "MOONCAKE_VLLM_ETCD_PASSWORD=$(openssl rand -hex 24)"
  echo "ETCD_ROOT_PASSWORD=$(openssl rand -hex 24)"
  echo "ETCD_TLS_DIR=$tls_dir"
} > "$env_file"
echo "wrote $env_file and $tls_dir"
