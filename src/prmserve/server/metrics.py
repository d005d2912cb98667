"""Prometheus metrics of one app: engine queue and tokens, step batches, request latency, errors."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from prmserve.engine import StepStats
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

    def __init__(self, prm: PRM) -> None:
        self.prm = prm

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


class ServerMetrics:
    """The app's own registry (several apps may live in one process) and the hooks that fill it."""

    def __init__(self, prm: PRM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(prm))
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

    def observe_step(self, stats: StepStats) -> None:
        """Engine-thread hook (`engine.step_observers`): one observation per step."""
        self.step_seqs.observe(stats.num_seqs)
        self.step_tokens.observe(stats.num_tokens)
        self.step_seconds.observe(stats.seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
