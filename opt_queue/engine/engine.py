"""The error policy: take a slot, call the API, act on the outcome, publish the row's result.

One :class:`Engine` per worker process holds the config, the Redis connection and the key pool;
:meth:`Engine.process_rows` is everything a rows task does. The policy (docs/how-it-works.md, "Error policy"):

=============  ===========================================  =========================================
class          examples                                     what happens
=============  ===========================================  =========================================
rate limited   429 rate_limit_exceeded, 503 slow_down       cool (slow) the key, other key, no attempt used
key dead       401, 403, 429 insufficient_quota             retire the key for the job, other key
transient      5xx, timeout, connection error, bad body     backoff with jitter, up to max_retries
too long       400 context_length_exceeded                  once on the fallback model, else null
job config     404 model not found, unknown parameter       stop the job with the API's message
other 4xx      invalid request for this row                 null with the reason
=============  ===========================================  =========================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio

from opt_queue.core import answers, formats
from opt_queue.engine import metrics
from opt_queue import providers
from opt_queue.store import keys as rkeys
from opt_queue.limits.admission import RETRY, Admissions
from opt_queue.core.answers import RowResult
from opt_queue.store.leases import DONE, HELD, Leases
from opt_queue.core.request import split_row
from opt_queue.core.config import ApiKey, Config
from opt_queue.store.jobs import STOPPED, AsyncJob
from opt_queue.limits.limiter import AsyncKeyPool, Lease, Never, Report, Wait
from opt_queue.store import budget as budgets
from opt_queue.store.budget import Budget, BudgetReached
from opt_queue.core.prices import Prices, Usage, nano
from opt_queue.core.broker_url import redact_url
from opt_queue.core.request import CHAT_URL, ask_again, failure_key, request_hash
from opt_queue.store.scripts import run_pipeline
from opt_queue.core.tokens import estimate_parts, estimator

log = logging.getLogger(__name__)

WAKE_SPREAD = 0.1
UNREACHABLE_MARK = "unreachable:"
"""How the reason of a key retired because its base URL cannot be reached begins."""
HANDED_BACK = "handed_back"
"""Outcome of a row that waited for a slot until its task's hold ran out (see ``process_rows``)."""
DUPLICATE, RELEASED, DROPPED, PUBLISHED = "duplicate", "released", "dropped", "published"
"""Other outcomes: another copy of the row finished it (or works on it now); the job stopped and
the row stays unanswered; the job is unknown (reset or expired); the row's result is out."""


class Published(str):
    """:data:`PUBLISHED`, with the key that answered as Flower may show it (``by``: its provider
    and fingerprint, never the key)."""

    by: str | None = None

    @classmethod
    def of(cls, by: str | None) -> Published:
        outcome = cls(PUBLISHED)
        outcome.by = by
        return outcome


RETIRED_CACHE_SECONDS = 1.0
TOO_LARGE_SAMPLES = 5
"""With more keys than one admission samples, a request that every key of this many samples found
larger than its token window is taken as too large for all of them."""
LEASE_POLL = 1.0
"""How often a copy of a row whose lease another worker holds looks again."""
PUBLISH_PATIENCE = 600.0
"""How long a paid answer waits for Redis to take it before the row is given up to a retry."""
UNREACHABLE_TRIES = 3
UNREACHABLE_FIRST_SECONDS = 2.0
"""A base URL that no connection of this worker has reached yet is given up after this many
connection failures in a row (refused, DNS, TLS) spread over at least this long (rows in flight
fail together: a blip of a moment is not enough): a wrong ``api_base`` stops the job in seconds."""
UNREACHABLE_SECONDS = 60.0
"""A base URL that answered before is given up once every connection fails for this long (a
server restarting is waited for)."""
DRAIN_SECONDS = 5.0
"""After :meth:`Engine.drain`, how long the calls on the wire may take to answer before they are
abandoned (their rows go back to the queue; such a call may have been paid)."""


