"""Prometheus metrics of the conductor, in a registry of its own (several proxies can live in one
process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
ERROR_BUCKETS = (-10.0, -2.0, -1.0, -0.5, -0.1, -0.02, 0.0, 0.02, 0.1, 0.5, 1.0, 2.0, 10.0)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "mooncake_proxy_"
        self.requests = Counter(p + "requests", "Client requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.rejections = Counter(p + "rejections", "Requests refused early, by reason "
                                  "(slo, no_instance, concurrency, body_too_large, body_timeout)",
                                  ["reason"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "Generation requests being served "
                               "(limited by --max-concurrent-requests)", registry=r)
        self.client_params_dropped = Counter(
            p + "client_transfer_params_dropped", "Requests whose client-sent "
            "kv_transfer_params were removed (only the conductor writes them)", registry=r)
        self.routing = Counter(p + "routing_decisions",
                               "Instances chosen, by policy and role",
                               ["policy", "role", "instance"], registry=r)
        self.pipelined = Counter(p + "pipelined_prefills",
                                 "Requests prefilled by P and D in a pipeline", registry=r)
        self.ttft = Histogram(p + "ttft_seconds", "Time to first streamed byte seen by clients",
                              buckets=TTFT_BUCKETS, registry=r)
        self.predicted_ttft = Histogram(p + "predicted_ttft_seconds",
                                        "TTFT predicted at admission (admitted and rejected)",
                                        buckets=TTFT_BUCKETS, registry=r)
        self.prediction_error = Histogram(
            p + "ttft_prediction_error_seconds",
            "Observed minus predicted TTFT of admitted requests", buckets=ERROR_BUCKETS,
            registry=r)
        self.slo = Counter(p + "slo_outcomes", "Admitted requests that met or missed the TTFT "
                           "SLO", ["met"], registry=r)
        self.slo_unattainable = Counter(
            p + "slo_unattainable", "Admitted requests predicted to miss an SLO (ttft, itl) "
            "that they would miss on idle instances too, so that refusing them helps no one",
            ["slo"], registry=r)
        self.unproven_misses = Counter(
            p + "unproven_misses", "Admitted requests that load predicted to miss an SLO (ttft, "
            "itl) while the recent admitted requests met it (see admission.py)", ["slo"],
            registry=r)
        self.paths = Counter(p + "path_decisions", "Requests by the path planned for them "
                             "(disaggregated, local, pipelined, alone, rejected)", ["path"],
                             registry=r)
        self.path_share = Gauge(p + "path_share", "Share of the requests of the last 5 minutes "
                                "by how they ended: the path that served them, or rejected, "
                                "failed, unavailable (path_shares.py)", ["path"], registry=r)
        self.predicted_itl = Histogram(p + "predicted_itl_seconds", "Inter-token latency "
                                       "predicted at admission on the decode instance",
                                       buckets=ITL_BUCKETS, registry=r)
        self.itl = Histogram(p + "itl_seconds", "Mean gap between streamed token events, per "
                             "request", buckets=ITL_BUCKETS, registry=r)
        self.itl_prediction_error = Histogram(
            p + "itl_prediction_error_seconds", "Observed minus predicted ITL of admitted "
            "streamed requests", buckets=ERROR_BUCKETS, registry=r)
        self.itl_slo = Counter(p + "itl_slo_outcomes", "Admitted streamed requests that met "
                               "or missed the ITL SLO", ["met"], registry=r)
        self.tokenize = Counter(p + "tokenize_calls", "Text prompts tokenized by an instance's "
                                "/tokenize for a pipelined prefill, by outcome (failed: served "
                                "on the text path)", ["outcome"], registry=r)
        self.warmups = Counter(p + "warmups", "Instances warmed up, by outcome", ["outcome"],
                               registry=r)
        self.upstream_errors = Counter(p + "upstream_errors",
                                       "Failed upstream calls, by instance, role and kind",
                                       ["instance", "role", "kind"], registry=r)
        self.failovers = Counter(p + "failovers", "Request retries on another instance",
                                 ["role"], registry=r)
        self.cached_tokens = Counter(p + "predicted_cached_tokens",
                                     "Prompt tokens the chosen prefill instance was believed "
                                     "to hold", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens routed (estimated "
                                     "without a tokenizer)", registry=r)
        self.healthy = Gauge(p + "instance_healthy", "1 when the instance takes traffic",
                             ["instance", "role"], registry=r)
        self.queued = Gauge(p + "queued_prefill_tokens", "Prefill tokens sent and not done",
                            ["instance"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
