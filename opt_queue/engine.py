"""The error policy: take a slot, call the API, act on the outcome, publish the row's result.

One :class:`Engine` per worker process holds the config, the Redis connection and the key pool;
:meth:`Engine.process` is everything a row task does. The policy (see the README):

=============  ===========================================  =========================================
class          examples                                     what happens
=============  ===========================================  =========================================
rate limited   429 rate_limit_exceeded                      cool the key, other key, no attempt used
key dead       401, 403, 429 insufficient_quota             retire the key for the job, other key
transient      5xx, timeout, connection error, bad body     backoff with jitter, up to max_retries
too long       400 context_length_exceeded                  once on the fallback model, else null
job config     404 model not found, unknown parameter       stop the job with the API's message
other 4xx      invalid request for this row                 null with the reason
=============  ===========================================  =========================================
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from opt_queue import client as api
from opt_queue.config import Config
from opt_queue.jobs import Job, RowResult
from opt_queue.limiter import KeyPool, Lease, Never, Wait, estimate_tokens, minute_limit

log = logging.getLogger(__name__)

MAX_SLEEP = 5.0
RETIRED_CACHE_SECONDS = 1.0


@dataclass
class _Row:
    job: Job
    seq: int
    index: str
    body: dict[str, Any]
    fallback: str | None
    attempts: int = 0
    fallback_used: bool = False
    last_key: str | None = None
    too_large_for: set[str] = field(default_factory=set)
    to_settle: tuple[Lease, int] | None = None  # sent with the result, in one round trip
    tokens: int = 0  # TPM estimate, computed once: waits and the fallback model do not change it

    def __post_init__(self) -> None:
        self.tokens = estimate_tokens(self.body)


class Engine:
    """Processes rows for one worker process (thread-safe: one engine serves every pool thread)."""

    def __init__(self, config: Config, client: redis.Redis) -> None:
        self.config = config
        self.client = client
        self.keys = config.keys()
        self.pool = KeyPool(client, self.keys, margin=config.safety_margin)
        self._secrets = [k.secret.get_secret_value() for k in self.keys]
        api.warm_up(self.keys, config.request_timeout)
        self._retired: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Engine {self.pool!r} max_retries={self.config.max_retries}>"

    # -- entry point ----------------------------------------------------------------------------
    def process(self, job_id: str, seq: int, index: str, body: dict[str, Any],
                options: dict[str, Any] | None = None) -> str:
        """Run one row to its final result; return what happened (for logs and tests)."""
        job = Job(self.client, job_id)
        row = _Row(job, seq, index, dict(body), (options or {}).get("fallback"))
        try:
            result = self._run(row)
        except redis.RedisError:
            raise  # the task retries: Redis is restarting or unreachable
        except Exception as exc:  # a bug must not lose the row: it ends null, with the reason
            log.exception("row %s of job %s: internal error", index, job_id)
            result = self._null(row, "internal_error", api.redact(f"{type(exc).__name__}: {exc}", self._secrets))
        if result is None:
            return "released" if job.release(seq) else "duplicate"
        pipe = self.client.pipeline(transaction=False)
        if row.to_settle is not None:
            self.pool.settle(*row.to_settle, pipe=pipe)
        job.publish(result, pipe=pipe)
        published = bool(pipe.execute()[-1])
        if result.answer is None and published:
            log.warning("row %s of job %s failed for good: %s (%s)", index, job_id,
                        result.error_type, result.error)
        return "published" if published else "duplicate"

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, row: _Row) -> RowResult | None:
        """Return the row's final result, or None when the job stopped (the row stays unanswered)
        or another delivery of the row finished first."""
        while True:
            stopped, done = row.job.state(row.seq)  # checked again after every wait
            if stopped or done:
                return None
            model = row.body["model"]
            lease = self.pool.acquire(model, row.tokens, self._retired_for(row.job) | row.too_large_for)
            if lease is None and row.too_large_for:
                return self._null(row, "request_too_large",
                                  f"every usable key serving {model} refused the request as too large "
                                  f"for its tokens-per-minute limit")
            if lease is None:
                self._stop_no_keys(row.job, model)
                return None
            if isinstance(lease, Wait):
                time.sleep(min(lease.seconds, MAX_SLEEP))  # waiting for a slot is not an attempt
                continue
            if isinstance(lease, Never):
                return self._null(row, "request_too_large",
                                  f"the request needs about {lease.tokens} tokens, more than the "
                                  f"tokens-per-minute limit of every key serving {model}")
            outcome = self._call(row, lease)
            if outcome is not None:
                return outcome

    def _call(self, row: _Row, lease: Lease) -> RowResult | None:
        """One API call; return the final result, or None to go round the loop again."""
        row.last_key = lease.key.fingerprint
        sent = False

        def on_send() -> None:
            nonlocal sent
            sent = True
            self.pool.stamp(lease)

        try:
            answer = api.call(lease.key, row.body, self.config.request_timeout, on_send=on_send)
        except Exception as exc:  # every failure is classified; none escapes as a crash
            failure = api.classify(exc)
            failure.message = api.redact(failure.message, self._secrets)
            if sent:
                self.pool.settle(lease, 0)
            else:
                self.pool.cancel(lease)
            self.pool.count_error(lease.key, failure.reason)
            return self._on_failure(row, lease, failure)
        row.to_settle = (lease, answer.prompt_tokens + answer.completion_tokens)
        self._learn(lease, answer.headers)
        return RowResult(seq=row.seq, index=row.index, answer=answer.text, attempts=row.attempts + 1,
                         key=lease.key.fingerprint, model=row.body["model"],
                         prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)

    def _on_failure(self, row: _Row, lease: Lease, f: api.Failure) -> RowResult | None:
        fp = lease.key.fingerprint
        if f.kind is api.Kind.RATE_LIMITED:
            seconds = f.retry_after if f.retry_after is not None else 1.0
            left = self.pool.cool(lease.key, seconds, f.server_limits)
            log.info("key %s rate limited by the server; cooling for %.1fs", fp, left)
            return None
        if f.kind is api.Kind.TOO_LARGE:
            row.too_large_for.add(fp)  # this row can never pass on this key; others still can
            return None
        if f.kind is api.Kind.KEY_DEAD:
            if row.job.retire_key(fp, f"{f.status} {f.reason}: {f.message}"):
                log.warning("key %s retired for job %s: %s %s", fp, row.job.id, f.status, f.reason)
            self._forget_retired(row.job)
            return None
        if f.kind is api.Kind.TRANSIENT:
            row.attempts += 1
            if row.attempts > self.config.max_retries:
                return self._null(row, f.reason, f.message)
            delay = self._backoff(row.attempts, f.retry_after)
            log.info("row %s: %s, retry %d/%d in %.2fs", row.index, f.reason, row.attempts,
                     self.config.max_retries, delay)
            time.sleep(delay)
            return None
        if f.kind is api.Kind.TOO_LONG:
            row.attempts += 1
            if row.fallback and not row.fallback_used:
                log.info("row %s too long for %s; trying %s", row.index, row.body["model"], row.fallback)
                row.body["model"], row.fallback_used = row.fallback, True
                return None
            return self._null(row, f.reason, f.message)
        if f.kind is api.Kind.JOB_CONFIG:
            if row.job.stop(f"the API refused the job's request: {f.status} {f.reason}: {f.message}"):
                log.error("job %s stopped: %s %s: %s", row.job.id, f.status, f.reason, f.message)
            return None
        row.attempts += 1
        return self._null(row, f.reason, f.message)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's hint."""
        cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        return max(hint or 0.0, random.uniform(cap / 2, cap))

    def _null(self, row: _Row, error_type: str, message: str) -> RowResult:
        return RowResult(seq=row.seq, index=row.index, answer=None, error_type=error_type,
                         error=message, attempts=row.attempts, key=row.last_key, model=row.body["model"])

    def _learn(self, lease: Lease, headers: dict[str, str]) -> None:
        """Lower the bucket's minute windows when a success reports lower server limits."""
        server = api.server_limits(headers)
        lower = {dim: v for dim, v in server.items()
                 if (mine := minute_limit(lease.limits, dim)) is not None and v < mine}
        if lower:
            self.pool.cool(lease.key, 0, lower)

    # -- retired keys ---------------------------------------------------------------------------
    def _retired_for(self, job: Job) -> set[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._retired.get(job.id)
            if cached and now - cached[0] < RETIRED_CACHE_SECONDS:
                return set(cached[1])
        retired = job.retired_keys()
        with self._lock:
            self._retired[job.id] = (now, retired)
        return set(retired)

    def _forget_retired(self, job: Job) -> None:
        with self._lock:
            self._retired.pop(job.id, None)

    def _stop_no_keys(self, job: Job, model: str) -> None:
        retired = job.retired_keys()
        if retired:
            detail = "; ".join(f"{fp}: {why}" for fp, why in sorted(retired.items()))
            reason = (f"every key serving {model} is retired ({detail}). The unanswered rows stay "
                      f"unanswered: add working keys and run the same command again.")
        else:
            reason = (f"no configured key serves model {model}; add it to a key's \"models\" "
                      f"or remove the \"models\" restriction.")
        if job.stop(reason):
            log.error("job %s stopped: %s", job.id, reason)
