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

An admission is first **reserved** (it counts, and cannot expire) and then **stamped** with the
moment its request was sent, on Redis' clock (``lua/stamp.lua``; the worker reads that moment
locally with :class:`RedisClock` right before the request body is written): the server counts a
request when it arrives, and under load a request can wait a long time for the event loop or a
connection between admission and sending. The **safety margin** (config ``safety_margin``,
seconds) lengthens every window to cover what is left: the short, jittery delay between the send
and the server's own count.

An admission looks at every bucket that serves the model up to ``ACQUIRE_SAMPLE``, else at a
random sample of that many, so that its cost does not grow with the number of keys.

Keys of one ``group`` share one bucket (one set of windows), since limits belong to organizations.
A 429 cools the bucket (``lua/cool.lua``) and lowers its minute windows to the server's
``x-ratelimit-limit-*``. After a response, a real usage above the admission's estimate raises
it (``lua/settle.lua``); a smaller one gives nothing back, as on the server.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from opt_queue import keys as rkeys
from opt_queue.config import ApiKey, Limits, Window
from opt_queue.scripts import queue, run_pipeline, scripts_for

CHARS_PER_TOKEN = 3.0
"""Character-based estimate, used unless tiktoken's encoding is on this machine: OpenAI's
tokenizers give about 4 characters per token in English, so dividing by 3 overestimates, which is
the safe side (the estimate is replaced by the real usage after the response)."""
TOKENS_PER_MESSAGE = 4
DEFAULT_COMPLETION_ESTIMATE = 256
TIKTOKEN_ENCODING = "cl100k_base"
_TIKTOKEN_URL = f"https://openaipublic.blob.core.windows.net/encodings/{TIKTOKEN_ENCODING}.tiktoken"


@functools.cache
def _tokenizer() -> Callable[[str], int] | None:
    """tiktoken's encoder when tiktoken is installed and its encoding file is already cached here
    (never downloaded: workers may have no internet); else None (character estimate)."""
    if os.environ.get("OPT_QUEUE_TOKENIZER", "auto") == "chars":
        return None
    try:
        import tiktoken  # optional
    except ImportError:
        return None
    cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(_TIKTOKEN_URL.encode()).hexdigest())):
        return None
    try:
        encoding = tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except Exception:  # a corrupt cache or an incompatible version: fall back, never fail a row
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def count_prompt_tokens(text: str) -> int:
    """Tokens of ``text``: tiktoken's count when available, else the character estimate."""
    tokenize = _tokenizer()
    return tokenize(text) if tokenize else math.ceil(len(text) / CHARS_PER_TOKEN)


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
"""A bucket that answered (anything but a dead key's error) within this long takes any number of
requests at once; otherwise it is probed: one request in flight until one answers, so a revoked or
spent key costs one call, not a burst, whatever the number of workers."""


def estimate_tokens(body: dict[str, Any], completion_default: int = DEFAULT_COMPLETION_ESTIMATE) -> int:
    """Estimate the tokens a request counts against TPM: prompt plus the completion's maximum."""
    texts = []
    messages = body.get("messages") or []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            texts.append(json.dumps(content, ensure_ascii=False))
    prompt = count_prompt_tokens("\n".join(texts)) + TOKENS_PER_MESSAGE * len(messages) + 3
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or completion_default
    return prompt + int(completion) * int(body.get("n") or 1)


def learn_flags(windows: tuple[Window, ...]) -> list[bool]:
    """Mark the window a server's ``x-ratelimit-limit-*`` value describes: the per-minute one.

    That is the longest window of at most 60 s, or the shortest window when all are longer.
    """
    if not windows:
        return []
    short = [w.period for w in windows if w.period <= 60]
    target = max(short) if short else min(w.period for w in windows)
    return [w.period == target for w in windows]


def minute_limit(limits: Limits, dim: str) -> int | None:
    """The configured limit of the window that ``learn_flags`` marks, for ``requests`` or ``tokens``."""
    windows = limits.requests if dim == "requests" else limits.tokens
    for w, learn in zip(windows, learn_flags(windows)):
        if learn:
            return w.limit
    return None


@dataclass(frozen=True)
class Lease:
    """A granted admission: the key to call with and what to settle afterwards."""

    key: ApiKey
    uid: str
    tokens: int
    bucket: str
    limits: Limits
    at_ms: int = 0


