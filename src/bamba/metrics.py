"""The server's Prometheus metrics (prometheus-client), on a registry of their own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """What `/metrics` shows: requests, tokens, load, prefix-cache use and latencies."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bamba_requests", "Requests finished, by status", ["status"], registry=r)
        self.prompt_tokens = Counter("bamba_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefill_tokens = Counter(
            "bamba_prefill_tokens",
            "Prompt tokens run through the model (prefix-cache hits excluded)",
            registry=r,
        )
        self.generation_tokens = Counter("bamba_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("bamba_requests_running", "Rows in the running batch", registry=r)
        self.waiting = Gauge("bamba_requests_waiting", "Requests waiting for a slot", registry=r)
        self.cache_hits = Counter(
            "bamba_prefix_cache_hits", "Prompts that restored a cached prefix", registry=r
        )
        self.cache_misses = Counter("bamba_prefix_cache_misses", "Prompts with no cached prefix", registry=r)
        self.cached_tokens = Counter(
            "bamba_prefix_cache_tokens", "Prompt tokens restored from the cache", registry=r
        )
        self.cache_bytes = Gauge(
            "bamba_prefix_cache_bytes", "Bytes held by prefix-state snapshots", registry=r
        )
        self.ttft = Histogram(
            "bamba_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "bamba_time_per_output_token_seconds",
            "Time between tokens of a row",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    # called by the engine's thread
    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prefix_lookup(self, hit: bool, cached_tokens: int) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()
        self.cached_tokens.inc(cached_tokens)

    def prefilled(self, n: int) -> None:
        self.prefill_tokens.inc(n)

    def set_cache_bytes(self, n: int) -> None:
        self.cache_bytes.set(n)

    def token_out(self, seconds: float, first: bool) -> None:
        self.generation_tokens.inc()
        if not first:
            self.token_latency.observe(seconds)

    def request_failed(self) -> None:
        self.requests.labels(status="error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
