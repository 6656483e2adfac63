#!/usr/bin/env bash
# Make the TLS material etcd and its clients use, with openssl only:
#
#   ca.crt, ca.key          a private CA for this etcd alone (keep ca.key offline: whoever holds
#                           it can mint client certificates etcd accepts)
#   server.crt, server.key  etcd's certificate, for clients (serverAuth) and for its peers and
#                           its own etcdctl (clientAuth): names below
#   client.crt, client.key  the certificate the instances and the conductor present
#                           (--client-cert-auth makes etcd refuse any connection without one)
#
#   deploy/etcd/make-certs.sh OUTDIR            # Kubernetes namespace mooncake-vllm
#   NAMESPACE=prod deploy/etcd/make-certs.sh OUTDIR
#
# The server certificate names every address a client or peer dials: the Service (etcd,
# etcd.NS, etcd.NS.svc[.cluster.local]), each member through the headless Service etcd-peer
# (etcd-0.etcd-peer.NS.svc...), and localhost / 127.0.0.1 (compose, port-forward, etcdctl in
# the pod). Add yours with EXTRA_SANS="DNS:etcd.example.com,IP:10.0.0.5".
#
# With --client-cert-auth and auth enabled, etcd takes a client certificate's CN as the user
# name when no password is given: the CNs here (etcd, mooncake-vllm-etcd-client) must not be
# etcd users, so that a certificate alone never logs anyone in.
set -euo pipefail
out="${1:?usage: make-certs.sh OUTDIR}"
ns="${NAMESPACE:-mooncake-vllm}"
days="${DAYS:-825}"
mkdir -p "$out"
cd "$out"
umask 077
for f in ca.crt server.crt client.crt; do
  [ -e "$f" ] && { echo "$out/$f exists: not overwriting (remove the directory to start over)" >&2; exit 1; }
done

sans="DNS:etcd,DNS:etcd.${ns},DNS:etcd.${ns}.svc,DNS:etcd.${ns}.svc.cluster.local"
sans+=",DNS:*.etcd-peer.${ns}.svc,DNS:*.etcd-peer.${ns}.svc.cluster.local"
sans+=",DNS:localhost,IP:127.0.0.1${EXTRA_SANS:+,$EXTRA_SANS}"
cat > ext.cnf <<CNF
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = ${sans}
[client]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
CNF

openssl req -new -newkey rsa:3072 -nodes -subj "/CN=mooncake-vllm etcd CA" \
  -keyout ca.key -out ca.csr 2>/dev/null
openssl x509 -req -in ca.csr -signkey ca.key -days 3650 -extfile ext.cnf -extensions ca \
  -out ca.crt 2>/dev/null
openssl req -new -newkey rsa:3072 -nodes -subj "/CN=etcd" -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile ext.cnf -extensions server -out server.crt 2>/dev/null
openssl req -new -newkey rsa:3072 -nodes -subj "/CN=mooncake-vllm-etcd-client" \
  -keyout client.key -out client.csr 2>/dev/null
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile ext.cnf -extensions client -out client.crt 2>/dev/null
rm -f ca.csr server.csr client.csr ca.srl ext.cnf
openssl verify -CAfile ca.crt server.crt client.crt
echo "TLS material for etcd in $(pwd) (server names: ${sans})"