@dataclass
class _Row:
    job: AsyncJob
    index: str
    body: dict[str, Any]
    fallback: str | None
    url: str = CHAT_URL
    output: str = formats.SEED  # the job's output format: what the result must carry
    sent: dict[str, Any] = field(default_factory=dict)  # the request as the task gave it (body changes)
    attempts: int = 0
    asked_again: int = 0  # answers that did not match the request's JSON schema
    fallback_used: bool = False
    last_key: str | None = None
    too_large_for: set[str] = field(default_factory=set)
    hold_until: float = float("inf")  # monotonic time after which a waiting row is handed back
    to_settle: tuple[Lease, Report] | None = None  # what the answer tells the limiter: sent with the result
    tokens: int = 0  # what its key's token window counts: the prompt's estimate and, where the
    # window counts output too (OpenAI's), the completion's cap (the fallback model keeps it)
    prompt_tokens: int = 0
    cap: int = 0  # the completion's cap (the budget's worst case)
    window_counts_output: bool = True
    granted: Lease | None = None  # the admission its queue gave it, not yet looked at
    ask_alone: bool = False  # its queue found it needs more than a slot: its next admission is its own
    too_large_samples: int = 0  # admissions whose whole sample of keys found the request too large
    sent_ms: int | None = None  # when its last request was sent (its stamp, Redis' clock)
    last_usage: Usage | None = None  # what the last call was billed, when it gave no answer
    cache_key: str | None = None  # the response cache's key of the row's request (cache on)
    cache_entry: str | None = None  # what the cache keeps of the answer, stored with the result
    from_cache: bool = False  # answered by the response cache: no call
    flex_waits: int = 0  # Flex refusals met (flex_fallback false)
    connect_failures: int = 0  # calls that could not connect (no attempt used)
    saved: float = 0.0  # what the cached answer had cost

    def __post_init__(self) -> None:
        self.estimate()

    def estimate(self) -> None:
        self.prompt_tokens, self.cap = estimate_parts(self.body, self.url)
        self.tokens = self.prompt_tokens + (self.cap if self.window_counts_output else 0)

    def window_tokens(self, prompt: int, completion: int) -> int:
        """What the key's token window counted for a call of ``prompt`` and ``completion`` tokens."""
        return prompt + (completion if self.window_counts_output else 0)


@dataclass
class Reach:
    """Whether a base URL can be reached, as this worker's calls found it (the engine's and the
    batch lane's)."""

    answered: bool = False
    failures: int = 0  # connection failures in a row
    failing_since: float | None = None

    def failed(self, now: float) -> bool:
        """Note a connection failure; return True when the base is to be given up."""
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if self.answered:
            return now - self.failing_since >= UNREACHABLE_SECONDS
        return self.failures >= UNREACHABLE_TRIES and now - self.failing_since >= UNREACHABLE_FIRST_SECONDS

    def reached(self) -> None:
        self.answered, self.failures, self.failing_since = True, 0, None


def base_of(key: Any) -> str:
    """The URL a key's calls go to (its Azure endpoint, else its ``api_base``)."""
    return key.azure.endpoint if key.azure is not None else key.api_base


