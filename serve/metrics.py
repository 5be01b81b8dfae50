"""Prometheus metrics, `observe_r1_` prefix, base units. One registry per app, so several apps (tests)
can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from observe_r1_serve.engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "observe_r1_requests", "Chat-completion requests by HTTP status.", ["status"], registry=r
        )
        self.ttft = Histogram(
            "observe_r1_time_to_first_token_seconds",
            "Time from request arrival to the first generated text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "observe_r1_e2e_request_latency_seconds",
            "Time from request arrival to the last generated text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("observe_r1_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter(
            "observe_r1_completion_tokens", "Completion tokens generated.", registry=r
        )
        self.running = Gauge("observe_r1_num_requests_running", "Requests being generated.", registry=r)
        self.waiting = Gauge(
            "observe_r1_num_requests_waiting", "Requests queued for generation (for autoscaling).", registry=r
        )
        self.choices = Counter(
            "observe_r1_choices", "Completed choices whose format was checked.", registry=r
        )
        self.format_followed = Counter(
            "observe_r1_format_followed", "Completed choices that followed the output format.", registry=r
        )
        self.format_ratio = Gauge(
            "observe_r1_format_followed_ratio",
            "Share of completed choices that followed the format.",
            registry=r,
        )

        self._n_choices = 0
        self._n_followed = 0

    def record_choice(self, format_ok: bool) -> None:
        self._n_choices += 1
        self._n_followed += format_ok
        self.choices.inc()
        if format_ok:
            self.format_followed.inc()
        self.format_ratio.set(self._n_followed / self._n_choices)

    def render(self, stats: EngineStats | None) -> bytes:
        if stats is not None:
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
        return generate_latest(self.registry)
