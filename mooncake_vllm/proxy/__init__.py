"""The conductor: an OpenAI-compatible front door for disaggregated prefill/decode serving.

Per request it picks a prefill instance (prefix-cache affinity against queued prefill work) and
a decode instance (load), refuses at once what it predicts would miss the TTFT SLO, sends both
halves with one transfer id, and streams the decode instance's answer back.

Modules: `config` (settings), `upstreams` (instances and their load), `discovery` (static lists
or etcd), `health` (checks and load scraping), `prompt` (prefix block hashes), `routing`
(policies), `admission` (TTFT prediction, early rejection), `disagg` (one request's path),
`app` (HTTP routes), `metrics` (Prometheus).
"""