class Engine:
    """Processes rows for one worker process, on that process's event loop.

    Rows run as asyncio tasks, so a row waiting for a slot or for the API costs no thread; at most
    ``config.concurrency`` rows of the process are in flight at once. Build it with :meth:`start`
    inside the loop it will run on.
    """

    def __init__(self, config: Config, client: redis.asyncio.Redis, provider: providers.Provider | None = None) -> None:
        self.config = config
        self.client = client
        self.provider = provider or providers.for_config(config)
        self.prices = Prices({name: p.model_dump() for name, p in config.prices.items()})
        self.keys = config.keys()
        self._by_fingerprint = {k.fingerprint: k for k in self.keys}
        self._providers_of: dict[str, frozenset[str]] = {}
        self.pool = AsyncKeyPool.from_config(client, config, self.keys)
        self.admissions = Admissions(self.pool)
        self.leases = Leases(client, config.lease_seconds)
        self._secrets = [k.secret.get_secret_value() for k in self.keys]
        self._retired: dict[str, tuple[float, dict[str, str]]] = {}
        self._slots = asyncio.Semaphore(config.concurrency)
        self._reach: dict[str, Reach] = {}  # per base URL: did it answer, since when it fails
        self._draining = asyncio.Event()
        self._on_wire: set[asyncio.Task[Any]] = set()  # rows whose API call is under way
        self._abandon = False

    @classmethod
    async def start(cls, config: Config, client: redis.asyncio.Redis, provider: providers.Provider | None = None) -> Engine:
        """Build the engine on the running loop: describe the keys in Redis, open the HTTP session.
        ``provider`` is the API (``providers.for_config(config)`` when None; a test's fake)."""
        engine = cls(config, client, provider)
        await engine.pool.describe()
        await engine.pool.clock.calibrate(client)
        log.info("prompts of %s are counted with: %s; each server's own way is learned from its "
                 "x-ratelimit-*-tokens headers", config.model.name, estimator(config.model.name))
        engine.provider.warm_up()
        engine.leases.start()
        return engine

    async def close(self) -> None:
        """Stop renewing leases; close the HTTP session and the Redis connections of this loop."""
        await self.leases.stop()
        await self.provider.close()
        await self.client.aclose()

    def drain(self, seconds: float = DRAIN_SECONDS) -> None:
        """The worker is shutting down: no call starts from now on. Rows not on the wire end as
        :data:`HANDED_BACK` (the task enqueues them again); the calls on the wire have ``seconds``
        to answer, and their answers are published; then they are abandoned."""
        if self._draining.is_set():
            return
        self._draining.set()
        log.warning("shutting down: no new API call starts; %d calls on the wire get %.0fs to answer",
                    len(self._on_wire), seconds)
        asyncio.get_running_loop().call_later(seconds, self._abandon_calls)

    def _abandon_calls(self) -> None:
        self._abandon = True
        if self._on_wire:
            log.warning("abandoning %d API calls that did not answer in time; their rows go back to the "
                        "queue (a call the server finished anyway may be paid twice)", len(self._on_wire))
        for task in list(self._on_wire):
            task.cancel()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short when the worker starts shutting down."""
        if seconds <= 0 or self._draining.is_set():
            return
        try:
            await asyncio.wait_for(self._draining.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def __repr__(self) -> str:
        return f"<Engine {self.pool!r} concurrency={self.config.concurrency} max_retries={self.config.max_retries}>"

    # -- entry points ---------------------------------------------------------------------------
    async def process_rows(self, job_id: str, rows: Sequence[Sequence[Any]],
                           options: dict[str, Any] | None = None) -> list[str | BaseException]:
        """Run ``[index, body(, url)]`` rows concurrently; return each one's outcome or the Redis error
        that kept it from finishing (such a row is neither done nor lost: run it again).

        First the rows' leases are taken, in one round trip: a row whose lease another worker
        holds waits for that worker's result instead of calling the API.

        A task's message comes back to the queue once it has been unacknowledged for
        ``visibility_timeout``. So a row still waiting for a slot a third of that time after the
        task started is not sent: it ends as :data:`HANDED_BACK`, for the task to enqueue again
        (behind the rows already queued) once :meth:`give_back` has ended its lease.
        """
        hold_until = time.monotonic() + self.config.visibility_timeout / 3
        parts = [split_row(r) for r in rows]
        job = AsyncJob(self.client, job_id)
        try:
            status, codes = await self.leases.take(job, [index for index, _, _ in parts])
        except redis.RedisError as exc:
            return [exc] * len(rows)
        if status == "unknown":
            log.warning("job %s is unknown (reset, or its state expired): %d rows dropped", job_id, len(rows))
            return [DROPPED] * len(rows)
        return await asyncio.gather(*(self.process(job, index, body, options, hold_until, codes.get(index), url)
                                      for index, body, url in parts), return_exceptions=True)

    async def give_back(self, job_id: str, indices: list[str]) -> None:
        """End the leases of rows that are handed back or retried, so their next copy may run."""
        await self.leases.give_up(AsyncJob(self.client, job_id), indices)

    async def process(self, job: AsyncJob, index: str, body: dict[str, Any],
                      options: dict[str, Any] | None = None, hold_until: float = float("inf"),
                      lease: int | None = None, url: str = CHAT_URL) -> str:
        """Run one row to its final result; return what happened (for logs and tests).
        ``lease`` is what taking the row's lease said (None: the job is stopped)."""
        if lease == DONE:
            return DUPLICATE
        if lease == HELD:
            lease = await self._wait_for_lease(job, index, hold_until)
            if isinstance(lease, str):
                return lease
        options = options or {}
        serving = self._serving(body.get("model"))
        row = _Row(job, index, providers.with_required_cap(serving, dict(body)), options.get("fallback"), url=url,
                   sent=body, output=options.get("output", formats.SEED), hold_until=hold_until,
                   window_counts_output=providers.window_counts_output(serving))
        async with self._slots:
            outcome = await self._finish(row)  # a Redis error keeps the lease: the task gives it up
        if outcome != HANDED_BACK:  # else the task gives it up before it enqueues the row again
            self.leases.forget(job.id, index)  # published or given back: Redis ended the lease
        if outcome != PUBLISHED:  # a published row is counted as answered or null by _finish
            metrics.ROWS.labels(outcome).inc()
        return outcome

    async def _wait_for_lease(self, job: AsyncJob, index: str, hold_until: float) -> int | str | None:
        """Another worker holds the row's lease: wait until it publishes (:data:`DUPLICATE`), or
        its lease expires (the lease is ours then), or this task's hold runs out."""
        while True:
            if time.monotonic() + LEASE_POLL > hold_until or self.draining:
                return HANDED_BACK
            await self._pause(LEASE_POLL * random.uniform(0.8, 1.2))
            if self.draining:
                return HANDED_BACK
            status, codes = await self.leases.take(job, [index])
            if status == "unknown":
                return DROPPED
            code = codes.get(index)  # None: the job stopped
            if code != HELD:
                return DUPLICATE if code == DONE else code

    async def _finish(self, row: _Row) -> str:
        job = row.job
        try:
            result: RowResult | str | None = await self._run(row)
        except redis.RedisError:
            raise  # the task runs the row again: Redis is restarting or unreachable
        except Exception as exc:  # a bug must not lose the row: it ends null, with the reason
            log.exception("row %s of job %s: internal error", row.index, job.id)
            result = self._null(row, "internal_error",
                                providers.redact(f"{type(exc).__name__}: {exc}", self._secrets))
        if isinstance(result, str):
            return result
        if result is None:
            return RELEASED if await job.release(row.index) else DUPLICATE
        if result.answer is None and not result.retryable:
            result.request = failure_key(row.url, row.sent, row.fallback)
        published = await self._publish(row, result)
        if published:
            metrics.ROWS.labels("null" if result.answer is None else "answered").inc()
        if result.answer is None and published:
            log.warning("row %s of job %s failed for good: %s (%s)", row.index, job.id,
                        result.error_type, result.error)
        if not published:
            return DUPLICATE
        key = self._by_fingerprint.get(result.key or "")
        return Published.of(f"{key.provider} {key.fingerprint}" if key is not None else result.key)

    async def _publish(self, row: _Row, result: RowResult) -> bool:
        """Settle the row's tokens and publish its result, in one round trip. The result may be a
        paid answer: a Redis error retries the publication, never the call."""
        def settle_and_publish(pipe: Any) -> None:
            if row.to_settle is not None:
                self.pool.queue_report(*row.to_settle, pipe)
            if row.cache_entry is not None and self.config.cache is not None:
                pipe.set(row.cache_key, row.cache_entry, ex=int(self.config.cache.ttl))
            if row.from_cache:
                row.job.queue_cache_hit(nano(row.saved), pipe)
            row.job.queue_publish(result, pipe)

        deadline = time.monotonic() + PUBLISH_PATIENCE
        delay = 1.0
        while True:
            try:
                return bool((await run_pipeline(self.client, settle_and_publish, durable=True))[-1])
            except redis.RedisError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("row %s of job %s: Redis did not take its result (%s); trying again in %.0fs",
                            row.index, row.job.id, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self, row: _Row) -> RowResult | str | None:
        """Return the row's final result, None when the job stopped (the row stays unanswered),
        or an outcome: :data:`DUPLICATE` (another copy of the row finished it or took it over),
        :data:`DROPPED` (the job is gone) or :data:`HANDED_BACK`."""
        if self.config.cache is not None:
            row.cache_key = rkeys.cached_answer(request_hash(row.url, row.body))
            kept = await self.client.get(row.cache_key)
            if kept is not None:
                return self._from_cache(row, json.loads(kept))
        while True:
            if self.draining:  # the worker is shutting down: no call starts; the row goes back
                if row.granted is not None:
                    await self.pool.cancel(row.granted)
                    row.granted = None
                return HANDED_BACK
            model = row.body["model"]
            exclude = await self._retired_for(row.job) | row.too_large_for
            status, done, lease = await self._admit(row, model, exclude)  # again after every wait
            if self.draining and isinstance(lease, Lease):
                await self.pool.cancel(lease)
                return HANDED_BACK
            if status != "running" or done:
                if isinstance(lease, Lease):
                    await self.pool.cancel(lease)
                if status is None:
                    return DROPPED
                return None if status == STOPPED else DUPLICATE
            if isinstance(lease, BudgetReached):
                await budgets.stop_for_budget(row.job)
                return None
            if lease is None and row.too_large_for:
                return self._null(row, "request_too_large",
                                  f"every usable key serving {model} refused the request as too large "
                                  f"for its tokens-per-minute limit", retryable=False)
            if lease is None:
                await self._stop_no_keys(row.job, model)
                return None
            if isinstance(lease, Wait) and lease.too_large:
                row.too_large_samples += 1
                if row.too_large_samples >= TOO_LARGE_SAMPLES:  # more keys than a sample: unlikely all
                    lease = Never(row.tokens)                   # 5 samples missed one that fits
            if isinstance(lease, Wait):
                if not await (self._wait_in_queue(row, model, exclude) if not lease.too_large
                              else self._wait_to_sample(row, model, lease)):
                    return HANDED_BACK
                continue
            if isinstance(lease, Never):
                return self._null(row, "request_too_large",
                                  f"the request needs about {lease.tokens} tokens, more than the "
                                  f"tokens-per-minute limit of every key serving {model}", retryable=False)
            outcome = await self._call(row, lease)
            if outcome is not None:
                return outcome

    async def _wait_in_queue(self, row: _Row, model: str, exclude: set[str]) -> bool:
        """Wait for a slot (or the job's budget) in the worker's queue for the row's kind; False
        when the task's hold is spent (the row is handed back)."""
        # Waiting for a slot (or for the job's budget) is not an attempt. The row queues
        # with the worker's other waiting rows (admission.py), admitted in order as slots
        # free; every second it looks at its job's state (stopped, or the row done by
        # another copy) and retired keys, and leaves the queue when they changed. It is
        # handed back when its task's hold is spent (a per-day limit), not before: else
        # every copy of a row that waits longer than a hold would go round the queue
        # non-stop.
        left = row.hold_until - time.monotonic()
        if left <= 0:
            return False

        async def still_wanted() -> bool:
            if self.draining:
                return False
            if await self._retired_for(row.job) | row.too_large_for != exclude:
                return False
            replies = await run_pipeline(self.client, lambda pipe: row.job.queue_state(row.index, pipe))
            status, done = row.job.read_state(row.index, replies)
            lost = (row.job.id, row.index) in self.leases.lost
            return status == "running" and not done and not lost

        t0 = time.monotonic()
        got = await self.admissions.wait(model, row.tokens, exclude, self._budget(row, model), left,
                                         still_wanted, prompt=row.prompt_tokens, output=row.cap)
        metrics.WAITS.labels(model).inc()
        metrics.WAIT_SECONDS.labels(model).inc(time.monotonic() - t0)
        if isinstance(got, Lease):
            row.granted = got
        row.ask_alone = got == RETRY  # it needs more than a slot: its own admission says what
        return True

    async def _wait_to_sample(self, row: _Row, model: str, lease: Wait) -> bool:
        """A sample of the keys found the request too large: wait to look again; False when the
        task's hold is spent first (the row is handed back)."""
        # A sample of the keys found the request too large: look again later, spread so
        # that such rows do not ask in step.
        delay = lease.seconds * random.uniform(0.8, 1.0)  # at most SAMPLE_POLL
        if time.monotonic() + delay > row.hold_until:
            # Not before the hold is spent: handed back at once, every copy of a row that
            # waits longer than a hold would go round the queue non-stop.
            await self._pause(max(0.0, row.hold_until - time.monotonic()))
            return False
        delay += random.uniform(0, WAKE_SPREAD)
        metrics.WAITS.labels(model).inc()
        metrics.WAIT_SECONDS.labels(model).inc(delay)
        await self._pause(delay)
        return True

    def _serving(self, model: str | None) -> frozenset[str]:
        """The providers of the keys that serve ``model`` (cached)."""
        found = self._providers_of.get(model or "")
        if found is None:
            found = self._providers_of[model or ""] = providers.serving(self.keys, model or "")
        return found

    def _budget(self, row: _Row, model: str) -> Budget:
        """The row's share of its job's budget: its worst case (the prompt's estimate and the
        completion's cap at the model's prices; 0 dollars when the price is unknown)."""
        worst = self.prices.cost(model, row.url, row.body, row.prompt_tokens, row.cap)
        return budgets.share(row.job, nano(worst), row.tokens)

    async def _admit(self, row: _Row, model: str,
                     exclude: set[str]) -> tuple[str | None, bool, Lease | Wait | Never | BudgetReached | None]:
        """``(job status, row done, admission)`` in one round trip. The admission is the one the
        row's queue gave it, if any; else, when rows of its kind are queued already, a
        :class:`Wait` (it queues behind them); else it asks for itself."""
        budget = self._budget(row, model)
        granted, row.granted = row.granted, None
        if granted is not None and granted.key.fingerprint in exclude:  # retired while it waited
            await self.pool.cancel(granted)
            granted = None
        queued = granted is None and not row.ask_alone and self.admissions.waiting(model, exclude, budget)
        row.ask_alone = False
        plan = None if granted is not None or queued else self.pool.plan(model, row.tokens, exclude, budget,
                                                                               row.prompt_tokens, row.cap)

        def state_and_acquire(pipe: Any) -> None:
            row.job.queue_state(row.index, pipe)
            if plan is not None:
                self.pool.queue_acquire(plan, pipe)

        t0 = time.monotonic()
        replies = await run_pipeline(self.client, state_and_acquire)
        status, done = row.job.read_state(row.index, replies[:2])
        if (row.job.id, row.index) in self.leases.lost:
            done = True  # another worker took the row over while this one stalled: it is theirs
        if granted is not None:
            return status, done, granted
        if queued:
            return status, done, Wait(0.0)
        if plan is None:
            return status, done, None
        admission = self.pool.granted(plan, replies[-1])
        self.pool.clock.observe(t0, time.monotonic(), int(replies[-1][0]))
        return status, done, admission

    async def _call(self, row: _Row, lease: Lease) -> RowResult | str | None:
        """One API call; return the final result, None to go round the loop again, or
        :data:`HANDED_BACK` when a shutdown abandoned the call."""
        row.last_key = lease.key.fingerprint
        sent: list[asyncio.Future[int]] = []  # the send-time stamp, once the request leaves

        def on_send() -> None:
            # Runs just before the request's bytes are written: read the time now, on Redis'
            # clock, and let the stamp carry it to Redis (in the background: no round trip, so
            # no loop lag, between the reading and the sending).
            sent.append(asyncio.ensure_future(self.pool.stamp(lease, self.pool.clock.now_ms())))

        timeout = (self.config.flex_timeout if row.body.get("service_tier") == "flex"
                   else self.config.request_timeout)  # Flex answers slowly: allow for it
        task = asyncio.current_task()
        try:
            if task is not None:
                self._on_wire.add(task)
            try:
                answer = await self.provider.call(lease.key, row.url, row.body, timeout, on_send=on_send)
            finally:
                if task is not None:
                    self._on_wire.discard(task)
        except asyncio.CancelledError:
            if not self._abandon:
                raise
            return await self._abandoned(lease, row, sent[0] if sent else None)
        except Exception as exc:  # every failure is classified; none escapes as a crash
            return await self._after_failure(row, lease, exc, sent[0] if sent else None)
        return await self._after_answer(row, lease, answer, sent[0] if sent else None)

    async def _abandoned(self, lease: Lease, row: _Row, stamped: asyncio.Future[int] | None) -> str:
        """A shutdown abandoned the call (see :meth:`drain`): the row goes back; the call may have
        been paid, so a call that left keeps its whole reservation."""
        current = asyncio.current_task()
        if current is not None and hasattr(current, "uncancel"):
            current.uncancel()  # the cancel was ours and is handled: later timeouts work as usual
        if stamped is not None:
            await stamped
        await self.pool.report(lease, Report(sent=stamped is not None, used_tokens=row.tokens, answered=None))
        return HANDED_BACK

    async def _after_failure(self, row: _Row, lease: Lease, exc: Exception,
                             stamped: asyncio.Future[int] | None) -> RowResult | None:
        """Tell the limiter what the failed call used and said, then apply the error policy."""
        failure = self.provider.classify(exc)
        failure.message = providers.redact(failure.message, self._secrets)
        if failure.kind is not providers.Kind.UNREACHABLE and failure.status is not None:
            self._reach.setdefault(base_of(lease.key), Reach()).reached()
        # An error status is not billed; a 200 without a usable answer (a refusal) is.
        paid = getattr(exc, "usage", None)
        row.last_usage = self._usage(row, answers.Reply(value=None, usage=paid)) if paid else None
        if stamped is not None:
            await stamped  # the stamp reaches Redis before the lease is settled
        kind = failure.kind
        used = row.window_tokens(row.last_usage.input_tokens, row.last_usage.output_tokens) if row.last_usage else 0
        verdict = {providers.Kind.RATE_LIMITED: "429tok" if failure.tokens else "429",
                   providers.Kind.SLOW_DOWN: "slow"}.get(kind)
        # a dead key's probe stays out (no second call); a transient failure says nothing of the key
        answered = None if kind is providers.Kind.KEY_DEAD else kind not in (providers.Kind.TRANSIENT,
                                                                             providers.Kind.UNREACHABLE)
        left = await self.pool.report(lease, Report(
            sent=stamped is not None, used_tokens=used, usage=row.last_usage,
            refused=kind is providers.Kind.RATE_LIMITED, output_refused=failure.output, error=failure.reason,
            verdict=verdict,
            cooldown=(failure.retry_after or 1.0) if verdict != "slow" else 0.0,
            server=failure.server_limits if verdict != "slow" else {}, answered=answered))
        metrics.observe_call(lease.key.fingerprint, row.body["model"], str(failure.status or failure.reason),
                             row.last_usage)
        if kind is providers.Kind.RATE_LIMITED:
            log.info("key %s rate limited by the server; cooling for %.1fs", lease.key.fingerprint, left)
        elif kind is providers.Kind.SLOW_DOWN:
            log.info("key %s: the server asks to slow down; its per-minute limits are halved and "
                     "ramp back", lease.key.fingerprint)
        return await self._on_failure(row, lease, failure)

    async def _after_answer(self, row: _Row, lease: Lease, answer: providers.Answer,
                            stamped: asyncio.Future[int] | None) -> RowResult | None:
        """A 200: stamp and settle it, check a structured answer (asking again when it may), and
        build the row's result."""
        reach = self._reach.get(base_of(lease.key))
        if reach is None or reach.failures or not reach.answered:
            self._reach.setdefault(base_of(lease.key), Reach()).reached()
        row.sent_ms = None
        try:  # bookkeeping: a Redis error here must not throw the paid answer away
            if stamped is not None:
                row.sent_ms = await stamped
            else:  # not seen leaving (an HTTP stack without the hook): stamp late, the safe side
                row.sent_ms = await self.pool.stamp(lease)
        except redis.RedisError as exc:
            log.warning("row %s: the limiter's bookkeeping failed after the call (%s); the answer "
                        "is kept", row.index, type(exc).__name__)
        reply = answer.reply
        used = row.window_tokens(reply.prompt_tokens, reply.completion_tokens)
        usage = self._usage(row, reply)
        row.to_settle = (lease, Report(used_tokens=used, usage=usage, server=answer.server_limits,
                                       sent_ms=row.sent_ms, window=answer.token_window,
                                       window_rounding=answer.token_rounding,
                                       prompt_counted=answer.prompt_counted, output_window=answer.output_window,
                                       output_tokens=reply.completion_tokens))
        metrics.observe_call(lease.key.fingerprint, row.body["model"], "200", usage)
        parsed, problem, final = answers.structured(row.url, row.body, reply)
        if problem is not None and not final and row.asked_again < self.config.schema_retries:
            # Ask again with what was wrong; this call is paid and settled now, not with the result.
            await self.pool.report(*row.to_settle)
            row.to_settle = None
            row.asked_again += 1
            log.info("row %s: the answer does not match the JSON schema (%s); asking again (%d/%d)",
                     row.index, problem, row.asked_again, self.config.schema_retries)
            row.body = ask_again(row.url, row.body, reply.text, problem)
            row.estimate()
            return None
        if row.cache_key is not None and problem is None:
            row.cache_entry = json.dumps({"body": answer.body, "request_id": answer.request_id, "cost": usage.cost,
                                          "model": row.body["model"]}, ensure_ascii=False)
        return formats.answered(row.index, reply, parsed, problem, output=row.output, key=lease.key.fingerprint,
                                model=row.body["model"], attempts=row.attempts + row.asked_again + 1,
                                cost=usage.cost, request_id=answer.request_id, body=answer.body)

    def _from_cache(self, row: _Row, kept: dict[str, Any]) -> RowResult:
        """The row's result from the response cache: the answer a job got to the same request."""
        reply = answers.read(row.url, kept["body"])
        parsed, _problem, _final = answers.structured(row.url, row.body, reply)
        row.from_cache, row.saved = True, kept.get("cost") or 0.0
        detail = formats.detail(row.output, reply, parsed, kept.get("request_id"), kept["body"])
        if detail is not None and row.output == formats.FULL:
            detail["from_cache"] = True
        return RowResult(index=row.index, answer=reply.value, model=kept.get("model"),
                         warning=answers.warning(reply), detail=detail, cost=0.0)

    def _usage(self, row: _Row, reply: answers.Reply) -> Usage:
        """What a call used and cost, from its response's usage."""
        return self.prices.usage(row.body["model"], row.url, row.body, reply)

    async def _on_failure(self, row: _Row, lease: Lease, f: providers.Failure) -> RowResult | None:
        fp = lease.key.fingerprint
        if f.kind is providers.Kind.RATE_LIMITED:
            return None  # cooled in _call; the row goes round the loop to a slot
        if f.kind is providers.Kind.SLOW_DOWN:
            await self._pause(f.retry_after or 0.0)
            return None
        if f.kind is providers.Kind.FLEX_UNAVAILABLE:
            if self.config.flex_fallback and row.body.get("service_tier") == "flex":
                # Flex capacity is short now: this row goes at the standard tier (and price)
                log.info("row %s: Flex capacity unavailable; sending it at the standard tier", row.index)
                row.body = {k: v for k, v in row.body.items() if k != "service_tier"}
                return None
            row.flex_waits += 1  # Flex only (flex_fallback false): wait and ask again, no attempt used
            await self._pause(self._backoff(min(row.flex_waits, 8), f.retry_after))
            return None
        if f.kind is providers.Kind.TOO_LARGE:
            row.too_large_for.add(fp)  # this row can never pass on this key; others still can
            return None
        if f.kind is providers.Kind.KEY_DEAD:
            if await row.job.retire_key(fp, f"{f.status} {f.reason}: {f.message}"):
                log.warning("key %s retired for job %s: %s %s", fp, row.job.id, f.status, f.reason)
            self._retired.pop(row.job.id, None)
            return None
        if f.kind is providers.Kind.UNREACHABLE:
            # Nothing reached the server, so nothing was paid and no attempt is used; the row tries
            # again (another key, or this one after a pause) until the base is given up.
            base = base_of(lease.key)
            if self._reach.setdefault(base, Reach()).failed(time.monotonic()):
                await self._give_up_base(row.job, base, f.message)
                return None
            row.connect_failures += 1
            await self._pause(self._backoff(min(row.connect_failures, 8), None))
            return None
        if f.kind is providers.Kind.TRANSIENT:
            row.attempts += 1
            if row.attempts > self.config.max_retries:
                return self._null(row, f.reason, f.message)
            delay = self._backoff(row.attempts, f.retry_after)
            log.info("row %s: %s, retry %d/%d in %.2fs", row.index, f.reason, row.attempts,
                     self.config.max_retries, delay)
            await self._pause(delay)
            return None
        if f.kind is providers.Kind.TOO_LONG:
            row.attempts += 1
            if row.fallback and not row.fallback_used and row.url == CHAT_URL:  # the job's chat fallback
                log.info("row %s too long for %s; trying %s", row.index, row.body["model"], row.fallback)
                row.body["model"], row.fallback_used = row.fallback, True
                return None
            return self._null(row, f.reason, f.message, retryable=False)
        if f.kind is providers.Kind.JOB_CONFIG:
            if await row.job.stop(f"the API refused the job's request: {f.status} {f.reason}: {f.message}"):
                log.error("job %s stopped: %s %s: %s", row.job.id, f.status, f.reason, f.message)
            return None
        row.attempts += 1
        return self._null(row, f.reason, f.message, retryable=f.kind not in providers.FINAL_KINDS)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's hint."""
        cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        return max(hint or 0.0, random.uniform(cap / 2, cap))

    def _null(self, row: _Row, error_type: str, message: str, retryable: bool = True) -> RowResult:
        spent = row.last_usage
        return RowResult(index=row.index, answer=None, error_type=error_type, retryable=retryable,
                         error=message, attempts=row.attempts, key=row.last_key, model=row.body["model"],
                         **({"prompt_tokens": spent.input_tokens, "completion_tokens": spent.output_tokens,
                             "cached_tokens": spent.cached_tokens, "reasoning_tokens": spent.reasoning_tokens,
                             "cost": spent.cost} if spent else {}))

    # -- retired keys ---------------------------------------------------------------------------
    async def _retired_for(self, job: AsyncJob) -> set[str]:
        """The job's retired keys, read from Redis at most once a second per job."""
        now = time.monotonic()
        cached = self._retired.get(job.id)
        if cached is None or now - cached[0] >= RETIRED_CACHE_SECONDS:
            cached = self._retired[job.id] = (now, await job.retired_keys())
        return set(cached[1])

    async def _give_up_base(self, job: AsyncJob, base: str, message: str) -> None:
        await give_up_base(job, self.keys, base, message)
        self._retired.pop(job.id, None)

    async def _stop_no_keys(self, job: AsyncJob, model: str) -> None:
        reason = no_keys_reason(await job.retired_keys(), model)
        if await job.stop(reason):
            log.error("job %s stopped: %s", job.id, reason)


