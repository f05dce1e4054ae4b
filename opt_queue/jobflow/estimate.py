"""``opt-queue estimate`` (and ``run --dry-run``): what a run will send, cost and take, before it
starts and without calling the API.

For the rows a run would send (the input's rows that the output lacks or holds as null), it counts
the prompt tokens (``tokens``: the model's tokenizer, exact, for OpenAI's model families; else the
typical character estimate: about 4 ASCII characters a token, one per other character), the
output tokens (each request's cap: ``max_tokens`` and the like, or the endpoint's default; or the
average the user states with ``--output-tokens``), prices them per model (``prices``) and gives
the cost as a range: the prompts alone, every prompt block the provider may cache at its cached
price, at least, and every answer at its cap, at most. Rows whose prompt and cap exceed the
model's context window (``tokens.CONTEXT_WINDOWS``, or the config's ``context_window``) are
listed: the API would refuse them. The ETA comes from the keys' configured limits, per model,
naming the limit that binds (requests or tokens per minute, requests per day) and what more keys
would do.

Costs are linear in tokens, so rows are summed per model, endpoint and tier and priced once: a
row costs one tokenization.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opt_queue import providers
from opt_queue.core.config import Config
from opt_queue.jobflow.dataset import MAX_PROBLEMS_SHOWN, final_failures, iter_input, read_output
from opt_queue.core.errors import InputError
from opt_queue.core.prices import Prices, money
from opt_queue.core.request import FLEX_URLS, failure_key, paid_once, request_body, request_hash
from opt_queue.core.tokens import context_window, estimate_parts, estimator


@dataclass
class ModelEstimate:
    """One model's share of the rows to send."""

    rows: int = 0
    prompt_tokens: int = 0
    cap_tokens: int = 0
    assumed_tokens: int = 0
    cost_low: float | None = 0.0
    cost_expected: float | None = 0.0
    cost_high: float | None = 0.0
    sync_low: float | None = 0.0
    sync_high: float | None = 0.0
    flex_low: float | None = 0.0
    flex_high: float | None = 0.0
    """The same rows in the Flex lane (``service_tier: "flex"`` where the endpoint takes it)."""
    batch_low: float | None = 0.0
    batch_high: float | None = 0.0
    """The same rows in the batch lane (the provider's Batch API, half price)."""
    eta_s: float | None = None
    binding: str | None = None
    keys: int = 0
    limits_known: bool = False
    estimator: str = ""
    """How its prompts are counted (its tokenizer, exact, or an estimate)."""
    context_window: int | None = None
    too_long: int = 0
    """Rows whose prompt and completion cap exceed the context window: the API refuses them (400)."""
    too_long_rows: list[dict[str, Any]] = field(default_factory=list)
    limits_source: str = ""
    """Where the ETA's limits came from: configured, learned by the fleet, probe."""
    token_factor: float | None = None
    """How the servers count a prompt, as a share of opt-queue's count (learned by the fleet)."""
    probe_cost: float | None = None
    """What ``--probe``'s calls cost."""
    probe_errors: list[str] = field(default_factory=list)


