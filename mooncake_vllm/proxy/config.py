"""ProxyConfig: the conductor's settings, parsed once from the command line and validated."""

from __future__ import annotations

from dataclasses import dataclass, field

from mooncake_vllm.remote_control import endpoint_problem
from mooncake_vllm.security import MIN_TOKEN_CHARS

from .validation import http_url_problem

POLICIES = ("cache_aware", "least_loaded", "round_robin")


class ProxyConfigError(ValueError):
    """A setting that cannot be used; the message names it and the bad value."""


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Static instances (URLs). "both" instances serve a request alone, without disaggregation.
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    both_urls: tuple[str, ...] = ()
    # Discovery: "etcd://host:port" (instances appear and vanish without a restart).
    metadata_server: str = ""
    namespace: str = "default"
    policy: str = "cache_aware"
    # Every request's path (disaggregated, prefilled locally on D, pipelined P+D, or rejected)
    # is chosen by prediction against the two SLOs (planner.py). The settings below that
    # default to None are derived or predicted; a value given overrides that decision.
    #
    # Local prefill: a prompt of at most this many tokens is always prefilled by the decode
    # instance itself, and a longer one only with `local_prefill_when_faster` (by predicted
    # TTFT). 0: never by size. None: by prediction (the P/D handoff's measured cost included).
    local_prefill_max_tokens: int | None = None
    local_prefill_when_faster: bool = False
    # Pipelined prefill: P computes the prompt's first `pipeline_prefill_share` of compute
    # (whole blocks) and writes each layer into D as it is done, while D computes the rest.
    # It needs exact token ids (--tokenizer, token-id prompts, or the instances' /tokenize)
    # and a plain completions request. N: every prompt of at least N tokens; 0: off; None: by
    # prediction.
    pipeline_prefill_min_tokens: int | None = None
    # P's share of the pipelined prompt's compute: a little over half, since P also posts the
    # writes of every layer.
    pipeline_prefill_share: float = 0.55
    # The context length C at which a token's attention costs as much as the rest of its layer
    # (non-attention MACs per token / (2 x heads x head_dim)): a token at position i costs
    # 1 + i / C, and the cut is placed where the compute splits at the share. None: derived
    # from the prefill instance's published model shape (model_shape.py); 0: split tokens.
    pipeline_attention_tokens: float | None = None
    # Pipelined requests ask D to schedule its part only once P has started the head
    # (`pipeline_gate` in D's kv_transfer_params): D's running decodes then never wait on P's
    # queue, at the price of the pipelined request's TTFT (its tail starts one D step later).
    pipeline_gate: bool = False
    # Prefill window: at most this many prompt tokens sent to one prefill instance and not yet
    # prefilled; later requests (both of their halves) wait here, in arrival order. Without it
    # a burst reaches P at once and P prefills it in one big step, so every request of the
    # burst gets its first token only when the last one is done; with it P works through the
    # burst a few requests at a time, first come first served, as a single vLLM instance does
    # with chunked prefill. A request larger than the window goes alone. 0: off. None: the
    # tokens P prefills in `prefill_window_target_s` at its measured speed.
    prefill_window_tokens: int | None = None
    prefill_window_target_s: float = 0.15
    # SLOs. TTFT: with one, admission is on: a request predicted to miss it, or whose every
    # path misses the ITL SLO, is refused at once with 503 and Retry-After. None: admit all
    # (predictions are still made and exported). ITL: local or pipelined prefill on a decode
    # instance only while its running decodes' predicted ITL stays within it. None: no bound.
    slo_ttft_s: float | None = None
    slo_itl_s: float | None = 0.1
    # What a P/D handoff is taken to cost until a P-D pair has shown its own.
    prior_handoff_s: float = 0.02
    # Without --tokenizer, a text prompt that would be pipelined is tokenized by an instance's
    # /tokenize within this deadline (else it stays on the text path, counted).
    tokenize_timeout_s: float = 2.0
    # Warm-up: each instance, when first seen healthy, prefills this many token ids (and one)
    # as plain requests, so that the first requests are planned from measured speeds.
    warmup_tokens: int = 256
    # Prefix hashing: a tokenizer (path or hub name) gives exact token blocks; without one the
    # prompt text is hashed in character chunks. See prompt.py.
    tokenizer: str | None = None
    block_tokens: int = 32
    chars_per_block: int = 128
    prefix_capacity_blocks: int = 8192
    # (instance URL, tcp://HOST:PORT of its vLLM KV cache events): its prefix index then
    # follows vLLM's cache (kv_events.py) instead of the conductor's routing alone.
    kv_events: tuple[tuple[str, str], ...] = ()
    # Health checks and load scraping.
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    # Deadlines on every upstream wait.
    connect_timeout_s: float = 5.0
    probe_timeout_s: float = 30.0
    prefill_timeout_s: float = 120.0
    first_token_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    max_attempts: int = 3
    # TTFT model prior (seconds = overhead + tokens / rate) until instances have shown theirs.
    prior_overhead_s: float = 0.05
    prior_tokens_per_s: float = 2000.0
    # Secrets (from flags or MOONCAKE_VLLM_* environment variables; see __main__.py).
    # The cluster token signs the kv_transfer_params the conductor writes; connectors that share
    # it refuse parameters it did not sign. None: written unsigned.
    # repr=False: a logged or printed config never shows a secret.
    cluster_token: str | None = field(default=None, repr=False)
    # Bearer token for /instances and /admission. None: served to loopback clients only.
    admin_token: str | None = field(default=None, repr=False)
    # Key for the conductor's own calls to instances run with vLLM's --api-key (health
    # checks, probes). Client requests carry the client's own Authorization header instead.
    upstream_api_key: str | None = field(default=None, repr=False)
    # Front-door limits. Requests beyond `max_concurrent_requests` are refused at once (503):
    # queueing them here would only hide an overload the SLO admission and clients should see.
    # The upstream connection pool is sized from it (see conductor.py).
    max_concurrent_requests: int = 1024
    # Larger bodies are refused (413) before they are read: any prompt a model takes fits
    # in far less, and each body is held in memory and parsed by this one process.
    max_body_bytes: int = 8 * 1024 * 1024
    # A body must arrive within this: a client that trickles its body would otherwise hold
    # one of the request slots above for as long as it likes.
    body_timeout_s: float = 30.0

    def validate(self) -> ProxyConfig:
        def bad(key: str, why: str) -> ProxyConfigError:
            return ProxyConfigError(f"{key}={getattr(self, key)!r}: {why}")

        if not (self.prefill_urls or self.decode_urls or self.both_urls or self.metadata_server):
            raise ProxyConfigError(
                "no instances: give --metadata-server etcd://HOST:PORT, or --prefill URL and "
                "--decode URL (repeatable), or --both URL"
            )
        if bool(self.prefill_urls) != bool(self.decode_urls):
            raise ProxyConfigError(
                f"--prefill {list(self.prefill_urls)} and --decode {list(self.decode_urls)}: "
                "disaggregated serving needs at least one of each"
            )
        for url in (*self.prefill_urls, *self.decode_urls, *self.both_urls):
            problem = http_url_problem(url, need_port=False)
            if problem:
                raise ProxyConfigError(f"instance URL {url!r}: {problem} (expected "
                                       "http://HOST:PORT)")
        static = {*self.prefill_urls, *self.decode_urls, *self.both_urls}
        for url, endpoint in self.kv_events:
            if url not in static:
                raise ProxyConfigError(f"--kv-events {url}={endpoint}: {url} is not one of "
                                       "the --prefill/--decode/--both URLs")
            problem = endpoint_problem(endpoint)
            if problem:
                raise ProxyConfigError(f"--kv-events {url}={endpoint}: {problem} (expected "
                                       "tcp://HOST:PORT, vLLM's kv-events endpoint)")
        if self.metadata_server and not self.metadata_server.startswith(
            ("etcd://", "etcds://", "http://", "https://")
        ):
            raise bad("metadata_server", "expected etcd://HOST:PORT")
        if self.policy not in POLICIES:
            raise bad("policy", f"expected one of {', '.join(POLICIES)}")
        for key in ("slo_ttft_s", "slo_itl_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise bad(key, "must be a positive number of seconds (or none)")
        for key, zero in (("local_prefill_max_tokens", "never by size"),
                          ("pipeline_prefill_min_tokens", "no pipelined prefill"),
                          ("prefill_window_tokens", "no window"),
                          ("pipeline_attention_tokens", "split tokens evenly")):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise bad(key, f"must be >= 0 (0: {zero}; auto: derived)")
        for key in ("local_prefill_max_tokens", "pipeline_prefill_min_tokens",
                    "prefill_window_tokens"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(key, "must be a whole number of tokens (or auto)")
        if self.warmup_tokens < 0:
            raise bad("warmup_tokens", "must be >= 0 (0: no warm-up)")
        if not 0 < self.pipeline_prefill_share < 1:
            raise bad("pipeline_prefill_share", "must be between 0 and 1 (the prefill "
                      "instance's share of the prompt)")
        for key in ("block_tokens", "chars_per_block", "prefix_capacity_blocks", "max_attempts",
                    "max_concurrent_requests", "max_body_bytes"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("health_interval_s", "health_timeout_s", "connect_timeout_s",
                    "probe_timeout_s", "prefill_timeout_s", "first_token_timeout_s",
                    "body_timeout_s",
                    "idle_timeout_s", "prior_overhead_s", "prior_tokens_per_s",
                    "prior_handoff_s", "tokenize_timeout_s", "prefill_window_target_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be positive")
        for key in ("cluster_token", "admin_token"):  # named, never shown
            value = getattr(self, key)
            if value is not None and len(value) < MIN_TOKEN_CHARS:
                raise ProxyConfigError(f"{key}: too short (at least {MIN_TOKEN_CHARS} "
                                       "characters; use e.g. `openssl rand -hex 32`)")
        if not 0 <= self.port <= 65535:
            raise bad("port", "a TCP port is 0..65535")
        return self