async def give_up_base(job: AsyncJob, keys: list[ApiKey], base: str, message: str) -> None:
    """Retire, for the job, every key whose calls go to ``base``: it cannot be reached."""
    shown = redact_url(base)
    for key in keys:
        if base_of(key) == base and await job.retire_key(key.fingerprint, f"{UNREACHABLE_MARK} {shown}: {message}"):
            log.error("key %s retired for job %s: %s cannot be reached (%s)", key.fingerprint, job.id,
                      shown, message)


def no_keys_reason(retired: dict[str, str], model: str) -> str:
    """Why a job stops when no key may serve ``model`` (``retired``: the job's retired keys and why)."""
    unreachable = sorted({why for why in retired.values() if why.startswith(UNREACHABLE_MARK)})
    if retired and len(unreachable) == len(set(retired.values())):
        return (f"no api_base serving {model} can be reached: " + "; ".join(
            why[len(UNREACHABLE_MARK) + 1:] for why in unreachable) + ". Check api_base in the config "
            "(and the network), then run the same command again; the unanswered rows stay unanswered.")
    if retired:
        detail = "; ".join(f"{fp}: {why}" for fp, why in sorted(retired.items()))
        return (f"every key serving {model} is retired ({detail}). The unanswered rows stay "
                f"unanswered: add working keys and run the same command again.")
    return (f"no configured key serves model {model}; add it to a key's \"models\" "
            f"or remove the \"models\" restriction.")