@dataclass
class Estimate:
    """What ``estimate`` prints (``--json`` gives it as is)."""

    rows_in_input: int = 0
    rows_to_send: int = 0
    already_answered: int = 0
    nulls_to_retry: int = 0
    failed_kept: int = 0
    """Nulls not sent again: the same request would fail the same way (``--retry-failed``)."""
    repeats_paid_once: int = 0
    """Rows whose request repeats another row's and that will get its answer unpaid."""
    repeats_sent: int = 0
    """Rows whose request repeats another row's and that are sent all the same (they sample)."""
    estimator: str = ""
    output_assumption: str = ""
    lane: str = "sync"
    models: dict[str, ModelEstimate] = field(default_factory=dict)

    def total(self, name: str) -> Any:
        values = [getattr(m, name) for m in self.models.values()]
        if any(v is None for v in values):
            return None
        return sum(values)

    @property
    def eta_s(self) -> float | None:
        """Models are paced by separate limits, so they run side by side: the slowest sets the ETA."""
        etas = [m.eta_s for m in self.models.values() if m.rows]
        return None if not etas or any(e is None for e in etas) else max(etas)  # type: ignore[type-var]

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in_input": self.rows_in_input, "rows_to_send": self.rows_to_send,
                "already_answered": self.already_answered, "nulls_to_retry": self.nulls_to_retry,
                "failed_kept": self.failed_kept, "repeats_paid_once": self.repeats_paid_once, "repeats_sent": self.repeats_sent,
                "estimator": self.estimator, "output_assumption": self.output_assumption, "lane": self.lane,
                "prompt_tokens": self.total("prompt_tokens"), "output_tokens_cap": self.total("cap_tokens"),
                "output_tokens_assumed": self.total("assumed_tokens"),
                "cost_low": self.total("cost_low"), "cost_expected": self.total("cost_expected"),
                "cost_high": self.total("cost_high"), "sync_cost_low": self.total("sync_low"),
                "sync_cost_high": self.total("sync_high"), "flex_cost_low": self.total("flex_low"),
                "flex_cost_high": self.total("flex_high"), "batch_cost_low": self.total("batch_low"),
                "batch_cost_high": self.total("batch_high"), "eta_s": self.eta_s,
                "models": {name: vars(m) for name, m in self.models.items()}}


def _rates(config: Config, model: str,
           known: dict[str, Any] | None = None) -> tuple[int, dict[str, float], str, float | None]:
    """Keys serving ``model`` and their summed rates per second by limit name (a group counts
    once: its keys share it); a dimension missing from any bucket is not known. A bucket's limit
    the config does not give comes from ``known`` (``probe.Limits`` per bucket: learned by the
    fleet, or probed), per header period. Also where the limits came from, and the mean of the
    buckets' token factors (how the server counts a prompt; None: not known)."""
    buckets: dict[str, dict[str, float]] = {}
    sources: set[str] = set()
    factors: list[float] = []
    for key in config.keys():
        if not key.serves(model) or key.bucket in buckets:
            continue
        limits = key.limits_for(model)
        rates: dict[str, float] = {}
        for dim, windows in (("requests", limits.requests), ("tokens", limits.tokens)):
            for w in windows:
                name = _limit_name(dim, w.period)
                rates[name] = min(rates.get(name, float("inf")), w.limit / w.period)
            if windows:
                sources.add("configured")
        said = (known or {}).get(key.bucket)
        if said is not None:
            for dim in ("requests", "tokens"):
                value = getattr(said, dim)
                if value and not getattr(limits, dim):
                    rates[_limit_name(dim, config.header_period)] = value / config.header_period
                    sources.add(said.source)
            if said.token_factor:
                factors.append(said.token_factor)
        buckets[key.bucket] = rates
    names = set().union(*buckets.values()) if buckets else set()
    summed = {n: sum(b[n] for b in buckets.values()) for n in names if all(n in b for b in buckets.values())}
    factor = sum(factors) / len(factors) if factors else None
    return len(buckets), summed, " and ".join(sorted(sources)), factor


def sync_seconds(config: Config, model: str, rows: int, tokens: int) -> float | None:
    """How long ``rows`` requests of ``tokens`` in all take at the configured limits of the keys
    serving ``model`` (the binding limit's time); None when no key says its limits."""
    m = ModelEstimate(rows=rows, prompt_tokens=tokens)
    _eta(m, *_rates(config, model)[:2])
    return m.eta_s


def _limit_name(dim: str, period: float) -> str:
    unit = {60.0: "min", 86400.0: "day", 1.0: "s", 3600.0: "h"}.get(period, f"{period:g}s")
    return ("RP" if dim == "requests" else "TP") + ({"min": "M", "day": "D", "s": "S", "h": "H"}.get(unit, f"/{unit}"))


