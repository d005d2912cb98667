"""Prometheus metrics of one app: prmserve's own (engine queue and tokens, step batches, HTTP latency, errors)
and vLLM's names for the meanings the two share, labelled with the served model name."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from prmserve.engine import EngineStats, StepStats
from prmserve.prm import PRM

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def pending_requests(prm: PRM) -> int:
    """Requests in the engine loop, without starting a loop that is not running (as `prm.loop` would)."""
    return prm.num_pending


class EngineCollector(Collector):
    """Reads the engine's queue and token totals at scrape time, so nothing is counted twice."""

    def __init__(self, prm: PRM, model_name: str) -> None:
        self.prm = prm
        self.model_name = model_name

    def collect(self) -> Iterator:
        stats = self.prm.engine.stats()
        pending = pending_requests(self.prm)
        gauges = {
            "prmserve_requests_pending": ("Requests submitted and not finished (the queue limit applies to it)", pending),
            "prmserve_requests_waiting": ("Requests queued in the scheduler, holding no KV blocks", stats.num_waiting),
            "prmserve_requests_running": ("Requests being computed", stats.num_running),
            "prmserve_kv_blocks_total": ("KV blocks in the pool", stats.kv_blocks_total),
            "prmserve_kv_blocks_in_use": ("KV blocks held by requests or the prefix cache", stats.kv_blocks_in_use),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "prmserve_prompt_tokens": ("Tokens in finished requests' prompts", stats.prompt_tokens),
            "prmserve_computed_tokens": ("Prompt tokens computed by the model", stats.computed_tokens),
            "prmserve_cached_tokens": ("Prompt tokens served from the prefix cache", stats.cached_tokens),
            "prmserve_engine_steps": ("Engine steps run", stats.num_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        yield from self._vllm_names(stats)

    def _vllm_names(self, stats: EngineStats) -> Iterator:
        """vLLM's gauges and token counters; prefix-cache tokens are counted when a request finishes."""
        usage = stats.kv_blocks_in_use / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        gauges = {
            "vllm:num_requests_running": ("Number of requests in model execution batches", stats.num_running),
            "vllm:num_requests_waiting": ("Number of requests waiting to be processed", stats.num_waiting),
            "vllm:kv_cache_usage_perc": ("KV-cache usage: 1 means 100 percent of the blocks are held", usage),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = {
            "vllm:prefix_cache_queries": ("Prefix cache queries, in tokens (prompt tokens of finished requests)", stats.prompt_tokens),
            "vllm:prefix_cache_hits": ("Prefix cache hits, in tokens (prompt tokens read from the cache)", stats.cached_tokens),
            "vllm:prompt_tokens": ("Number of prefill tokens processed (cached ones included)", stats.prompt_tokens),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    """The app's own registry (several apps may live in one process) and the hooks that fill it."""

    def __init__(self, prm: PRM, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(prm, model_name))
        self.step_seqs = Histogram(
            "prmserve_step_sequences", "Sequences per engine step", buckets=_SIZE_BUCKETS, registry=self.registry
        )
        self.step_tokens = Histogram(
            "prmserve_step_tokens", "Tokens per engine step", buckets=_TOKEN_BUCKETS, registry=self.registry
        )
        self.step_seconds = Histogram(
            "prmserve_step_seconds", "Engine step duration", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "prmserve_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.errors = Counter("prmserve_errors", "HTTP error responses", ["route", "status"], registry=self.registry)
        self.e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds (submit to result, per input)",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent waiting in the queue in seconds (submit to first scheduled)",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.successes = Counter(
            "vllm:request_success", "Count of successfully processed requests (one per input)",
            ["model_name", "finished_reason"], registry=self.registry,
        )

    def observe_step(self, stats: StepStats) -> None:
        """Engine-thread hook (`engine.step_observers`): one observation per step."""
        self.step_seqs.observe(stats.num_seqs)
        self.step_tokens.observe(stats.num_tokens)
        self.step_seconds.observe(stats.seconds)

    def observe_finished(self, seconds: float, queue_seconds: float | None) -> None:
        """One engine request (one input) scored, `seconds` after its submission (`queue_seconds` of them
        before it was first scheduled): vLLM's "stop" finish."""
        self.e2e_latency.labels(self.model_name).observe(seconds)
        if queue_seconds is not None:
            self.queue_time.labels(self.model_name).observe(queue_seconds)
        self.successes.labels(self.model_name, "stop").inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
