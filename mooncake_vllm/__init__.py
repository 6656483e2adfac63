"""mooncake-vllm: disaggregated prefill/decode serving for vLLM with layer-wise KV push."""

__version__ = "0.1.0"