def _eta(m: ModelEstimate, keys: int, rates: dict[str, float], factor: float | None = None) -> None:
    m.keys = keys
    prompt = m.prompt_tokens * factor if factor else m.prompt_tokens  # as the server counts them
    need = {"R": m.rows, "T": prompt + m.cap_tokens}
    times = {name: need[name[0]] / rate for name, rate in rates.items() if rate > 0}
    m.limits_known = bool(times)
    if times:
        m.binding, m.eta_s = max(times.items(), key=lambda item: item[1])


CACHE_MIN_TOKENS = 1024
"""OpenAI caches a prompt's prefix from this length, in blocks of 128 tokens."""
TOO_LONG_SHOWN = 20
"""Rows too long for their model's context that ``estimate`` names (``--json``: up to 1,000)."""


@dataclass
class _Group:
    """Rows of one model, endpoint and tier of their own: priced together at the end (costs are
    linear in tokens), so that a row costs a tokenization, not nine price look-ups."""

    prompt: int = 0
    cap: int = 0
    assumed: int = 0
    cacheable: int = 0
    """Prompt tokens the provider may bill at its cached price: of every prompt of
    :data:`CACHE_MIN_TOKENS` or more, its 128-token blocks (a shared prefix is cached)."""


def estimate(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], config: Config,
             output_tokens: int | None = None, known: Callable[[str], dict[str, Any]] | None = None) -> Estimate:
    """Estimate a run of ``input_path`` into ``output_path`` (resume counted) without calling the
    API. ``known(model)`` gives the limits the server stated for the buckets serving a model
    (``probe.learned`` or ``probe.probe``), for the ones the config does not give."""
    state = read_output(output_path, offsets=False)
    prices = Prices({name: p.model_dump() for name, p in config.prices.items()})
    est = Estimate(estimator=estimator(config.model.name, typical=True), lane=config.lane,
                   output_assumption=(f"{output_tokens} tokens per answer on average (--output-tokens)"
                                      if output_tokens is not None else
                                      "every answer at its cap (max_tokens, else the endpoint's default); "
                                      "--output-tokens N states an average"))
    groups: dict[tuple[str, str, str | None], _Group] = {}
    windows: dict[str, int | None] = {}
    seen: set[bytes] = set()
    keep = {} if config.retry_failed else final_failures(output_path, state.nulls)
    name, params, lane = config.model.name, config.model.params, config.lane
    keys, serving_of = config.keys(), dict[str, frozenset[str]]()
    for row in _rows(input_path, state, est):
        failed = keep.get(row.index) if keep else None
        if failed is not None and failed.request in (None, failure_key(row.url, request_body(
                row.url, row.body, name, params, lane), config.model.fallback)):
            est.failed_kept += 1  # a null that the same request would meet again: not sent
            est.nulls_to_retry -= 1
            est.rows_to_send -= 1
            continue
        sync = request_body(row.url, row.body, name, params)
        body = {**sync, "service_tier": "batch"} if lane == "batch" else (
            request_body(row.url, row.body, name, params, lane) if lane == "flex" else sync)
        digest = bytes.fromhex(request_hash(row.url, body)[:16])
        if digest in seen:
            if paid_once(config.dedupe, row.url, body):
                est.repeats_paid_once += 1
                continue  # it gets the answer of the row it repeats: nothing to pay
            est.repeats_sent += 1
        seen.add(digest)
        model = body.get("model") or name
        needs = serving_of.get(model)
        if needs is None:
            needs = serving_of[model] = providers.serving(keys, model)
        body = providers.with_required_cap(needs, body)  # Anthropic's required max_tokens, as sent
        prompt, cap = estimate_parts(body, row.url, typical=True)
        assumed = cap if output_tokens is None or not cap else min(cap, output_tokens * int(body.get("n") or 1))
        m = est.models.get(model)
        if m is None:
            m = est.models[model] = ModelEstimate(estimator=estimator(model, typical=True))
            windows[model] = context_window(model, config.context_window)
        m.rows += 1
        m.prompt_tokens += prompt
        m.cap_tokens += cap
        m.assumed_tokens += assumed
        window = windows[model]
        if window is not None and prompt + cap > window:
            m.too_long += 1
            if len(m.too_long_rows) < 1000:
                m.too_long_rows.append({"index": row.index, "prompt_tokens": prompt, "cap": cap})
        group = groups.get((model, row.url, sync.get("service_tier")))
        if group is None:
            group = groups[(model, row.url, sync.get("service_tier"))] = _Group()
        group.prompt += prompt
        group.cap += cap
        group.assumed += assumed
        if prompt >= CACHE_MIN_TOKENS:
            group.cacheable += prompt // 128 * 128
    counted = {m.estimator for m in est.models.values()}
    if len(counted) == 1:
        est.estimator = counted.pop()  # the models' own; else each model says it (describe)
    _price(est, groups, prices)
    for model, m in est.models.items():
        m.context_window = windows[model]
        said = known(model) if known is not None else None
        keys, rates, m.limits_source, m.token_factor = _rates(config, model, said)
        _eta(m, keys, rates, m.token_factor)
        m.probe_cost = _probe_cost(said)
        m.probe_errors = sorted({s.error for s in (said or {}).values() if s.error})
    return est


