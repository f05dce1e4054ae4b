"""A job's money, in one room: its budget (``max_cost``, ``max_tokens_total``), the shares of it
that requests and batches in flight hold, and what was spent.

The limiter reserves a synchronous request's share inside its admission, atomically with the
key's windows (``lua/acquire.lua``, from the request's :class:`Budget`); the batch lane reserves
a batch's worst case (:func:`reserve`, ``lua/reserve.lua``). Both count the real cost and give
the share back here (:func:`queue_spend`), and stop the job when nothing more fits with nothing
in flight (:func:`stop_for_budget`): its unanswered rows stay unanswered, and a submit with a
higher budget resumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opt_queue.core.prices import Usage, dollars, money
from opt_queue.store import keys
from opt_queue.store.jobs import AsyncJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """A request's share of its job's budget: reserved at admission in the same script that admits
    it (``acquire.lua``), settled to the real cost after the call."""

    key: str
    """The job's meta hash (``max_cost_nano``, ``spent_nano``, ``reserved_nano``, ...)."""
    cost_nano: int
    tokens: int


@dataclass(frozen=True)
class BudgetReached:
    """The job's budget has no room for this request, and no request of the job is in flight."""


def share(job: AsyncJob, cost_nano: int, tokens: int) -> Budget:
    """A request's share of ``job``'s budget: its worst case."""
    return Budget(job.budget_key, cost_nano, tokens)


def queue_spend(pipe: Any, key_fingerprint: str | None, budget_key: str | None, usage: Usage | None,
                reserved: tuple[int, int] = (0, 0)) -> None:
    """Queue on ``pipe`` what a call (or a batch's line) cost (``usage``; None: nothing billed,
    e.g. an error): the key's and the job's spend and tokens grow by it; then the share it held
    (``reserved``: nano-dollars, tokens) is given back, in that order, so that a concurrent
    admission never sees the budget freer than it is."""
    if usage is not None:
        queue_counts(pipe, key_fingerprint, budget_key, usage.counters())
    cost_nano, tokens = reserved
    if budget_key and cost_nano:
        pipe.hincrby(budget_key, "reserved_nano", -cost_nano)
    if budget_key and tokens:
        pipe.hincrby(budget_key, "reserved_tokens", -tokens)


def queue_counts(pipe: Any, key_fingerprint: str | None, budget_key: str | None, counts: Mapping[str, int]) -> None:
    """Queue on ``pipe`` the growth of the key's and the job's spend and tokens by ``counts``
    (``Usage.counters()``, or the sum of several: a batch's rows are counted a group at a time)."""
    targets = ([keys.key_stats(key_fingerprint)] if key_fingerprint is not None else []) + \
              ([budget_key] if budget_key else [])
    for target in targets:
        for name, value in counts.items():
            if value:
                pipe.hincrby(target, name, value)


async def reserve(job: AsyncJob, cost_nano: int, tokens: int) -> int:
    """Reserve a batch's worst case in the job's budget (``lua/reserve.lua``): 1 reserved, 0 not
    now (reservations in flight may leave room), -1 never (over the budget)."""
    return int(await job._scripts.reserve(keys=[job.budget_key], args=[cost_nano, tokens]))


async def stop_for_budget(job: AsyncJob) -> None:
    """The next request (or batch) would cross the job's budget with nothing in flight: stop the
    job, saying which limit it reached."""
    meta = await job.meta_fields("max_cost_nano", "spent_nano", "max_tokens_total", "spent_tokens")
    max_cost, spent, max_tokens, spent_tokens = (int(v or 0) for v in meta)
    if max_cost and (not max_tokens or spent / max_cost >= spent_tokens / max_tokens):
        reason = f"budget reached: {money(dollars(spent))} of {money(dollars(max_cost))} (max_cost)"
    else:
        reason = f"budget reached: {spent_tokens} of {max_tokens} tokens (max_tokens_total)"
    reason += "; the unanswered rows stay unanswered: raise the budget and run the same command again"
    if await job.stop(reason):
        log.warning("job %s stopped: %s", job.id, reason)
