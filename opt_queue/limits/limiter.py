"""Shared per-key rate limits in Redis: one atomic admission per API call, on Redis' clock.

Algorithm: a **sliding log** per window (``lua/acquire.lua``). Each admission is a member of a
sorted set scored by Redis' ``TIME``; a request is admitted only if, for every window of the key,
the admissions of the last ``period + margin`` plus this one stay within the limit. Why a log and
not the alternatives:

* GCRA / token buckets allow a full burst and then the steady rate, so a window of the configured
  length can hold almost twice the limit; a 3 RPM key would meet 429s.
* A sliding-window *counter* is an approximation that lets a window exceed its limit at the
  boundary between two fixed windows.
* A fixed window either admits 2x the limit across a boundary or, made conservative, gives a
  3 RPM key only 2 requests in some minutes.

The log is exact: no window of the configured length ever holds more than the limit, from the
first request of a job on, and a key with 3 RPM gets exactly 3 requests in every minute. Its cost is
one sorted-set entry per admission per window (bounded by the limit), and token windows keep a
running sum so that a check is O(log n) plus the entries it expires.

**Scopes.** Limits belong to an organization and a model: the unit of pacing is a *scope*, one
bucket (a key, or a ``group`` of keys sharing one budget) for one model, with its own windows and
state.

**Where a limit comes from** (:func:`window_plan`, pure): a window the config gives is a ceiling
the user chose; the window of the *header period* (a minute, the unit of the server's
``x-ratelimit-limit-requests`` / ``-tokens``) that the config does not give is *discovered*: it
takes the last value the headers said, up or down (``lua/learn.lua``), which expires after
``learned_limits_ttl`` and is read again from the next response, so an upgrade is seen during a
long job. Before anything is learned, a discovered window has the configured default
(``default_limits``; none by default) and the scope is probed (below). A server that sends no
headers teaches by its 429s: the limit an OpenAI-style message states, else half of what the window
held when it refused.

**Large limits are paced within the minute**: OpenAI may enforce 60,000 RPM as 1,000 a second, so a
request limit of :data:`PACE_ABOVE` or more per header period also holds over every 1/60 of it
(limit/60, rounded up). A 503 ``slow_down`` halves every per-minute limit of the scope, which then
ramps back linearly over two header periods.

An admission is first **reserved** (it counts, and cannot expire) and then **stamped** with the
moment its request was sent, on Redis' clock (``lua/stamp.lua``; the worker reads that moment
locally with :class:`RedisClock` right before the request body is written): the server counts a
request when it arrives, and under load a request can wait a long time for the event loop or a
connection between admission and sending. The **safety margin** lengthens every window to cover the
short, jittery delay between the send and the server's own count: ``safety_fraction`` of the
window (1%) but at most ``safety_margin`` seconds (0.25 s), so it never gives away more than 1% of
a window, short or long.

One script call admits one request or several in order (a worker's queue of waiting rows,
``admission.py``), reading each scope once. It looks at every bucket that serves the model up to a
sample size (``ACQUIRE_SAMPLE`` for a row alone), else at a random sample of that many, so that its
cost does not grow with the number of keys.

**How the server counts** (:meth:`AsyncKeyPool.queue_calibrate`, ``lua/calibrate.lua``): servers
count a prompt their own way (OpenAI's rate limiter about 4 characters a token whatever the
language, a self-hosted server its model's tokenizer, a proxy anything), and an estimate that
counts 3 times what the server counts leaves two thirds of the limit unused, one that counts half
meets 429s. A response's ``x-ratelimit-limit-tokens`` and ``-remaining-tokens`` say how much the
server had counted in its window when the request arrived; the limiter compares that with what it
admitted on the scope in the same window (each admission's prompt estimate and completion cap are
in its uid) and keeps a factor per scope (``tok_factor`` in its Redis state, so the whole fleet uses
it) by which every later admission's prompt estimate is multiplied. Until a server has said
anything the estimate holds (the scope's first request is a probe, so the factor is known before
the burst); a server that sends no token headers keeps the estimate, and its usage above an
admission's count raises it (``lua/settle.lua``; a smaller one gives nothing back, as on the
server). Once a scope has a factor, the headers, not the bill, say what its windows hold.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opt_queue.store import keys as rkeys
from opt_queue.core.config import OUTPUT_WINDOWS, ApiKey, Config, Limits
from opt_queue.core.prices import Usage
from opt_queue.core.tokens import counter
from opt_queue.store import budget as budgets
from opt_queue.store.budget import Budget, BudgetReached
from opt_queue.store.scripts import queue, run_pipeline, run_script, scripts_for

log = logging.getLogger(__name__)

ACQUIRE_SAMPLE = 32
"""Buckets one admission looks at: all of them up to this many, else a random sample of this many.
The script's cost is linear in the buckets it checks; with a thousand keys a full scan per request
made Redis the bottleneck (docs/benchmarks.md)."""
SAMPLE_POLL = 2.0
"""Longest wait after a sampled admission found no room (unsampled buckets may have some); the
engine spreads such waits so that thousands of waiting rows do not poll Redis in step."""
RESERVE_MS = 120_000
"""How long an admission that was never sent (its worker died) holds its place before expiring."""
ANSWERED_MS = 600_000
"""A scope that answered (anything but a dead key's error) within this long takes any number of
requests at once; otherwise it is probed: one request in flight until one answers, so a revoked or
spent key costs one call, not a burst, whatever the number of workers."""
PACE_ABOVE = 600
"""A request limit of this many or more per header period (10 a second for a minute) is also
enforced over every 1/:data:`PACE_DIVISOR` of the period, so that a large budget is not sent in
one burst."""
PACE_DIVISOR = 60
CALIBRATE_WEIGHT = 0.4
"""How far one observation of the server's counting moves a scope's factor (in log space) after the
first, which is taken as it is."""
CALIBRATE_EVERY = 0.2
"""A worker sends at most one observation per scope this often (seconds), past its first few: each
reads the scope's admissions of a header period in Redis."""
CALIBRATE_FIRST = 5
TOKENS_429_STEP = 1.1
"""A tokens-per-minute 429 on a scope with a factor multiplies the factor by this (learn.lua)."""
CALIBRATE_SLACK_MS = 250
"""Requests sent this close to each other may reach the server in either order (calibrate.lua)."""
LEARN_REFRESH_SHARE = 4
"""A worker writes a limit the headers repeat once per ``learned_limits_ttl / 4`` (a changed one at
once), so that a learned limit stays fresh while responses keep coming, at little cost."""

FIXED, CEILING, DISCOVER, PACE = 0, 1, 2, 3
"""Window modes: a configured window; the configured window of the header period (a learned limit
may lower it); a discovered window (the learned limit, else the default); a pacing window."""
MODE_NAMES = {FIXED: "configured", CEILING: "configured", DISCOVER: "discovered", PACE: "paced"}


@dataclass(frozen=True)
class WindowSpec:
    """One window of a scope: ``limit`` (the configured one, or a discovered window's default, 0
    for none) units of ``dim`` (``req``, ``tok``, or ``out``: output tokens, Anthropic's third
    window) in any ``period`` seconds."""

    dim: str
    period: float
    limit: int
    mode: int

    @property
    def period_ms(self) -> int:
        return int(self.period * 1000)


DIMS = {"req": 0, "tok": 1, "out": 2}
"""How ``acquire.lua`` numbers a window's dimension."""


def window_plan(limits: Limits, header_period: float, default: Limits | None = None,
                output: bool = False) -> tuple[WindowSpec, ...]:
    """The windows of a scope whose configured limits are ``limits`` (pure): request windows, then
    token windows, then (with ``output``: its provider states one, or some are configured)
    output-token windows (the stamp, cancel and settle scripts rely on that order)."""
    default = default or Limits()
    out: list[WindowSpec] = []
    dims = [("req", limits.requests, default.requests), ("tok", limits.tokens, default.tokens)]
    if output or limits.output_tokens:
        dims.append(("out", limits.output_tokens, default.output_tokens))
    for dim, configured, defaults in dims:
        periods = {w.period for w in configured}
        for w in sorted(configured, key=lambda w: w.period):
            out.append(WindowSpec(dim, w.period, w.limit, CEILING if w.period == header_period else FIXED))
        if header_period not in periods:
            start = next((w.limit for w in defaults if w.period == header_period), 0)
            out.append(WindowSpec(dim, header_period, start, DISCOVER))
        if dim == "req" and header_period / PACE_DIVISOR not in periods:
            out.append(WindowSpec(dim, header_period / PACE_DIVISOR, 0, PACE))
    return tuple(out)


def window_source(dim: str, period: float, limit: int, mode: int, state: dict[str, str], now_ms: int,
                  refresh_ms: int) -> dict[str, Any]:
    """For ``status`` (pure): a window's limit as ``acquire.lua`` applies it without the slow-down
    factor, where it came from and how long ago it was read (None for a pacing window, which
    follows its header window, or a discovered one with no limit yet)."""
    learned = int(state.get(f"learned:{dim}", 0))
    at = int(state.get(f"learned_at:{dim}", 0))
    fresh = learned > 0 and at + refresh_ms > now_ms
    read = round((now_ms - at) / 1000, 1) if fresh else None
    source = "learned from " + ("429s" if state.get(f"source:{dim}") == "429" else "headers")
    if mode == CEILING and fresh and learned < limit:
        got = {"limit": learned, "source": source + " (below the configured %d)" % limit, "read_s_ago": read}
    elif mode in (FIXED, CEILING):
        got = {"limit": limit, "source": "configured", "read_s_ago": None}
    elif mode == DISCOVER and fresh:
        got = {"limit": learned, "source": source, "read_s_ago": read}
    elif mode == DISCOVER:
        got = {"limit": limit or None, "source": "default" if limit else "not known yet", "read_s_ago": None}
    else:
        got = {"limit": None, "source": f"paced at 1/{PACE_DIVISOR} of the minute limit from {PACE_ABOVE}",
               "read_s_ago": None}
    return {"dim": dim, "period": period, "mode": MODE_NAMES[mode], **got}


def margin_ms(period: float, fraction: float, cap: float) -> int:
    """The safety margin of a window (pure): ``fraction`` of it, at most ``cap`` seconds."""
    return int(min(cap, period * fraction) * 1000)


@dataclass(frozen=True)
class Lease:
    """A granted admission: the key to call with and what to settle afterwards."""

    key: ApiKey
    uid: str
    tokens: int
    scope: str
    windows: tuple[WindowSpec, ...]
    at_ms: int = 0
    budget: Budget | None = None
    """The job budget's reservation this admission holds (settled by :meth:`AsyncKeyPool.queue_spend`)."""

    out_tokens: int = 0
    """What its output-token windows hold for it: the completion's cap until the answer says."""

    @property
    def nreq(self) -> int:
        return sum(1 for w in self.windows if w.dim == "req")

    @property
    def ntok(self) -> int:
        return sum(1 for w in self.windows if w.dim == "tok")


@dataclass(frozen=True)
class Wait:
    """No key can admit now; ``seconds`` until the earliest might (``exact``), or until it is
    worth looking again (a sample of the keys was full; others may not be)."""

    seconds: float
    at_ms: int = 0
    exact: bool = True
    too_large: bool = False  # every sampled scope refused the request as larger than its window




@dataclass(frozen=True)
class Never:
    """No key serving the model can ever admit a request this large (TPM window too small)."""

    tokens: int


@dataclass
class Report:
    """Everything one call told the limiter, reported once (:meth:`AsyncKeyPool.queue_report`),
    in one round trip: with the row's result after an answer, alone after a failure."""

    sent: bool = True
    """False: the request never left (the lease is cancelled, nothing counted)."""
    used_tokens: int = 0
    output_tokens: int | None = None
    """The output an answer wrote: its output-token windows hold that from now on (None: as admitted)."""
    usage: Usage | None = None
    """What the call was billed (None: nothing, e.g. an error status)."""
    refused: bool = False
    """A 429: the server counted nothing for it, and it leaves calibration."""
    error: str | None = None
    """The failure's reason, counted in the key's statistics."""
    verdict: str | None = None
    """What the server said of the scope: ``"429"``, ``"429tok"`` (its tokens' window), ``"slow"``."""
    cooldown: float = 0.0
    server: dict[str, int] = field(default_factory=dict)
    """The limits the response stated."""
    answered: bool | None = True
    """The scope answered (ends its probing); False: a transient failure that says nothing of the
    key (another probe may go); None: no word (a dead key's probe stays out)."""
    sent_ms: int | None = None
    window: tuple[int, int] | None = None
    """The request's stamp and the response's token window: an observation for calibration."""
    window_rounding: int = 0
    """How the server rounds the remaining tokens of ``window`` (0: exact)."""
    prompt_counted: int | None = None
    """The server's count of the request's prompt, where its window counts what it bills (Gemini)."""
    output_window: tuple[int, int] | None = None
    """``(limit, remaining)`` of the output-token window as the response stated it: whether the
    server held the request's ``max_tokens`` in it (``lua/out_mode.lua``)."""
    output_refused: bool = False
    """A 429 of the output-token window."""


@dataclass(frozen=True)
class _AcquirePlan:
    """One ``acquire.lua`` call: its keys and arguments, and how to read its reply."""

    order: list[str]
    cands: dict[str, list[ApiKey]]
    keys: list[str]
    args: list[Any]
    model: str
    asks: tuple[tuple[int, str, Budget | None, int], ...]
    """Each request's tokens, admission uid and share of the job's budget, in order (the uid carries
    the prompt's estimate and the completion's cap, for calibration)."""
    new_scopes: tuple[str, ...] = ()


def scope_name(bucket: str, model: str) -> str:
    """The pacing unit: a bucket (key or group) for one model."""
    return f"{bucket}/{model}"


class AsyncKeyPool:
    """The keys a worker process may use, paced by the shared state in Redis (``redis.asyncio``).

    ``probe`` (seconds, usually the request timeout): how long a scope's probe may stay out before
    another request may probe it (see :data:`ANSWERED_MS`); 0 turns probing off. ``now_ms``, when
    set, replaces Redis' clock in every script (tests control time with it)."""

    def __init__(self, client: Any, keys: list[ApiKey], *, margin: float = 0.25, fraction: float = 0.01,
                 probe: float = 0.0, header_period: float = 60.0, default: Limits | None = None,
                 refresh: float = 600.0) -> None:
        self.client = client
        self.keys = list(keys)
        self.margin = margin
        self.fraction = fraction
        self.probe_ms = int(probe * 1000)
        self.header_period = header_period
        self.default = default or Limits()
        self.refresh_ms = int(refresh * 1000)
        self.now_ms: int | None = None
        self.clock = RedisClock()
        self._scripts = scripts_for(client)
        self._rr = itertools.count()
        self.buckets: dict[str, list[ApiKey]] = {}
        for k in self.keys:
            self.buckets.setdefault(k.bucket, []).append(k)
        self._candidates: dict[tuple[str, frozenset[str]], dict[str, list[ApiKey]]] = {}
        self._plans: dict[tuple[str, str], tuple[WindowSpec, ...]] = {}
        self._fragments: dict[tuple[str, str], tuple[list[str], list[Any]]] = {}
        self._learned: dict[str, tuple[dict[str, int], float]] = {}
        self._calibrated: dict[str, tuple[int, float]] = {}  # per scope: observations sent, last one
        self._out_written: set[str] = set()  # scopes whose output-count reading was sent

    @classmethod
    def from_config(cls, client: Any, config: Config, keys: list[ApiKey] | None = None) -> AsyncKeyPool:
        return cls(client, config.keys() if keys is None else keys, margin=config.safety_margin,
                   fraction=config.safety_fraction, probe=config.request_timeout,
                   header_period=config.header_period, default=config.default_limits,
                   refresh=config.learned_limits_ttl)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.keys)} keys in {len(self.buckets)} buckets>"

    async def describe(self) -> None:
        """Describe the keys in Redis for ``status`` (fingerprints, never secrets); call once."""
        pipe = self.client.pipeline()
        for k in self.keys:
            configured = str(k.limits) if k.limits.requests or k.limits.tokens else "none configured"
            desc = {"bucket": k.bucket, "limits": configured, "models": list(k.models or []),
                    "api_base": k.api_base, "provider": k.provider}
            pipe.hset(rkeys.KNOWN_KEYS, k.fingerprint, json.dumps(desc))
        await pipe.execute()

    # -- admission ------------------------------------------------------------------------------
    def windows(self, bucket: str, model: str) -> tuple[WindowSpec, ...]:
        """The windows of ``bucket`` for ``model`` (cached)."""
        got = self._plans.get((bucket, model))
        if got is None:
            members = self.buckets[bucket]
            got = self._plans[(bucket, model)] = window_plan(
                members[0].limits_for(model), self.header_period, self.default,
                output=any(k.provider in OUTPUT_WINDOWS for k in members))
        return got

    def _fragment(self, bucket: str, model: str) -> tuple[list[str], list[Any]]:
        """A scope's part of an admission's keys and arguments (cached: with a thousand keys an
        admission samples 32 scopes, and formatting their keys anew each time cost the event loop
        enough lag to delay sends)."""
        got = self._fragments.get((bucket, model))
        if got is None:
            scope = scope_name(bucket, model)
            specs = self.windows(bucket, model)
            ks = [rkeys.bucket_state(scope)] + [rkeys.bucket_window(scope, w.dim, w.period) for w in specs]
            args: list[Any] = [len(specs)]
            for w in specs:
                args += [DIMS[w.dim], w.limit, w.period_ms, w.mode,
                         margin_ms(w.period, self.fraction, self.margin)]
            got = self._fragments[(bucket, model)] = (ks, args)
        return got

    def candidates(self, model: str, exclude: set[str]) -> dict[str, list[ApiKey]]:
        """Buckets with at least one usable key that serves ``model`` (cached: the answer only
        changes when a key is retired, and computing it is linear in the number of keys)."""
        ident = (model, frozenset(exclude))
        out = self._candidates.get(ident)
        if out is None:
            out = {}
            for bucket, members in self.buckets.items():
                usable = [k for k in members if k.serves(model) and k.fingerprint not in exclude]
                if usable:
                    out[bucket] = usable
            if len(self._candidates) > 256:
                self._candidates.clear()
            self._candidates[ident] = out
        return out

    def plan(self, model: str, tokens: int, exclude: set[str] | None = None,
             budget: Budget | None = None, prompt: int = 0, output: int = 0) -> _AcquirePlan | None:
        """What an admission of one request needs (None when no usable key serves ``model`` at
        all): queue it with :meth:`queue_acquire` and read its reply with :meth:`granted`. With
        ``budget``, the job's budget must hold the request too, and the admission reserves its
        share. ``prompt`` is the part of ``tokens`` that estimates the prompt (a scope that learned
        how its server counts scales it; 0: the request is counted as ``tokens``); ``output`` what
        an output-token window holds for it (the completion's cap)."""
        return self.plan_many(model, [(tokens, budget, prompt, output)], exclude)

    def plan_many(self, model: str, asks: Sequence[tuple[int, Budget | None, int, int]],
                  exclude: set[str] | None = None, sample: int = ACQUIRE_SAMPLE) -> _AcquirePlan | None:
        """An admission of several requests of ``model`` in one script call, in order, each with
        its tokens, its share of the job's budget (all of one job, or all None), its prompt's
        part of the tokens and its output tokens (for output windows); it looks at ``sample``
        buckets."""
        cands = self.candidates(model, exclude or set())
        if not cands:
            return None
        # Ties in headroom go to a random bucket, not always the first; beyond the sample a random
        # sample keeps the script's cost flat in the number of keys.
        order = random.sample(list(cands), min(len(cands), sample))
        new = tuple(scope_name(b, model) for b in order if (b, model) not in self._plans)
        budget_key = next((b.key for _, b, _, _ in asks if b is not None), None)
        prompts = [min(max(prompt, 0), tokens) for tokens, _, prompt, _ in asks]
        planned = tuple((tokens, f"{uuid.uuid4().hex[:16]}.{prompt}.{tokens - prompt}", budget, max(output, 0))
                        for (tokens, budget, _, output), prompt in zip(asks, prompts))
        ks: list[str] = []
        argv: list[Any] = [len(planned), len(order), RESERVE_MS, self.probe_ms, self.now_ms or 0,
                           self.refresh_ms, PACE_ABOVE, int(self.header_period * 1000), int(budget_key is not None)]
        exact = int(counter(model) is not None)  # else the prompts' estimates are upper bounds
        for (tokens, uid, budget, output), prompt in zip(planned, prompts):
            argv += [tokens, uid, budget.cost_nano if budget else 0, budget.tokens if budget else 0, prompt, exact,
                     output]
        for bucket in order:
            scope_keys, scope_args = self._fragment(bucket, model)
            ks += scope_keys
            argv += scope_args
        if budget_key is not None:
            ks.append(budget_key)
        return _AcquirePlan(order, cands, ks, argv, model, planned, new)

    def queue_acquire(self, plan: _AcquirePlan, pipe: Any) -> None:
        """Queue the admission on ``pipe`` (see ``scripts.run_pipeline``)."""
        for scope in plan.new_scopes:  # for status: which scopes exist, and their windows
            bucket, model = scope.split("/", 1)
            pipe.hset(rkeys.KNOWN_SCOPES, scope, json.dumps(
                {"bucket": bucket, "model": model,
                 "windows": [[w.dim, w.period, w.limit, w.mode] for w in self.windows(bucket, model)]}))
        queue(pipe, self._scripts.acquire, plan.keys, plan.args)

    def granted(self, plan: _AcquirePlan, reply: Any) -> Lease | Wait | Never | BudgetReached:
        """Read the reply of a one-request admission."""
        return self.granted_all(plan, reply)[0]

    def granted_all(self, plan: _AcquirePlan, reply: Any) -> list[Lease | Wait | Never | BudgetReached]:
        """Read an admission's reply: what each request got, in order, up to the first that waits
        (the requests after it were not looked at, and wait too)."""
        now_ms = int(reply[0])
        sampled = len(plan.order) < len(plan.cands)  # buckets outside the sample may be free now
        out: list[Lease | Wait | Never | BudgetReached] = []
        for (tokens, uid, budget, _output), status, value, charged, held in zip(
                plan.asks, reply[1::4], reply[2::4], reply[3::4], reply[4::4]):
            status, value, tokens, output = int(status), int(value), int(charged), int(held)
            if status == 1:
                bucket = plan.order[value - 1]
                members = plan.cands[bucket]
                key = members[next(self._rr) % len(members)]  # itertools.count is atomic under the GIL
                out.append(Lease(key=key, uid=uid, tokens=tokens, scope=scope_name(bucket, plan.model),
                                 windows=self.windows(bucket, plan.model), at_ms=now_ms, budget=budget,
                                 out_tokens=output))
            elif status == -3:
                out.append(BudgetReached())
            elif status == -2:  # the budget waits for requests in flight to settle
                out.append(Wait(value / 1000.0, now_ms, exact=False))
            elif status == -1 and not sampled:
                out.append(Never(tokens))
            elif sampled:
                seconds = value / 1000.0 if status == 0 else SAMPLE_POLL
                out.append(Wait(min(seconds, SAMPLE_POLL), now_ms, exact=False, too_large=status == -1))
            else:
                out.append(Wait(value / 1000.0, now_ms))
        return out

    async def acquire(self, model: str, tokens: int, exclude: set[str] | None = None,
                      budget: Budget | None = None, prompt: int = 0,
                      output: int = 0) -> Lease | Wait | Never | BudgetReached | None:
        """Try to admit one request in its own round trip (the engine batches it with the row's
        state instead); ``None`` when no usable key serves ``model`` at all."""
        plan = self.plan(model, tokens, exclude, budget, prompt, output)
        if plan is None:
            return None
        return (await self.run_acquire(plan))[0]

    async def run_acquire(self, plan: _AcquirePlan) -> list[Lease | Wait | Never | BudgetReached]:
        """Run an admission in its own round trip (coalesced with others of the same turn)."""
        t0 = time.monotonic()
        reply = (await run_pipeline(self.client, lambda pipe: self.queue_acquire(plan, pipe)))[-1]
        self.clock.observe(t0, time.monotonic(), int(reply[0]))
        return self.granted_all(plan, reply)

    # -- after the admission --------------------------------------------------------------------
    @staticmethod
    def _window_keys(lease: Lease) -> list[str]:
        """The lease's window sorted sets: request windows first, then token windows."""
        return [rkeys.bucket_window(lease.scope, w.dim, w.period) for w in lease.windows]

    async def stamp(self, lease: Lease, sent_ms: int | None = None) -> int:
        """Start the lease's windows at ``sent_ms`` (when its request was sent, on Redis' clock:
        see :class:`RedisClock`), else now; return the stamp (ms)."""
        sent_ms = self.now_ms if self.now_ms is not None else sent_ms
        args: list[Any] = [lease.uid, lease.tokens, lease.nreq, "" if sent_ms is None else sent_ms, lease.at_ms,
                           int(self.now_ms is not None), lease.ntok, lease.out_tokens]
        return int(await run_script(self.client, self._scripts.stamp, self._window_keys(lease), args))

    async def cancel(self, lease: Lease) -> None:
        """Give back a lease whose request was never sent (and its share of the job's budget)."""
        await run_pipeline(self.client, lambda pipe: self._queue_cancel(lease, pipe))

    def _queue_cancel(self, lease: Lease, pipe: Any) -> None:
        queue(pipe, self._scripts.cancel, [rkeys.bucket_state(lease.scope), *self._window_keys(lease)],
              [lease.uid, lease.tokens, lease.nreq, lease.ntok, lease.out_tokens,
               *[w.period_ms for w in lease.windows if w.dim != "req"]])
        self.queue_spend(lease, None, pipe)

    def queue_spend(self, lease: Lease, usage: Usage | None, pipe: Any) -> None:
        """Queue on ``pipe`` what a call cost (``usage``; None: nothing billed) and the end of the
        job budget's share its admission reserved (``budget.queue_spend``)."""
        held = lease.budget
        budgets.queue_spend(pipe, lease.key.fingerprint, held.key if held else None, usage,
                           (held.cost_nano, held.tokens) if held else (0, 0))

    def queue_settle(self, lease: Lease, used_tokens: int, pipe: Any, refused: bool = False) -> None:
        """Queue the settlement on ``pipe`` (sent with the row's result, in one round trip): a real
        usage above what the admission counted raises it, unless the scope learned how its server
        counts; a smaller one gives nothing back (the server counts a request's prompt and
        ``max_tokens`` on arrival), so that the next request does not go in early. A request the
        server ``refused`` (429) leaves calibration. The request is counted in the key's
        statistics."""
        toks = [w for w in lease.windows if w.dim == "tok"]
        if toks and (used_tokens > lease.tokens or refused):
            queue(pipe, self._scripts.settle,
                  [rkeys.bucket_state(lease.scope)] + [rkeys.bucket_window(lease.scope, "tok", w.period) for w in toks],
                  [lease.uid, lease.tokens, used_tokens, int(refused), *[w.period_ms for w in toks]])
        stats = rkeys.key_stats(lease.key.fingerprint)
        pipe.hincrby(stats, "requests", 1)
        pipe.hincrby(stats, "tokens", max(used_tokens, 0))

    def queue_settle_output(self, lease: Lease, written: int, pipe: Any) -> None:
        """Queue on ``pipe`` what the lease's output-token windows hold from now on: the output the
        answer wrote instead of the completion's cap (``lua/settle_out.lua``)."""
        outs = [w for w in lease.windows if w.dim == "out"]
        if outs and written != lease.out_tokens:
            queue(pipe, self._scripts.settle_out,
                  [rkeys.bucket_state(lease.scope)] + [rkeys.bucket_window(lease.scope, "out", w.period) for w in outs],
                  [lease.uid, lease.out_tokens, max(written, 0), *[w.period_ms for w in outs]])

    def _now(self) -> int | None:
        return self.now_ms if self.now_ms is not None else self.clock.now_ms()

    def queue_answered(self, lease: Lease, pipe: Any) -> None:
        """The scope answered: no probing for a while (the time is Redis', read locally)."""
        now = self._now()
        if self.probe_ms and now is not None:
            pipe.hset(rkeys.bucket_state(lease.scope), mapping={"answered_until": now + ANSWERED_MS,
                                                                 "probe_until": 0})

    def _queue_word(self, lease: Lease, alive: bool, pipe: Any) -> None:
        """After a call: an answer from a live key ends probing like a success; a transient
        failure says nothing about the key, so it only lets another probe go."""
        if alive:
            self.queue_answered(lease, pipe)
        elif self.probe_ms:
            pipe.hset(rkeys.bucket_state(lease.scope), "probe_until", 0)

    @staticmethod
    def _queue_error(key: ApiKey, reason: str, pipe: Any) -> None:
        pipe.hincrby(rkeys.key_stats(key.fingerprint), f"error:{reason}", 1)

    def queue_report(self, lease: Lease, report: Report, pipe: Any) -> int | None:
        """Queue on ``pipe`` all that one call tells the limiter, in the order the scope's other
        requests need it: the lease settled (or cancelled) and the spend counted; the error
        counted; what the server said of the scope's limits (a 429's cooldown, a slow-down, the
        limits it stated) and the calibration, before the scope is marked answered, since requests
        waiting for a probe's answer must find them. Return the position on ``pipe`` of the
        verdict's reply (the cooldown in ms), if one was queued."""
        if report.sent:
            self.queue_settle(lease, report.used_tokens, pipe, report.refused)
            if report.output_tokens is not None:
                self.queue_settle_output(lease, report.output_tokens, pipe)
            self.queue_spend(lease, report.usage, pipe)
        else:
            self._queue_cancel(lease, pipe)
        if report.error is not None:
            self._queue_error(lease.key, report.error, pipe)
        verdict_at = None
        if report.verdict is not None:
            verdict_at = len(pipe.command_stack)
            self._queue_verdict(lease, report.verdict, report.cooldown, report.server, pipe)
        else:
            self.queue_learn(lease, report.server, pipe)
        self.queue_calibrate(lease, report.sent_ms, report.window, pipe, report.window_rounding)
        self.queue_output_mode(lease, report, pipe)
        if report.prompt_counted:
            self.queue_calibrate_usage(lease, report.prompt_counted, pipe)
        if report.answered is not None:
            self._queue_word(lease, report.answered, pipe)
        return verdict_at

    async def report(self, lease: Lease, report: Report) -> float:
        """:meth:`queue_report` in its own round trip; return the cooldown the scope took (s)."""
        at: list[int | None] = []

        def fill(pipe: Any) -> None:
            start = len(pipe.command_stack)
            where = self.queue_report(lease, report, pipe)
            at.append(None if where is None else where - start)

        replies = await run_pipeline(self.client, fill)
        return int(replies[at[0]]) / 1000.0 if at and at[0] is not None else 0.0

    # -- what the server says -------------------------------------------------------------------
    def _tell_call(self, lease: Lease, kind: str, cooldown: float = 0.0,
                   server: dict[str, int] | None = None) -> tuple[list[str], list[Any]]:
        server = server or {}
        header = rkeys.bucket_window(lease.scope, "req", self.header_period)
        return ([rkeys.bucket_state(lease.scope), header],
                [kind, int(cooldown * 1000), server.get("requests", 0), server.get("tokens", 0),
                 self.now_ms or 0, int(self.header_period * 1000), TOKENS_429_STEP, server.get("output_tokens", 0)])

    def _queue_verdict(self, lease: Lease, kind: str, cooldown: float, server: dict[str, int] | None,
                       pipe: Any) -> None:
        """Queue what the server said of the scope (``lua/learn.lua``): ``429`` / ``429tok`` (cool
        it for ``cooldown`` s, learn ``server``'s limits), ``slow`` (halve its per-minute limits)."""
        if kind.startswith("429"):
            self._learned.pop(lease.scope, None)
        queue(pipe, self._scripts.learn, *self._tell_call(lease, kind, cooldown, server))

    def queue_learn(self, lease: Lease, server: dict[str, int], pipe: Any) -> bool:
        """Queue on ``pipe`` the limits a response's ``x-ratelimit-limit-*`` headers give (up or
        down), when they changed, or a few times per ``learned_limits_ttl`` while they do not
        (the engine sends it with the row's result, before the scope is marked answered). Return
        whether anything was queued."""
        if not server:
            return False
        last = self._learned.get(lease.scope)
        now = time.monotonic()
        if last is not None and last[0] == server and now - last[1] < self.refresh_ms / 1000 / LEARN_REFRESH_SHARE:
            return False
        queue(pipe, self._scripts.learn, *self._tell_call(lease, "ok", 0.0, server))
        self._learned[lease.scope] = (dict(server), now)
        return True

    def queue_output_mode(self, lease: Lease, report: Report, pipe: Any) -> bool:
        """Queue on ``pipe`` what a response showed of how the scope's server counts output tokens
        (``lua/out_mode.lua``): less used in the window when the request arrived than its own
        ``max_tokens`` (remaining tokens rounded as ``window_rounding`` says) refutes a server that
        holds ``max_tokens`` on arrival; an output-token 429 while one token was held refutes that
        reading. Return whether anything was queued."""
        state = rkeys.bucket_state(lease.scope)
        if report.output_refused and lease.out_tokens <= 1:
            queue(pipe, self._scripts.out_mode, [state], ["refuted"])
            log.warning("%s: an output-token 429 while requests held one token of the window: its server "
                        "holds max_tokens after all; requests hold their max_tokens again", lease.scope)
            return True
        if report.output_window is None or lease.out_tokens <= 1 or lease.scope in self._out_written:
            return False
        limit, remaining = report.output_window
        if limit - remaining + report.window_rounding / 2 >= lease.out_tokens:
            return False
        self._out_written.add(lease.scope)  # once per scope and process: the script keeps a refutation
        queue(pipe, self._scripts.out_mode, [state], ["written"])
        log.info("%s: its server counts output tokens as they are written (%d used of %d when a request "
                 "holding %d arrived): requests hold one token of the output window until they answer",
                 lease.scope, limit - remaining, limit, lease.out_tokens)
        return True

    def queue_calibrate_usage(self, lease: Lease, counted: int, pipe: Any) -> bool:
        """Queue on ``pipe`` a reading of how the scope's server counts prompts from what it billed
        for this request (``lua/calibrate_usage.lua``): its first few readings, then one per
        :data:`CALIBRATE_EVERY` (a scope's token window of the header period only)."""
        if not any(w.dim == "tok" for w in lease.windows):
            return False
        estimate = int(lease.uid.split(".")[1]) if lease.uid.count(".") == 2 else 0
        sent, last = self._calibrated.get(lease.scope, (0, 0.0))
        now = self.now_ms / 1000 if self.now_ms is not None else time.monotonic()
        if estimate <= 0 or (sent >= CALIBRATE_FIRST and now - last < CALIBRATE_EVERY):
            return False
        self._calibrated[lease.scope] = (sent + 1, now)
        queue(pipe, self._scripts.calibrate_usage, [rkeys.bucket_state(lease.scope)],
              [counted, estimate, CALIBRATE_WEIGHT, self.now_ms or 0, ANSWERED_MS])
        return True

    def queue_calibrate(self, lease: Lease, sent_ms: int | None, window: tuple[int, int] | None,
                        pipe: Any, rounding: int = 0) -> bool:
        """Queue on ``pipe`` an observation of how the scope's server counts tokens: ``window`` is
        the response's ``(x-ratelimit-limit-tokens, -remaining-tokens)``, ``sent_ms`` the request's
        stamp (see the module docstring). A worker sends its first few observations of a scope,
        then one per :data:`CALIBRATE_EVERY`. Return whether one was queued."""
        header = next((w for w in lease.windows if w.dim == "tok" and w.period == self.header_period), None)
        if window is None or sent_ms is None or header is None or window[0] <= 0:
            return False
        sent, last = self._calibrated.get(lease.scope, (0, 0.0))
        now = self.now_ms / 1000 if self.now_ms is not None else time.monotonic()  # tests move the clock
        if sent >= CALIBRATE_FIRST and now - last < CALIBRATE_EVERY:
            return False
        self._calibrated[lease.scope] = (sent + 1, now)
        queue(pipe, self._scripts.calibrate,
              [rkeys.bucket_state(lease.scope), rkeys.bucket_window(lease.scope, "tok", header.period)],
              [window[0], window[1], sent_ms, header.period_ms, CALIBRATE_WEIGHT, self.now_ms or 0, lease.uid,
               CALIBRATE_SLACK_MS, lease.tokens, ANSWERED_MS, rounding // 2])
        return True


class RedisClock:
    """Redis' clock (``TIME``, ms) read off this process's monotonic clock.

    A request's stamp must be the moment its bytes leave, but a worker can only learn Redis' time
    with a round trip, and on a busy event loop a round trip between stamping and sending delays
    the send by the loop's lag (hundreds of ms in a burst of thousands of rows, past the safety
    margin). So the worker reads the time locally at the send and maps it: every admission's reply
    carries Redis' time, and the reply with the shortest round trip gives the offset (error at most
    half that round trip; a sample ages by 5 ms per second so that a drifting clock is followed).
    """

    AGE_MS_PER_S = 5.0

    def __init__(self) -> None:
        self._offset_ms: float | None = None
        self._rtt_ms = math.inf
        self._at = 0.0

    def observe(self, t0: float, t1: float, redis_ms: int) -> None:
        """Note a Redis time read by a call sent at monotonic ``t0`` and answered at ``t1``."""
        rtt_ms = (t1 - t0) * 1000
        aged = self._rtt_ms + (t1 - self._at) * self.AGE_MS_PER_S
        if rtt_ms <= aged:
            self._offset_ms = redis_ms - (t0 + t1) * 500
            self._rtt_ms, self._at = rtt_ms, t1

    async def calibrate(self, client: Any, samples: int = 3) -> None:
        """Read Redis' ``TIME`` a few times now, while the worker is idle: the first stamps of a
        job are read off this offset. Without it they were read off the first admissions, which
        wait behind a whole burst of rows (round trips of hundreds of ms, so an offset off by up to
        half that)."""
        for _ in range(samples):
            t0 = time.monotonic()
            seconds, micros = await client.time()
            self.observe(t0, time.monotonic(), int(seconds) * 1000 + int(micros) // 1000)

    def now_ms(self) -> int | None:
        """Redis' time now, or None before the first observation."""
        if self._offset_ms is None:
            return None
        return int(time.monotonic() * 1000 + self._offset_ms)