def _probe_cost(said: dict[str, Any] | None) -> float | None:
    costs = [s.cost for s in (said or {}).values() if s.source == "probe"]
    return sum(c for c in costs if c is not None) if costs else None


def _price(est: Estimate, groups: dict[tuple[str, str, str | None], _Group], prices: Prices) -> None:
    """Each model's costs: its groups' tokens at its price, in each lane (the tier a row names
    is kept; Flex where the endpoint takes it; the Batch API at its discount)."""
    lane = est.lane
    for (model, url, tier), g in groups.items():
        m = est.models[model]
        flex_tier = tier or ("flex" if url in FLEX_URLS else None)
        tiers = {"sync": tier, "flex": flex_tier, "batch": "batch"}
        costs: dict[str, float | None] = {}
        for label, completion, which in (("cost_low", 0, lane), ("cost_expected", g.assumed, lane),
                                         ("cost_high", g.cap, lane), ("sync_low", 0, "sync"),
                                         ("sync_high", g.cap, "sync"), ("flex_low", 0, "flex"),
                                         ("flex_high", g.cap, "flex"), ("batch_low", 0, "batch"),
                                         ("batch_high", g.cap, "batch")):
            cached = g.cacheable if label.endswith("_low") else 0  # a minimum: every cacheable block hits
            costs[label] = prices.cost(model, url, {"service_tier": tiers[which]}, g.prompt, completion, cached)
        for label, cost in costs.items():
            setattr(m, label, None if cost is None or getattr(m, label) is None else getattr(m, label) + cost)


def _rows(input_path: str | os.PathLike[str], state: Any, est: Estimate) -> Iterator[Any]:
    """The rows to send; the input is checked in the same pass (a bad line is reported as by
    ``submit``, after the pass: one reading of a large file, not two)."""
    bad: list[tuple[int, str]] = []
    answered, nulls = state.answered or None, state.nulls or None  # a first run has neither
    for row in iter_input(input_path, skip_bad=True, bad=bad):
        est.rows_in_input += 1
        if answered is not None and row.index in answered:
            est.already_answered += 1
            continue
        est.nulls_to_retry += nulls is not None and row.index in nulls
        est.rows_to_send += 1
        yield row
    if bad:
        raise InputError(str(input_path), bad[:MAX_PROBLEMS_SHOWN], total=len(bad))
    if not est.rows_in_input:
        raise InputError(str(input_path), [(0, "the file holds no rows")])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _repeats(est: Estimate) -> list[str]:
    lines = []
    if est.repeats_paid_once:
        lines.append(f"repeated requests: {est.repeats_paid_once} rows repeat another row's request and get "
                     f"its answer, unpaid (they do not sample; \"dedupe\": false sends each)")
    if est.repeats_sent:
        lines.append(f"repeated requests: {est.repeats_sent} rows repeat another row's request and are each "
                     f"sent (they sample: temperature unset or above 0, or n > 1; \"dedupe\": true pays "
                     f"them once)")
    return lines


