"""The conductor: an OpenAI-compatible front door for disaggregated prefill/decode serving.

Per request it picks a prefill instance (prefix-cache affinity against queued prefill work) and
a decode instance (load), refuses at once what it predicts would miss the TTFT SLO, sends both
halves with one transfer id, and streams the decode instance's answer back.

Modules: `config` (settings), `upstreams` (instances and their load), `discovery` (static lists
or etcd) and `validation` (checks on discovered records), `health` (checks and load scraping),
`prompt` (prefix block hashes), `routing` (policies), `admission` (TTFT prediction, early
rejection), `disagg` (one request's path), `upstream_calls` (one call to one instance),
`transfer_params` (the kv_transfer_params the conductor writes and signs), `limits`
(concurrency, body size, off-loop parsing), `access` (admin views, upstream authorization),
`errors` (what clients see of failures), `app` (HTTP routes), `metrics` (Prometheus).
"""
