"""Prometheus metrics for fleet users: spend and quota (Flower stays the task dashboard).

``opt-queue worker --metrics-port N`` serves what its process did: rows by outcome, API calls by
status, 429s, tokens and cost by key fingerprint and model, limiter waits. ``opt-queue collect
--metrics-port N`` serves the job's view, read from Redis: rows by state, spend, projected cost,
budget left, and each key's tokens and cost for the whole fleet. Keys appear as fingerprints only.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

ROWS = Counter("optq_rows", "Rows a worker finished, by outcome (answered, null, released, handed_back, "
               "duplicate, dropped)", ["outcome"], registry=REGISTRY)
CALLS = Counter("optq_api_calls", "API calls by HTTP status (or error code when no status came back)",
                ["key", "model", "status"], registry=REGISTRY)
RATE_LIMITED = Counter("optq_rate_limited", "429 rate-limit answers", ["key", "model"], registry=REGISTRY)
TOKENS = Counter("optq_tokens", "Tokens of paid calls, by kind (input, cached, output, reasoning)",
                 ["key", "model", "kind"], registry=REGISTRY)
COST = Counter("optq_cost_dollars", "Dollars of paid calls (models with a known price)", ["key", "model"],
               registry=REGISTRY)
WAITS = Counter("optq_limiter_waits", "Admissions that waited for a rate-limit slot", ["model"], registry=REGISTRY)
WAIT_SECONDS = Counter("optq_limiter_wait_seconds", "Seconds rows waited for rate-limit slots", ["model"],
                       registry=REGISTRY)

JOB_ROWS = Gauge("optq_job_rows", "Rows of a job by state (answered, null, remaining)", ["job", "state"],
                 registry=REGISTRY)
KEY_INFO = Gauge("optq_key_info", "Always 1: the provider each key speaks (join on key)", ["key", "provider"],
                 registry=REGISTRY)
JOB_PROJECTED = Gauge("optq_job_projected_cost_dollars", "A job's projected total cost", ["job"], registry=REGISTRY)
JOB_BUDGET_LEFT = Gauge("optq_job_budget_left_dollars", "max_cost minus what the job spent", ["job"],
                        registry=REGISTRY)


class _Totals:
    """Counts that only grow, kept in Redis for the whole fleet and read by the collector: exported
    as counters (``*_total``), set to the value last read (Prometheus' ``rate()`` works on them)."""

    SERIES = {"optq_job_cost_dollars": ("What a job's calls cost so far", ["job"]),
              "optq_key_cost_dollars": ("What a key's calls cost, whole fleet", ["key"]),
              "optq_key_tokens": ("A key's tokens, whole fleet, by kind", ["key", "kind"]),
              "optq_key_rate_limited": ("429s a key met, whole fleet", ["key"])}

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in self.SERIES}

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.values[name][labels] = value

    def collect(self) -> Any:
        for name, (doc, labels) in self.SERIES.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for values, value in self.values[name].items():
                family.add_metric(list(values), value)
            yield family

    def describe(self) -> Any:
        return []


TOTALS = _Totals()
REGISTRY.register(TOTALS)

TOKEN_KINDS = ("input", "cached", "output", "reasoning")


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)


def observe_call(key: str, model: str, status: str, usage: Any = None) -> None:
    """One API call: its status, and what it used and cost (a :class:`prices.Usage`)."""
    CALLS.labels(key, model, status).inc()
    if status == "429":
        RATE_LIMITED.labels(key, model).inc()
    if usage is not None:
        for kind in TOKEN_KINDS:
            value = getattr(usage, f"{kind}_tokens")
            if value:
                TOKENS.labels(key, model, kind).inc(value)
        if usage.cost:
            COST.labels(key, model).inc(usage.cost)


def observe_job(job: str, answered: int, nulls: int, remaining: int, spend: dict[str, Any],
                keys: list[dict[str, Any]]) -> None:
    """The collector's view of its job and of the keys (read from Redis)."""
    for state, value in (("answered", answered), ("null", nulls), ("remaining", remaining)):
        JOB_ROWS.labels(job, state).set(value)
    TOTALS.set("optq_job_cost_dollars", (job,), spend["cost"])
    if spend["projected_cost"] is not None:
        JOB_PROJECTED.labels(job).set(spend["projected_cost"])
    if spend["max_cost"]:
        JOB_BUDGET_LEFT.labels(job).set(max(0.0, spend["max_cost"] - spend["cost"]))
    for k in keys:
        KEY_INFO.labels(k["key"], k.get("provider", "openai")).set(1)
        TOTALS.set("optq_key_cost_dollars", (k["key"],), k["spend"]["cost"])
        TOTALS.set("optq_key_rate_limited", (k["key"],), k["rate_limited"])
        for kind in TOKEN_KINDS:
            TOTALS.set("optq_key_tokens", (k["key"], kind), k["spend"][f"{kind}_tokens"])
