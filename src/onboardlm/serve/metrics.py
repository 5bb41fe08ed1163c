"""Prometheus metrics of one server: engine gauges read at scrape time, request latency histograms."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onboardlm.runtime.serving import ServingEngine

#: Seconds; TTFT spans queueing and prefill, TPOT one decode step of a batch.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        gauges = {
            "onboardlm_queue_length": ("Requests waiting to be admitted", stats.waiting),
            "onboardlm_running_requests": ("Requests in the running batch", stats.running),
            "onboardlm_kv_blocks_used": ("KV cache blocks held by requests", stats.blocks_used),
            "onboardlm_kv_blocks_total": ("KV cache blocks in the cache", stats.blocks_total),
            "onboardlm_generation_tokens_per_second": (
                "Output tokens per second over the last 10 s",
                self.engine.tokens_per_second(),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "onboardlm_prompt_tokens", "Prompt tokens computed", value=stats.prompt_tokens
        )
        yield CounterMetricFamily(
            "onboardlm_generation_tokens", "Output tokens generated", value=stats.generated_tokens
        )
        yield CounterMetricFamily("onboardlm_engine_steps", "Model steps run", value=stats.steps)


class ServeMetrics:
    """The metrics of one server, in their own registry (several servers may share a process)."""

    def __init__(self, engine: ServingEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            "onboardlm_time_to_first_token_seconds", "Request arrival to first output token",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "onboardlm_time_per_output_token_seconds", "Mean time between output tokens of a request",
            buckets=TPOT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "onboardlm_requests", "Requests answered, by outcome", ["outcome"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
