"""What tokens cost: a model's prices per million tokens, and the cost of one call's usage.

Prices come from the config's ``prices`` (per model: ``{"input", "cached_input", "output"}`` in
dollars per million tokens), else from ``genai-prices``, a maintained price table, for the models it
knows; a model neither knows has no price ("cost unknown for model X"). Costs are counted as the
provider bills them: cached prompt tokens at the cached price, reasoning tokens as output (they are
part of the output tokens the usage reports), the Flex tier (``service_tier: "flex"``) at half price
like the Batch API, and moderations free. Pure: no Redis, no network.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NANO = 1_000_000_000
"""Costs travel in Redis as integer nano-dollars (HINCRBY), so that a fleet adds them exactly."""
DISCOUNTED_TIERS = {"flex": 0.5, "batch": 0.5}
FREE_URLS = frozenset({"/v1/moderations"})


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens: input, output, cache reads and (Anthropic's) cache writes, and
    the higher rates of a long prompt (Gemini's tiers: ``(from prompt tokens, input, output,
    cache reads)``, which apply to the whole call once its prompt exceeds them)."""

    input: float
    output: float
    cached_input: float | None = None
    source: str = "genai-prices"
    cache_write: float | None = None
    tiers: tuple[tuple[int, float, float, float | None], ...] = ()

    def cost(self, prompt: int, completion: int, cached: int = 0, factor: float = 1.0, written: int = 0) -> float:
        """Dollars for ``prompt`` input tokens (``cached`` of them read from the cache at its
        price, ``written`` of them written to it at its price) and ``completion`` output tokens
        (reasoning included), times ``factor`` (a discounted tier)."""
        rate_in, rate_out, rate_cached = self.input, self.output, self.cached_input
        for start, tier_in, tier_out, tier_cached in self.tiers:
            if prompt > start:
                rate_in, rate_out, rate_cached = tier_in, tier_out, tier_cached if tier_cached is not None else rate_cached
        cached = min(max(cached, 0), prompt)
        written = min(max(written, 0), prompt - cached)
        cached_rate = rate_in if rate_cached is None else rate_cached
        write_rate = rate_in if self.cache_write is None else self.cache_write
        dollars = ((prompt - cached - written) * rate_in + cached * cached_rate + written * write_rate
                   + completion * rate_out) / 1e6
        return dollars * factor


def _number(value: Any) -> float | None:
    """A scalar price from genai-prices (tiered prices: their base tier)."""
    if value is None:
        return None
    for candidate in (value, getattr(value, "base", None)):
        try:
            return float(candidate)
        except (TypeError, ValueError):
            continue
    return None


def _tiers(mp: Any) -> tuple[tuple[int, float, float, float | None], ...]:
    """The prompt-size tiers of a genai-prices model price (Gemini's long-prompt rates)."""
    def tiered(value: Any) -> dict[int, float]:
        return {int(t.start): float(t.price) for t in getattr(value, "tiers", None) or []}

    ins, outs, reads = tiered(mp.input_mtok), tiered(mp.output_mtok), tiered(mp.cache_read_mtok)
    return tuple((start, ins[start], outs.get(start, _number(mp.output_mtok) or 0.0), reads.get(start))
                 for start in sorted(ins))


@functools.lru_cache(maxsize=256)
def _table_price(model: str) -> Price | None:
    try:
        import genai_prices
    except ImportError:  # pragma: no cover - a dependency; its absence only loses prices
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for provider in ("openai", None):
            try:
                found = genai_prices.calc_price(genai_prices.Usage(input_tokens=0), model, provider_id=provider)
            except (LookupError, ValueError):
                continue
            mp = found.model_price
            price_in, price_out = _number(mp.input_mtok), _number(mp.output_mtok)
            if price_in is None:
                return None
            return Price(price_in, price_out or 0.0, _number(mp.cache_read_mtok),
                         source=f"genai-prices ({found.provider.id})",
                         cache_write=_number(getattr(mp, "cache_write_mtok", None)), tiers=_tiers(mp))
    return None


class Prices:
    """The prices of a job's models: config overrides first, then the price table."""

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.overrides = {name: (p if isinstance(p, Price) else Price(float(p["input"]), float(p.get("output", 0.0)),
                                                                     None if p.get("cached_input") is None
                                                                     else float(p["cached_input"]), source="config"))
                          for name, p in (overrides or {}).items()}

    def __repr__(self) -> str:
        return f"<Prices overrides={sorted(self.overrides)}>"

    def price(self, model: str) -> Price | None:
        """The model's price, or None when neither the config nor the table knows it."""
        return self.overrides.get(model) or _table_price(model)

    def cost(self, model: str, url: str, body: dict[str, Any], prompt: int, completion: int,
             cached: int = 0, written: int = 0) -> float | None:
        """Dollars one call costs (None: the model's price is unknown)."""
        if url in FREE_URLS:
            return 0.0
        price = self.price(model)
        if price is None:
            return None
        return price.cost(prompt, completion, cached, DISCOUNTED_TIERS.get(str(body.get("service_tier")), 1.0),
                          written)


    def usage(self, model: str, url: str, body: dict[str, Any], reply: Any) -> Usage:
        """What one answered call used and cost, from the usage its response reports (``reply``:
        an ``answers.Reply``); ``body`` names its tier (``service_tier``)."""
        return Usage(reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens, reply.reasoning_tokens,
                     self.cost(model, url, body, reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens,
                               reply.cache_write_tokens))


def nano(dollars: float | None) -> int:
    """Dollars as integer nano-dollars (rounded up: a budget errs on the safe side)."""
    if not dollars:
        return 0
    return int(-(-dollars * NANO // 1))


def dollars(nanos: int | str | None) -> float:
    return int(nanos or 0) / NANO


def money(value: float | None) -> str:
    """``$1,234.56`` (more digits below a dollar); "unknown" for None."""
    if value is None:
        return "unknown"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if abs(value) >= 0.0001 else f"${value:.6f}"


@dataclass(frozen=True)
class Usage:
    """What one paid call used and cost, as the job's and the key's counters add it up."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float | None = 0.0
    """Dollars; None when the model's price is unknown."""

    def counters(self) -> dict[str, int]:
        """Redis hash fields and increments (``spent_tokens`` and ``spent_nano`` are what the
        job's ``max_tokens_total`` and ``max_cost`` hold)."""
        return {"calls": 1, "input_tokens": self.input_tokens, "cached_tokens": self.cached_tokens,
                "output_tokens": self.output_tokens, "reasoning_tokens": self.reasoning_tokens,
                "spent_tokens": self.input_tokens + self.output_tokens, "spent_nano": nano(self.cost),
                "unpriced_calls": int(self.cost is None)}