@dataclass(frozen=True)
class Wait:
    """No key can admit now; ``seconds`` until the earliest might (``exact``), or until it is
    worth looking again (a sample of the keys was full; others may not be)."""

    seconds: float
    at_ms: int = 0
    exact: bool = True


@dataclass(frozen=True)
class Never:
    """No key serving the model can ever admit a request this large (TPM window too small)."""

    tokens: int


@dataclass(frozen=True)
class _AcquirePlan:
    """One ``acquire.lua`` call: its keys and arguments, and how to read its reply."""

    order: list[str]
    cands: dict[str, list[ApiKey]]
    keys: list[str]
    args: list[Any]
    tokens: int


class _PoolBase:
    """What the sync and asyncio key pools share: the keys, and every script call's arguments.

    The two pools differ only in how they talk to Redis (``redis.Redis`` in the producer's and
    tests' processes, ``redis.asyncio.Redis`` in the worker's event loop).
    """

    def __init__(self, client: Any, keys: list[ApiKey], margin: float = 0.25, probe: float = 0.0) -> None:
        self.client = client
        self.keys = list(keys)
        self.margin_ms = int(margin * 1000)
        self.probe_ms = int(probe * 1000)
        self._scripts = scripts_for(client)
        self._rr = itertools.count()
        self.buckets: dict[str, list[ApiKey]] = {}
        for k in self.keys:
            self.buckets.setdefault(k.bucket, []).append(k)
        self._candidates: dict[tuple[str, frozenset[str]], dict[str, list[ApiKey]]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.keys)} keys in {len(self.buckets)} buckets>"

    def _describe(self, pipe: Any) -> None:
        """Describe the keys in Redis for ``status`` (fingerprints and limits, never secrets)."""
        for k in self.keys:
            windows = [["req", w.period] for w in k.limits.requests] + [
                ["tok", w.period] for w in k.limits.tokens]
            desc = {"bucket": k.bucket, "limits": str(k.limits), "windows": windows,
                    "models": list(k.models or []), "api_base": k.api_base}
            pipe.hset(rkeys.KNOWN_KEYS, k.fingerprint, json.dumps(desc))

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

    def _plan_acquire(self, model: str, tokens: int, exclude: set[str] | None) -> _AcquirePlan | None:
        cands = self.candidates(model, exclude or set())
        if not cands:
            return None
        # Ties in headroom go to a random bucket, not always the first; beyond ACQUIRE_SAMPLE
        # buckets a random sample keeps the script's cost flat in the number of keys.
        order = random.sample(list(cands), min(len(cands), ACQUIRE_SAMPLE))
        ks: list[str] = []
        argv: list[Any] = [tokens, self.margin_ms, uuid.uuid4().hex[:16], len(order), RESERVE_MS, self.probe_ms]
        for bucket in order:
            limits = cands[bucket][0].limits
            ks.append(rkeys.bucket_state(bucket))
            argv += [len(limits.requests), len(limits.tokens)]
            for dim, windows in (("req", limits.requests), ("tok", limits.tokens)):
                for w, learn in zip(windows, learn_flags(windows)):
                    ks.append(rkeys.bucket_window(bucket, dim, w.period))
                    argv += [w.limit, int(w.period * 1000), int(learn)]
        return _AcquirePlan(order, cands, ks, argv, tokens)

    def _granted(self, plan: _AcquirePlan, res: list[Any]) -> Lease | Wait | Never:
        status = int(res[0])
        if status == -1 and (len(plan.order) == len(plan.cands) or not any(
                all(w.limit >= plan.tokens for w in members[0].limits.tokens)
                for members in plan.cands.values())):
            return Never(plan.tokens)
        if status <= 0:
            seconds = int(res[1]) / 1000.0 if status == 0 else SAMPLE_POLL
            if len(plan.order) < len(plan.cands):  # buckets outside the sample may be free now
                return Wait(min(seconds, SAMPLE_POLL), int(res[2]), exact=False)
            return Wait(seconds, int(res[2]))
        bucket = plan.order[int(res[1]) - 1]
        members = plan.cands[bucket]
        key = members[next(self._rr) % len(members)]  # itertools.count is atomic under the GIL
        return Lease(key=key, uid=plan.args[2], tokens=plan.tokens, bucket=bucket, limits=key.limits,
                     at_ms=int(res[2]))

    @staticmethod
    def _window_keys(lease: Lease) -> list[str]:
        """The lease's window sorted sets: request windows first, then token windows."""
        return [rkeys.bucket_window(lease.bucket, "req", w.period) for w in lease.limits.requests] + [
            rkeys.bucket_window(lease.bucket, "tok", w.period) for w in lease.limits.tokens]

    def _stamp_call(self, lease: Lease, sent_ms: int | None = None) -> dict[str, Any] | None:
        ks = self._window_keys(lease)
        if not ks:
            return None
        args: list[Any] = [lease.uid, lease.tokens, len(lease.limits.requests)]
        if sent_ms is not None:
            args += [sent_ms, lease.at_ms]
        return {"keys": ks, "args": args}

    def _cancel_call(self, lease: Lease) -> dict[str, Any]:
        limits = lease.limits
        return {"keys": [rkeys.bucket_state(lease.bucket), *self._window_keys(lease)],
                "args": [lease.uid, lease.tokens, len(limits.requests),
                         *[int(w.period * 1000) for w in limits.tokens]]}

    @staticmethod
    def _settle_call(lease: Lease, used_tokens: int) -> dict[str, Any] | None:
        """The settle script's call when the real usage exceeds what the admission counted, else
        None: the server counts a request's prompt and ``max_tokens`` when it arrives and gives
        nothing back for a smaller usage, so settling down would let the next request in early."""
        windows = lease.limits.tokens
        if not windows or used_tokens <= lease.tokens:
            return None
        return {"keys": [rkeys.bucket_state(lease.bucket)] + [
                    rkeys.bucket_window(lease.bucket, "tok", w.period) for w in windows],
                "args": [lease.uid, lease.tokens, used_tokens, *[int(w.period * 1000) for w in windows]]}

    @staticmethod
    def _count(lease: Lease, used_tokens: int, pipe: Any) -> None:
        stats = rkeys.key_stats(lease.key.fingerprint)
        pipe.hincrby(stats, "requests", 1)
        pipe.hincrby(stats, "tokens", max(used_tokens, 0))

    @staticmethod
    def _cool_call(key: ApiKey, seconds: float, learned: dict[str, int] | None) -> dict[str, Any]:
        learned = learned or {}
        return {"keys": [rkeys.bucket_state(key.bucket)],
                "args": [int(seconds * 1000), learned.get("requests", 0), learned.get("tokens", 0)]}


