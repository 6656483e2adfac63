#!/usr/bin/env bash
# Turn on etcd's authentication for mooncake-vllm, once; running it again only re-checks.
#
#   root   etcd's administrator (every permission); its password stays with the operator
#   ROLE   read/write on the key prefix /mooncake-vllm/ only (every namespace's instances and
#          segments live under it), nothing else
#   USER   what the instances and the conductor log in as (MOONCAKE_VLLM_ETCD_USER), with ROLE only
#
# Environment (the same names the instances use, so one env file serves both):
#   ETCD_ENDPOINTS                  https://HOST:2379[,...]
#   MOONCAKE_VLLM_ETCD_CA_CERT      the CA that signed etcd's certificate
#   MOONCAKE_VLLM_ETCD_CERT/_KEY    a client certificate (etcd runs with --client-cert-auth)
#   MOONCAKE_VLLM_ETCD_USER         default mooncake-vllm
#   MOONCAKE_VLLM_ETCD_PASSWORD     that user's password
#   ETCD_ROOT_PASSWORD              root's password
# Passwords go to etcdctl on stdin (--interactive=false), never on a command line.
#
# Used by deploy/compose/compose.yaml (service etcd-auth). deploy/README.md shows the same
# steps one etcdctl command at a time, for Kubernetes (kubectl exec into the etcd pod).
set -euo pipefail
export ETCDCTL_API=3  # etcdctl 3.3 (Ubuntu 22.04's etcd-client) still defaults to the v2 API
: "${ETCD_ENDPOINTS:?set ETCD_ENDPOINTS (https://HOST:2379)}"
: "${MOONCAKE_VLLM_ETCD_CA_CERT:?set MOONCAKE_VLLM_ETCD_CA_CERT (CA file)}"
: "${MOONCAKE_VLLM_ETCD_CERT:?set MOONCAKE_VLLM_ETCD_CERT (client certificate file)}"
: "${MOONCAKE_VLLM_ETCD_KEY:?set MOONCAKE_VLLM_ETCD_KEY (client key file)}"
: "${ETCD_ROOT_PASSWORD:?set ETCD_ROOT_PASSWORD (etcd root user password)}"
: "${MOONCAKE_VLLM_ETCD_PASSWORD:?set MOONCAKE_VLLM_ETCD_PASSWORD (the instances etcd password)}"
user="${MOONCAKE_VLLM_ETCD_USER:-mooncake-vllm}"
role="${MOONCAKE_VLLM_ETCD_ROLE:-mooncake-vllm}"
prefix=/mooncake-vllm/

ctl() {
  etcdctl --endpoints="$ETCD_ENDPOINTS" --cacert="$MOONCAKE_VLLM_ETCD_CA_CERT" \
    --cert="$MOONCAKE_VLLM_ETCD_CERT" --key="$MOONCAKE_VLLM_ETCD_KEY" "$@"
}

# etcd may still be starting (endpoint health needs no user, auth on or off).
for _ in $(seq 60); do
  ctl endpoint health >/dev/null 2>&1 && break
  sleep 1
done

if ctl --user="root:${ETCD_ROOT_PASSWORD}" user get "$user" >/dev/null 2>&1; then
  echo "etcd auth already enabled"
elif ! ctl user list >/dev/null 2>&1; then  # answers without a user only while auth is off
  echo "etcd auth is enabled, but root does not log in with ETCD_ROOT_PASSWORD" >&2
  exit 1
else
  # "already exists" from an earlier run that stopped half-way is fine; the checks at the end
  # catch anything that really went wrong.
  printf '%s\n' "$ETCD_ROOT_PASSWORD" | ctl user add root --interactive=false || true
  ctl role add root >/dev/null 2>&1 || true  # etcd wants root to hold the root role
  ctl user grant-role root root
  ctl role add "$role" || true
  ctl role grant-permission "$role" --prefix=true readwrite "$prefix"
  printf '%s\n' "$MOONCAKE_VLLM_ETCD_PASSWORD" | ctl user add "$user" --interactive=false || true
  ctl user grant-role "$user" "$role"
  ctl auth enable
fi

# The service user can write its prefix, and cannot read outside it; nobody gets in without one.
ctl --user="${user}:${MOONCAKE_VLLM_ETCD_PASSWORD}" put "${prefix}.auth-check" ok >/dev/null
ctl --user="${user}:${MOONCAKE_VLLM_ETCD_PASSWORD}" del "${prefix}.auth-check" >/dev/null
if ctl --user="${user}:${MOONCAKE_VLLM_ETCD_PASSWORD}" get /outside-mooncake-vllm >/dev/null 2>&1; then
  echo "etcd user $user can read outside $prefix: check role $role" >&2
  exit 1
fi
if ctl get "${prefix}" >/dev/null 2>&1; then
  echo "etcd answers reads without a user: auth is not enabled" >&2
  exit 1
fi
echo "etcd auth enabled: user $user limited to $prefix"
