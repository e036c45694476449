"""The server's Prometheus metrics, in a registry of its own (several servers may share a process in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from blockrag.integrations import Completion
from blockrag.integrations.gate import GateResult

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
KL_BUCKETS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)

CLIENT_CLOSED = "499"
"""The status recorded for a streamed request whose client went away (nginx's convention)."""


class ServerMetrics:
    """Requests by endpoint and status, TTFT and latency, prompt tokens by source, and the gate's findings."""

    def __init__(self, waiting: Callable[[], int], active: Callable[[], int], passages: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("blockrag_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("blockrag_time_to_first_token_seconds",
                              "From the request's arrival to its first generated text, queueing included.",
                              ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("blockrag_request_duration_seconds", "From arrival to the answer's last token.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("blockrag_prompt_tokens",
                                     "Prompt tokens answered: served from stored blocks, or prefilled.",
                                     ["source"], registry=r)
        self.completion_tokens = Counter("blockrag_completion_tokens", "Tokens generated.", registry=r)
        self.stopped = Counter("blockrag_stopped_generations",
                               "Generations stopped early because their client went away.", registry=r)
        self.gate_checks = Counter("blockrag_gate_checks",
                                   "Correctness-gate checks: whether block mode's first token agreed with full "
                                   "attention's.", ["first_token"], registry=r)
        self.gate_kl = Histogram("blockrag_gate_kl_divergence_nats",
                                 "KL(full || block) of the first token's distribution, per gate check.",
                                 buckets=KL_BUCKETS, registry=r)
        self.gate_skipped = Counter("blockrag_gate_skipped",
                                    "Gate checks dropped because the gate's backlog was full.", registry=r)
        Gauge("blockrag_queue_waiting", "Requests waiting for the engine.", registry=r).set_function(waiting)
        Gauge("blockrag_generations_active", "Generations the engine is interleaving.",
              registry=r).set_function(active)
        Gauge("blockrag_known_passages", "Passages the server finds in prompts.", registry=r).set_function(passages)

    def answered(self, endpoint: str, done: Completion, duration_s: float) -> None:
        self.requests.labels(endpoint, "200").inc()
        self.prompt_tokens.labels("blocks").inc(done.usage.cached_tokens)
        self.prompt_tokens.labels("prefilled").inc(done.usage.prompt_tokens - done.usage.cached_tokens)
        self.completion_tokens.inc(done.usage.completion_tokens)
        self.latency.labels(endpoint).observe(duration_s)

    def gate(self, result: GateResult) -> None:
        self.gate_checks.labels("agree" if result.agree else "disagree").inc()
        self.gate_kl.observe(result.kl)

    def export(self) -> bytes:
        return generate_latest(self.registry)