class KeyPool(_PoolBase):
    """The keys a process may use, paced by the shared state in Redis (blocking client)."""

    def __init__(self, client: redis.Redis, keys: list[ApiKey], margin: float = 0.25) -> None:
        super().__init__(client, keys, margin)
        pipe = self.client.pipeline()
        self._describe(pipe)
        pipe.execute()

    def acquire(self, model: str, tokens: int, exclude: set[str] | None = None) -> Lease | Wait | Never | None:
        """Try to admit one request; ``None`` when no usable key serves ``model`` at all."""
        plan = self._plan_acquire(model, tokens, exclude)
        if plan is None:
            return None
        return self._granted(plan, self._scripts.acquire(keys=plan.keys, args=plan.args))

    def stamp(self, lease: Lease) -> int:
        """Start the lease's windows now, as its request is being sent; return the stamp (ms)."""
        call = self._stamp_call(lease)
        return lease.at_ms if call is None else int(self._scripts.stamp(**call))

    def cancel(self, lease: Lease) -> None:
        """Give back a lease whose request was never sent."""
        self._scripts.cancel(**self._cancel_call(lease))

    def settle(self, lease: Lease, used_tokens: int) -> None:
        """Replace the lease's token estimate by the real usage and count the request."""
        call = self._settle_call(lease, used_tokens)
        if call is not None:
            self._scripts.settle(**call)
        pipe = self.client.pipeline()
        self._count(lease, used_tokens, pipe)
        pipe.execute()

    def cool(self, key: ApiKey, seconds: float, learned: dict[str, int] | None = None) -> float:
        """Cool ``key``'s bucket for ``seconds`` and learn lower server limits; return the cooldown."""
        return int(self._scripts.cool(**self._cool_call(key, seconds, learned))) / 1000.0


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

    def now_ms(self) -> int | None:
        """Redis' time now, or None before the first observation."""
        if self._offset_ms is None:
            return None
        return int(time.monotonic() * 1000 + self._offset_ms)