def describe(est: Estimate) -> list[str]:
    """The lines ``estimate`` prints."""
    kept = (f"; nulls kept, as the same request would fail again: {est.failed_kept} (--retry-failed sends "
            f"them)" if est.failed_kept else "")
    lines = [f"rows to send: {est.rows_to_send} of {est.rows_in_input} (already answered: "
             f"{est.already_answered}; nulls to retry: {est.nulls_to_retry}{kept})",
             *_repeats(est),
             f"token estimate: {est.estimator}",
             f"output tokens: {est.output_assumption}"]
    for model, m in sorted(est.models.items()):
        cost = (f"cost {money(m.cost_low)} (prompts alone) to {money(m.cost_high)} (every answer at its cap)"
                if m.cost_high is not None else f"cost unknown for model {model}: give its price in \"prices\"")
        if m.cost_expected is not None and m.cost_expected not in (m.cost_low, m.cost_high):
            cost += f", about {money(m.cost_expected)} as assumed"
        lines.append(f"{model}: {m.rows} rows, {m.prompt_tokens} prompt tokens + up to {m.cap_tokens} output "
                     f"tokens ({m.assumed_tokens} assumed); {cost}")
        if m.estimator != est.estimator:
            lines.append(f"  its prompts: {m.estimator}")
        if m.too_long:
            shown = ", ".join(r["index"] for r in m.too_long_rows[:TOO_LONG_SHOWN])
            more = f" and {m.too_long - TOO_LONG_SHOWN} more" if m.too_long > TOO_LONG_SHOWN else ""
            lines.append(f"  {m.too_long} rows do not fit {model}'s context window of {m.context_window} tokens "
                         f"(prompt + max_tokens): {shown}{more}; the API refuses them (null, "
                         f"context_length_exceeded): shorten them or lower max_tokens (--json lists them)")
        if not m.keys:
            lines.append(f"  no configured key serves {model}")
        elif not m.limits_known:
            lines.append(f"  ETA unknown: the {m.keys} key(s) serving {model} have no configured limits and the "
                         f"fleet has not learned them yet (the API's headers give them once a job runs); "
                         f"--probe asks the API (one call of max_tokens 1 per key), or give rpm/tpm")
        else:
            more = (f"one more key like these: {_duration(m.eta_s * m.keys / (m.keys + 1))}; twice the keys: "
                    f"{_duration(m.eta_s / 2)}") if m.eta_s else ""
            what = "synchronous ETA (the batch lane's is the provider's)" if est.lane == "batch" else "ETA"
            lines.append(f"  {what} {_duration(m.eta_s or 0)} on {m.keys} key(s), bound by {m.binding} "
                         f"({m.limits_source or 'configured'}); {more}")
        if m.token_factor:
            lines.append(f"  the server counts prompts x{m.token_factor:.2f} of this count (learned by the fleet); "
                         f"the ETA uses its count")
        if m.probe_cost is not None:
            lines.append(f"  --probe: {m.keys} call(s) of max_tokens 1 cost {money(m.probe_cost)}")
        for error in m.probe_errors:
            lines.append(f"  --probe: a key told no limits: {error}")
    high, low = est.total("cost_high"), est.total("cost_low")
    if len(est.models) > 1:
        lines.append(f"total: {money(low)} to {money(high)}" + (f", ETA {_duration(est.eta_s)}"
                                                              if est.eta_s is not None else ""))
    if high is not None:
        eta = f"ETA {_duration(est.eta_s)}" if est.eta_s is not None else "ETA as above"
        lines.append(f"lanes side by side (this run: {est.lane}):")
        lines.append(f"  sync   {money(est.total('sync_low'))} to {money(est.total('sync_high'))}, {eta}")
        lines.append(f"  flex   {money(est.total('flex_low'))} to {money(est.total('flex_high'))}, the same "
                     f"limits with slower answers; a row Flex cannot take now goes at the standard tier")
        lines.append(f"  batch  {money(est.total('batch_low'))} to {money(est.total('batch_high'))}, within the "
                     f"provider's 24 h window (often much sooner), its own rate-limit pool; --deadline "
                     f"sends what is not back in time synchronously")
    return lines
