"""What the keys' limits are, asked of the server: ``estimate --probe`` sends one minimal request
per key and model (``max_tokens: 1``, a one-word prompt) and reads the ``x-ratelimit-limit-*``
headers of the answer, or of its refusal. Each probe is a paid call: its cost comes back with it.

Also here: the limits the fleet learned before (:func:`learned`), kept in Redis per bucket (a key,
or a group of keys sharing a budget) and model by the limiter, with how the server counts tokens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from opt_queue.store import keys as rkeys
from opt_queue.core.config import ApiKey, Config
from opt_queue.limits.limiter import scope_name
from opt_queue.core.prices import Prices
from opt_queue.core.request import CHAT_URL

PROBE_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass
class Limits:
    """A bucket's limits for a model, per header period: what the server said (None: not said)."""

    requests: int | None = None
    tokens: int | None = None
    token_factor: float | None = None
    """How the server counts a prompt, as a share of opt-queue's count (learned by the limiter)."""
    source: str = ""
    cost: float | None = None
    """What the probe call cost (``--probe``)."""
    error: str | None = None


def learned(client: Any, config: Config, model: str) -> dict[str, Limits]:
    """The limits the fleet learned for ``model``, per bucket (from Redis; none when it never ran)."""
    buckets = sorted({k.bucket for k in config.keys() if k.serves(model)})
    pipe = client.pipeline(transaction=False)
    for bucket in buckets:
        pipe.hmget(rkeys.bucket_state(scope_name(bucket, model)), "learned:req", "learned:tok", "tok_factor")
    out = {}
    for bucket, (req, tok, factor) in zip(buckets, pipe.execute()):
        if req or tok:
            out[bucket] = Limits(int(req) if req else None, int(tok) if tok else None,
                                 float(factor) if factor else None, "learned by the fleet")
    return out


def probe(config: Config, model: str, prices: Prices) -> dict[str, Limits]:
    """One minimal call per bucket serving ``model``: its limits, from the answer's headers."""
    keys: dict[str, ApiKey] = {}
    for key in config.keys():
        if key.serves(model):
            keys.setdefault(key.bucket, key)
    return asyncio.run(_probe_all(config, model, prices, keys))


async def _probe_all(config: Config, model: str, prices: Prices, keys: dict[str, ApiKey]) -> dict[str, Limits]:
    from opt_queue import providers  # the SDK: imported only to call

    provider = providers.for_config(config)
    try:
        got = await asyncio.gather(*(_probe_one(provider, key, model, config, prices) for key in keys.values()))
    finally:
        await provider.close()
    return dict(zip(keys, got))


async def _probe_one(provider: Any, key: ApiKey, model: str, config: Config, prices: Prices) -> Limits:
    from opt_queue.providers import redact

    body = {"model": model, **PROBE_BODY}
    secrets = [key.secret.get_secret_value()]
    try:
        answer = await provider.call(key, CHAT_URL, body, min(config.request_timeout, 30.0))
    except Exception as exc:  # a refusal still carries the limits; anything else says why not
        failure = provider.classify(exc)
        said = failure.server_limits
        message = redact(failure.message, secrets)
        return Limits(said.get("requests"), said.get("tokens"), source="probe",
                      error=None if said else f"{failure.reason}: {message}"[:200])
    said = answer.server_limits
    reply = answer.reply
    cost = prices.cost(model, CHAT_URL, body, reply.prompt_tokens, reply.completion_tokens)
    return Limits(said.get("requests"), said.get("tokens"), source="probe", cost=cost,
                  error=None if said else "the answer carried no x-ratelimit-* headers")