class AsyncKeyPool(_PoolBase):
    """:class:`KeyPool` on a ``redis.asyncio`` client, for the worker's event loop.

    ``probe`` (seconds, usually the request timeout): how long a bucket's probe may stay out
    before another request may probe it (see :data:`ANSWERED_MS`); 0 turns probing off."""

    def __init__(self, client: Any, keys: list[ApiKey], margin: float = 0.25, probe: float = 0.0) -> None:
        super().__init__(client, keys, margin, probe)
        self.clock = RedisClock()

    async def describe(self) -> None:
        """Describe the keys in Redis for ``status``; call once after construction."""
        pipe = self.client.pipeline()
        self._describe(pipe)
        await pipe.execute()

    def plan(self, model: str, tokens: int, exclude: set[str] | None = None) -> _AcquirePlan | None:
        """What an admission needs (None when no usable key serves ``model`` at all): queue it with
        :meth:`queue_acquire` and read its reply with :meth:`granted`."""
        return self._plan_acquire(model, tokens, exclude)

    def queue_acquire(self, plan: _AcquirePlan, pipe: Any) -> None:
        """Queue the admission on ``pipe`` (see ``scripts.run_pipeline``)."""
        queue(pipe, self._scripts.acquire, plan.keys, plan.args)

    def granted(self, plan: _AcquirePlan, reply: Any) -> Lease | Wait | Never:
        """Read the admission's reply."""
        return self._granted(plan, reply)

    async def stamp(self, lease: Lease, sent_ms: int | None = None) -> int:
        """Start the lease's windows at ``sent_ms`` (when its request was sent, on Redis' clock:
        see :class:`RedisClock`), else now; return the stamp (ms)."""
        call = self._stamp_call(lease, sent_ms)
        return lease.at_ms if call is None else int(await self._scripts.stamp(**call))

    async def cancel(self, lease: Lease) -> None:
        """Give back a lease whose request was never sent."""
        await self._scripts.cancel(**self._cancel_call(lease))

    def queue_settle(self, lease: Lease, used_tokens: int, pipe: Any) -> None:
        """Queue the settlement on ``pipe`` (sent with the row's result, in one round trip)."""
        call = self._settle_call(lease, used_tokens)
        if call is not None:
            queue(pipe, self._scripts.settle, **call)
        self._count(lease, used_tokens, pipe)

    async def settle(self, lease: Lease, used_tokens: int) -> None:
        """Replace the lease's token estimate by the real usage and count the request."""
        await run_pipeline(self.client, lambda pipe: self.queue_settle(lease, used_tokens, pipe))

    def queue_answered(self, lease: Lease, pipe: Any) -> None:
        """The bucket answered: no probing for a while (the time is Redis', read locally)."""
        now = self.clock.now_ms()
        if self.probe_ms and now is not None:
            pipe.hset(rkeys.bucket_state(lease.bucket), mapping={"answered_until": now + ANSWERED_MS,
                                                                  "probe_until": 0})

    async def answered(self, lease: Lease, alive: bool) -> None:
        """After a failed call: an answer from a live key ends probing like a success; a
        transient failure says nothing about the key, so it only lets another probe go."""
        if not self.probe_ms:
            return
        if alive:
            await run_pipeline(self.client, lambda pipe: self.queue_answered(lease, pipe))
        else:
            await self.client.hset(rkeys.bucket_state(lease.bucket), "probe_until", 0)

    async def count_error(self, key: ApiKey, reason: str) -> None:
        await self.client.hincrby(rkeys.key_stats(key.fingerprint), f"error:{reason}", 1)

    async def cool(self, key: ApiKey, seconds: float, learned: dict[str, int] | None = None) -> float:
        """Cool ``key``'s bucket for ``seconds`` and learn lower server limits; return the cooldown."""
        return int(await self._scripts.cool(**self._cool_call(key, seconds, learned))) / 1000.0
