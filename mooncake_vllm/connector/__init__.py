"""The vLLM KV connector: layer-wise push of KV from prefill to decode instances.

Import `MooncakeVllmConnector` from `mooncake_vllm.connector.connector` (kept out of this
package's import so that light users, e.g. the proxy, do not pull in vLLM).
"""
