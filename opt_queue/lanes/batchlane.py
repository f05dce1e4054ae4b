"""The batch lane: a job's rows through the providers' batch APIs, at half price within 24 hours
(OpenAI's Batch API, Anthropic's Message Batches, Gemini's Batch Mode: ``providers``' seam).

``submit --lane batch`` claims rows as the synchronous lane does, then, instead of task messages,
writes them into *chunks* (:class:`ChunkWriter`): Batch API input files within the provider's
limits (``batch_max_lines``, ``batch_max_bytes``, ``batch_token_limit``; one endpoint and one
model each), stored in Redis with the job (``keys.job_chunk``), their state in ``keys.job_batches``
and their next step in one sorted set, ``keys.BATCH_DUE``, on Redis' clock (``lua/due.lua``).

Every worker process runs :class:`BatchLane` on its event loop: once a second it takes the steps
that are due (taking a step moves it a lease length ahead, renewed while it runs, so a worker
killed in the middle of a step leaves it to another one after ``lease_seconds``) and runs them:

``pending``   pick the key with the most room for the chunk's prompt tokens (its enqueued-token
              limit, configured or learned from the provider's error), upload the file (where the
              provider's batches read one), create the batch with ``metadata`` naming the job, the
              chunk and the attempt (Gemini: its display name; Anthropic keeps none)
``creating``  (a crash between the create call and the record) find the batch by its metadata
              before creating another, so the same rows are never uploaded into two batches;
              where the provider keeps no metadata, by its creation time and size, adopted by
              one chunk only (``keys.batch_owner``), and its results checked against the
              attempt's tag, which every custom id carries
``submitted`` poll; on ``token_limit_exceeded`` wait for room (learning the limit; a chunk alone
              above it is split); when the batch is completed, expired or cancelled, download its
              output and error files and publish every row through the same exactly-once path as
              the synchronous lane. Rows the batch did not answer (expired, cancelled, failed for
              the batch's sake) go into a new chunk, or, past the job's cut-over, to the
              synchronous lane as row tasks.

A stopped job (``cancel``, a budget, every key retired) cancels its batches, keeps what they
answered and leaves the other rows unanswered. A ``deadline`` sets the job's cut-over: from then
on, chunks not yet sent and batches not back are moved to the synchronous lane (a batch is
cancelled first and its answered rows kept, so no row is paid in both lanes).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import redis

from opt_queue.core import answers, formats
from opt_queue.engine import metrics
from opt_queue.engine.engine import Reach, base_of, give_up_base, no_keys_reason
from opt_queue.core.broker_url import redact_url
from opt_queue.store import budget as budgets
from opt_queue.store import keys as rkeys
from opt_queue import providers as api
from opt_queue.core.answers import RowResult
from opt_queue.providers import BatchEntry
from opt_queue.queue.broker import envelope, queue_push
from opt_queue.lanes.chunks import CANCEL_POLL, HANDOFF_SECONDS, Chunk, ChunkLines, store_chunk
from opt_queue.core.config import ApiKey, Config
from opt_queue.store.jobs import STOPPED, AsyncJob
from opt_queue.store.redis_conn import stop_task
from opt_queue.core.prices import Prices, Usage, nano
from opt_queue.core.request import CHAT_URL, failure_key
from opt_queue.store.scripts import run_pipeline, scripts_for
from opt_queue.core.tokens import estimate_parts

log = logging.getLogger(__name__)

IN_FLIGHT = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
DISPATCH_EVERY = 1.0
"""Seconds between two looks at the due steps, per worker process."""
STEPS_AT_ONCE = 8
PUBLISH_GROUP = 500
ENQUEUED_LIMIT = re.compile(r"Limit:\s*([\d,]+)\s*enqueued tokens", re.I)
UPLOAD_TIMEOUT = 600.0
SPLIT = -1.0
"""What :meth:`BatchLane._reserve` says of a chunk it split into smaller ones."""
CLOCK_SKEW = 300.0
"""Seconds a provider's clock may be behind ours when a lost batch is found by its creation time."""
OWNER_SECONDS = 3 * 86400
"""How long a batch's owner is kept: longer than any provider lets a batch run."""
UNREACHABLE_POLL = 1.0
"""Seconds until a chunk whose key's base URL refused the connection tries again, until the base is
given up (the engine's rule: a base that never answered after 3 tries over 2 s, one that answered
before after 60 s of failures); its keys are then retired for the job, as in the synchronous lane."""
FIND_AT_MOST = 2000
"""Batches looked at, at most, when a lost one is searched for (the key's most recent ones where the
provider lists them newest first: OpenAI, Anthropic)."""




class BatchLane:
    """The batch lane's steps, run by a worker process on its event loop (see the module doc).
    It shares the engine's Redis client, API clients, keys and prices."""

    def __init__(self, config: Config, client: Any, provider: api.Providers, keys: list[ApiKey],
                 prices: Prices) -> None:
        self.config = config
        self.client = client
        self.api = provider
        self.keys = keys
        self.prices = prices
        self._scripts = scripts_for(client)
        self._lease_ms = int(config.lease_seconds * 1000)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._secrets = [k.secret.get_secret_value() for k in keys]
        self._reach: dict[str, Reach] = {}  # per base URL, as this worker's uploads and creates found it

    def __repr__(self) -> str:
        return f"<BatchLane steps running={len(self._running)}>"

    def start(self) -> None:
        """Look for due steps every second, in the background (call on the running loop)."""
        async def forever() -> None:
            while True:
                await asyncio.sleep(DISPATCH_EVERY)
                try:
                    await self.dispatch()
                except redis.RedisError as exc:
                    log.debug("batch lane: no look at the due steps (%r)", exc)
                except Exception:  # a bug: this worker must not stop taking steps for good
                    log.exception("batch lane: the look at the due steps failed")
        self._task = asyncio.ensure_future(forever())

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
        self._task = None

    async def dispatch(self) -> int:
        """Take the due steps (at most a few) and run them in the background; return how many."""
        room = STEPS_AT_ONCE - len(self._running)
        if room <= 0:
            return 0
        taken = await self._scripts.due(keys=[rkeys.BATCH_DUE], args=["take", self._lease_ms, room])
        for raw in taken:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            task = asyncio.ensure_future(self._run(member))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return len(taken)

    async def _run(self, member: str) -> None:
        job_id, chunk_id = member.split("\n", 1)
        renewer = asyncio.ensure_future(self._keep(member))
        try:
            delay = await self.step(job_id, chunk_id)
        except Exception as exc:  # a bug or an outage: look again later, never lose the chunk
            log.warning("batch lane: chunk %s of job %s: %s", chunk_id, job_id,
                        api.redact(f"{type(exc).__name__}: {exc}", self._secrets))
            delay = self.config.batch_poll
        finally:
            # Ended before the next step is set: a renewal that lands after it would move the
            # step a lease ahead, again and again if the renewer outlived its cancel.
            await stop_task(renewer)
        if delay is None:
            await self.client.zrem(rkeys.BATCH_DUE, member)
        else:
            await self._scripts.due(keys=[rkeys.BATCH_DUE], args=["at", int(delay * 1000), member])

    async def _keep(self, member: str) -> None:
        """Keep a step that runs long (a large upload) away from other workers."""
        while True:
            await asyncio.sleep(self._lease_ms / 4000)
            try:
                await self._scripts.due(keys=[rkeys.BATCH_DUE], args=["at", self._lease_ms, member])
            except redis.RedisError as exc:  # Redis restarting: the lease lasts a while; try again
                log.debug("batch lane: no renewal of %r's lease (%r)", member, exc)

    # -- one step ---------------------------------------------------------------------------------
    async def step(self, job_id: str, chunk_id: str) -> float | None:
        """Take a chunk one step further; return the seconds until its next step, None when done."""
        raw = await self.client.hget(rkeys.job_batches(job_id), chunk_id)
        if raw is None:
            return None
        chunk = Chunk.loads(raw)
        if chunk.state == "done":
            return None
        job = AsyncJob(self.client, job_id)
        status, cutover = await job.meta_fields("status", "cutover_at")
        if status is None:  # the job was reset or expired
            await self.client.delete(rkeys.job_chunk(job_id, chunk_id))
            return None
        stopped = status == STOPPED
        late = bool(cutover) and time.time() >= float(cutover or 0)
        delay = await self._step(job, chunk_id, chunk, stopped, late, float(cutover or 0))
        if delay is not None and cutover and not late:
            delay = min(delay, max(0.0, float(cutover) - time.time()))  # the next look is at the cut-over
        return delay

    async def _step(self, job: AsyncJob, chunk_id: str, chunk: Chunk, stopped: bool, late: bool,
                    cutover: float = 0.0) -> float | None:
        job_id = job.id
        if chunk.state == "creating":
            found = await self._find(chunk, job_id, chunk_id)
            if found is not None:
                return await self._submitted(job, chunk_id, chunk, found.id, found.input_file_id)
            chunk.state = "pending"
        if chunk.state == "pending":
            if stopped or late:
                await self._finish(job, chunk_id, chunk, _entries(()), await self._lines(job_id, chunk_id),
                                   late=not stopped)
                return None
            return await self._create(job, chunk_id, chunk)
        return await self._poll(job, chunk_id, chunk, stopped or late, late, cutover)

    async def _save(self, job_id: str, chunk_id: str, chunk: Chunk) -> None:
        await self.client.hset(rkeys.job_batches(job_id), chunk_id, chunk.dumps())

    async def _lines(self, job_id: str, chunk_id: str) -> ChunkLines:
        """The chunk's requests by index (each parsed when it is read)."""
        return ChunkLines(await self.client.get(rkeys.job_chunk(job_id, chunk_id)) or b"")

    def _key(self, fingerprint: str | None) -> ApiKey | None:
        return next((k for k in self.keys if k.fingerprint == fingerprint), None)

    async def _pick(self, job: AsyncJob, chunk: Chunk) -> ApiKey | None | bool | int:
        """The key with the most room for the chunk; None while every key is full; False when no
        usable key serves the chunk's model; the largest limit (an int) when every usable key's
        enqueued-token limit is known and smaller than the chunk."""
        retired = set(await job.retired_keys())
        usable = [k for k in self.keys if k.serves(chunk.model) and k.fingerprint not in retired]
        if not usable:
            return False
        pipe = self.client.pipeline(transaction=False)  # one round trip, whatever the number of keys
        for key in usable:
            pipe.hmget(rkeys.batch_enqueued(key.fingerprint, chunk.model), ["tokens", "limit"])
        best, room = None, None
        limits: list[int | None] = []
        for key, (enqueued, learned) in zip(usable, await pipe.execute()):
            enqueued = int(enqueued or 0)
            limit = self.config.batch_token_limit or (int(learned) if learned else None)
            limits.append(limit)
            left = float("inf") if limit is None else limit - enqueued
            if (enqueued == 0 or left >= chunk.tokens) and (room is None or left > room):
                best, room = key, left
        if None not in limits and chunk.tokens > max(limits):  # type: ignore[type-var]
            return int(max(limits))  # type: ignore[type-var]
        return best

    async def _create(self, job: AsyncJob, chunk_id: str, chunk: Chunk) -> float | None:
        key = await self._pick(job, chunk)
        if key is False:
            reason = no_keys_reason(await job.retired_keys(), chunk.model)
            if await job.stop(reason):
                log.error("job %s stopped: %s", job.id, reason)
            return 0.0
        if key is None:
            log.info("job %s: chunk %s waits for room under the enqueued-token limits", job.id, chunk_id)
            return self.config.batch_poll
        if not isinstance(key, ApiKey):  # larger than every key's limit: it would fail again
            await self._too_large(job, chunk_id, chunk, int(key))
            return None
        data = await self.client.get(rkeys.job_chunk(job.id, chunk_id))
        room = await self._reserve(job, chunk_id, chunk, data or b"")
        if room is not None:
            return None if room == SPLIT else room
        # A chunk's content never changes: a file this key uploaded for it before (a batch that
        # failed, or a create that did not go through) is used again instead of a second upload.
        file_id = chunk.file_id if chunk.file_id and chunk.file_key == key.fingerprint else None
        chunk.state, chunk.key, chunk.tag, chunk.sent_at = "creating", key.fingerprint, uuid.uuid4().hex[:12], time.time()
        chunk.cancel_asked = False  # (a new batch)
        await self._save(job.id, chunk_id, chunk)  # before the call: a crash after it is found again
        meta = {"opt_queue_job": job.id, "opt_queue_chunk": chunk_id, "opt_queue_tag": chunk.tag}
        try:
            if not self.api.files(key):  # the requests go with the create call, each named by the tag
                lines = ChunkLines(data or b"")  # (read above)
                created = await self.api.create_batch(key, chunk.url, chunk.model, meta, UPLOAD_TIMEOUT,
                                                      requests=_to_wire(chunk, lines))
            else:
                if file_id is None:
                    file_id = chunk.file_id = await self.api.upload(key, f"{job.id}-{chunk_id}.jsonl", data or b"",
                                                                    UPLOAD_TIMEOUT)
                    chunk.file_key = key.fingerprint
                    await self._save(job.id, chunk_id, chunk)
                created = await self.api.create_batch(key, chunk.url, chunk.model, meta, self.config.request_timeout,
                                                      file_id=file_id)
        except Exception as exc:
            failure = self.api.classify(exc)
            chunk.state = "pending"
            pipe = self.client.pipeline(transaction=True)
            self._unreserve(pipe, job, chunk)
            pipe.hset(rkeys.job_batches(job.id), chunk_id, chunk.dumps())
            await pipe.execute()
            message = api.redact(failure.message, self._secrets)
            if failure.kind is api.Kind.UNREACHABLE:  # nothing reached the server: nothing was sent
                base = base_of(key)
                if self._reach.setdefault(base, Reach()).failed(time.monotonic()):
                    await give_up_base(job, self.keys, base, message)  # the chunk goes to another key, or the job stops
                    return 0.0
                log.warning("job %s: chunk %s: %s cannot be reached (%s); trying again", job.id, chunk_id,
                            redact_url(base), message)
                return min(self.config.batch_poll, UNREACHABLE_POLL)
            if failure.kind is api.Kind.KEY_DEAD:
                await job.retire_key(key.fingerprint, f"{failure.status} {failure.reason}: {message}")
                log.warning("key %s retired for job %s: %s", key.fingerprint, job.id, failure.reason)
                return 0.0
            if failure.kind is api.Kind.JOB_CONFIG:  # the same for every chunk of the model: stop
                if await job.stop(f"the batch lane cannot send chunk {chunk_id}: {message}"):
                    log.error("job %s stopped: %s", job.id, message)
                return 0.0
            if failure.kind in api.FINAL_KINDS:  # the batch was refused as it is: a failed attempt
                return await self._attempt_failed(job, chunk_id, chunk, failure.reason, message,
                                                  f"chunk {chunk_id}'s batch was refused")
            log.warning("job %s: chunk %s could not be sent to the batch API (%s); trying again", job.id,
                        chunk_id, message)
            return max(failure.retry_after or 0.0, self.config.batch_poll)
        self._reach.setdefault(base_of(key), Reach()).reached()
        log.info("job %s: chunk %s (%d rows, ~%d prompt tokens) is batch %s on key %s", job.id, chunk_id,
                 chunk.rows, chunk.tokens, created.id, key.fingerprint)
        return await self._submitted(job, chunk_id, chunk, created.id, file_id, created.status)

    async def _reserve(self, job: AsyncJob, chunk_id: str, chunk: Chunk, data: bytes) -> float | None:
        """Hold the batch's worst case (every prompt's estimate and every answer at its cap, at
        the batch price) in the job's budget, in one atomic step (``lua/reserve.lua``), the way
        the synchronous lane's admission does. None when it is held (or there is no budget); else
        the seconds until the chunk's next step: it waits while other calls hold the budget, a
        chunk too large for what is left is halved (:data:`SPLIT`: this chunk is done), and a
        single row that cannot fit with nothing else in flight stops the job (budget reached)."""
        if chunk.reserved_nano or chunk.reserved_tokens:
            return None  # held already (a step that failed after it)
        budget = await job.meta_fields("max_cost_nano", "max_tokens_total")
        if not any(int(v or 0) for v in budget):
            return None
        cost, tokens = 0.0, 0
        needs = api.serving(self.keys, chunk.model)
        for line in data.splitlines():  # (bytes: no second copy of the file)
            if line.strip():  # as sent: with the max_tokens a provider requires
                body = api.with_required_cap(needs, json.loads(line)["body"])
                prompt, cap = estimate_parts(body, chunk.url)
                cost += self.prices.cost(chunk.model, chunk.url, {**body, "service_tier": "batch"}, prompt, cap) or 0.0
                tokens += prompt + cap
        got = await budgets.reserve(job, nano(cost), tokens)
        if got == 1:
            chunk.reserved_nano, chunk.reserved_tokens = nano(cost), tokens
            return None
        if got == 0:
            return self.config.batch_poll
        if chunk.rows > 1:
            await self._split(job, chunk_id, chunk, parts=2)
            return SPLIT
        await budgets.stop_for_budget(job)
        return 0.0

    def _unreserve(self, pipe: Any, job: AsyncJob, chunk: Chunk) -> None:
        """Queue on ``pipe`` the end of the chunk's budget reservation (its real cost is counted)."""
        budgets.queue_spend(pipe, None, job.budget_key, None, (chunk.reserved_nano, chunk.reserved_tokens))
        chunk.reserved_nano = chunk.reserved_tokens = 0

    async def _submitted(self, job: AsyncJob, chunk_id: str, chunk: Chunk, batch_id: str, file_id: str | None,
                         status: str | None = None) -> float:
        chunk.state, chunk.batch_id, chunk.file_id, chunk.status = "submitted", batch_id, file_id, status
        chunk.file_key = chunk.key
        delay = chunk.next_poll(self.config.batch_poll)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(rkeys.batch_owner(chunk.key or "", batch_id), f"{job.id}\n{chunk_id}", ex=OWNER_SECONDS)
        pipe.hset(rkeys.job_batches(job.id), chunk_id, chunk.dumps())
        pipe.hincrby(rkeys.batch_enqueued(chunk.key or "", chunk.model), "tokens", chunk.tokens)
        await pipe.execute()
        return delay

    async def _find(self, chunk: Chunk, job_id: str, chunk_id: str) -> api.Batch | None:
        """The provider's batch created for this attempt of the chunk, if the create call went
        through before the worker died: its metadata names it, or, where the provider keeps none,
        the one batch of the chunk's size created since the attempt began that no chunk owns (a
        wrong guess, two lost batches of one size at once, is caught when its results come back:
        their custom ids carry another attempt's tag, and the rows are sent again)."""
        key = self._key(chunk.key)
        if key is None:
            return None
        named = self.api.names_batches(key)
        wanted = {"opt_queue_job": job_id, "opt_queue_chunk": chunk_id, "opt_queue_tag": chunk.tag}
        seen = 0
        async for batch in self.api.recent_batches(key, self.config.request_timeout):
            if named and all(batch.metadata.get(k) == v for k, v in wanted.items()):
                return batch
            if not named and batch.created_at >= chunk.sent_at - CLOCK_SKEW and batch.requests == chunk.rows:
                owner = rkeys.batch_owner(key.fingerprint, batch.id)
                member = f"{job_id}\n{chunk_id}"
                if await self.client.set(owner, member, nx=True, ex=OWNER_SECONDS) or \
                        (await self.client.get(owner) or b"").decode() == member:
                    return batch
            seen += 1  # (not every provider lists its batches newest first: Gemini does not say)
            if seen >= FIND_AT_MOST:
                break
        return None

    async def _poll(self, job: AsyncJob, chunk_id: str, chunk: Chunk, cancel: bool, late: bool,
                    cutover: float = 0.0) -> float | None:
        key = self._key(chunk.key)
        if key is None:  # the key left the config: the batch is out of reach; send its rows again
            log.warning("job %s: chunk %s's key %s is no longer configured", job.id, chunk_id, chunk.key)
            await self._finish(job, chunk_id, chunk, _entries(()), await self._lines(job.id, chunk_id), late=late)
            return None
        batch = await self.api.batch(key, chunk.batch_id or "", self.config.request_timeout)
        chunk.status = batch.status
        if batch.status == "failed":
            return await self._failed(job, chunk_id, chunk, batch)
        if batch.status in IN_FLIGHT and cancel and batch.status != "cancelling" and not chunk.cancel_asked:
            log.info("job %s: cancelling batch %s (%s)", job.id, batch.id,
                     "the deadline's cut-over" if late else "the job stopped")
            await self.api.cancel_batch(key, batch.id, self.config.request_timeout)
            chunk.cancel_asked = True
            batch = await self.api.batch(key, batch.id, self.config.request_timeout)  # a cancel may be done at once
            chunk.status = batch.status
        if batch.status in IN_FLIGHT:
            if late and not chunk.handed and time.time() >= cutover + HANDOFF_SECONDS:
                await self._hand_over(job, chunk_id, chunk, batch.status)
            delay = min(self.config.batch_poll, CANCEL_POLL) if cancel else chunk.next_poll(self.config.batch_poll)
            await self._save(job.id, chunk_id, chunk)
            return delay
        lines = await self._lines(job.id, chunk_id)
        found = self.api.results(key, batch, UPLOAD_TIMEOUT)
        if not self.api.files(key):
            found = _from_wire(chunk, lines, found)
        await self._finish(job, chunk_id, chunk, found, lines, late=late)
        return None

    async def _hand_over(self, job: AsyncJob, chunk_id: str, chunk: Chunk, status: str) -> None:
        """The deadline's cut-over passed and the provider is still cancelling the batch after the
        hand-off's own time: its rows go to the synchronous lane now, so that the deadline holds.
        The batch is still read once cancelled: an answer it gives first is kept (and a row task
        that comes after it finds the row done and calls nothing); a row that both lanes finished
        was paid twice, the price of the deadline when the provider is slow to cancel."""
        lines = await self._lines(job.id, chunk_id)
        await self._to_sync(job.id, (self._task_row(chunk, i, lines[i]) for i in lines), chunk.options)
        chunk.handed, chunk.moved = True, len(lines)
        await self._save(job.id, chunk_id, chunk)
        log.warning("job %s: batch %s is still %s after the cut-over; its %d rows go through the synchronous "
                    "lane now (an answer the batch gives first is kept)", job.id, chunk.batch_id, status, len(lines))

    async def _failed(self, job: AsyncJob, chunk_id: str, chunk: Chunk, batch: api.Batch) -> float | None:
        code, message = batch.errors[0] if batch.errors else (None, None)
        message = message or "the batch failed"
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(rkeys.batch_enqueued(chunk.key or "", chunk.model), "tokens", -chunk.tokens)
        self._unreserve(pipe, job, chunk)  # nothing was billed; the next try reserves again
        pipe.hset(rkeys.job_batches(job.id), chunk_id, chunk.dumps())
        await pipe.execute()
        chunk.state = "failed"  # its enqueued tokens are given back: _finish must not do it again
        if code == "token_limit_exceeded":
            match = ENQUEUED_LIMIT.search(message or "")
            if match:
                limit = int(match.group(1).replace(",", ""))
                await self.client.hset(rkeys.batch_enqueued(chunk.key or "", chunk.model), "limit", limit)
                if chunk.tokens > limit:
                    await self._too_large(job, chunk_id, chunk, limit)
                    return None
            log.info("job %s: chunk %s waits for room: %s", job.id, chunk_id, message)
            chunk.state = "pending"
            await self._save(job.id, chunk_id, chunk)
            return self.config.batch_poll
        return await self._attempt_failed(job, chunk_id, chunk, code, message, f"batch {batch.id} failed")

    async def _attempt_failed(self, job: AsyncJob, chunk_id: str, chunk: Chunk, code: str | None, message: str,
                              what: str) -> float | None:
        """A batch of the chunk failed, or its create call was refused, for the batch's own sake: send
        the rows again, up to ``batch_attempts`` times, then null them with the reason."""
        chunk.failures += 1
        if chunk.failures >= self.config.batch_attempts:
            lines = await self._lines(job.id, chunk_id)
            nulls = _entries({"custom_id": i, "response": None,
                              "error": {"code": code or "batch_failed", "message": message}} for i in lines)
            await self._finish(job, chunk_id, chunk, nulls, lines, late=False, final=True)
            return None
        log.warning("job %s: %s (%s: %s); sending its rows again (%d/%d)", job.id, what, code, message,
                    chunk.failures, self.config.batch_attempts)
        chunk.state = "pending"
        await self._save(job.id, chunk_id, chunk)
        return self.config.batch_poll

    async def _split(self, job: AsyncJob, chunk_id: str, chunk: Chunk, limit: int = 0, parts: int = 0) -> None:
        """A chunk above its key's enqueued-token ``limit`` (new chunks of at most 90% of it each),
        or too large for what is left of the budget (``parts`` equal new chunks)."""
        lines = await self._lines(job.id, chunk_id)
        tokens = {index: estimate_parts(lines[index]["body"], chunk.url)[0] for index in lines}
        if parts:
            size = -(-len(lines) // parts)
            order = list(lines)
            pieces = [order[i:i + size] for i in range(0, len(order), size)]
        else:
            pieces = [[]]
            used = 0
            for index in lines:
                if tokens[index] > limit:
                    continue  # alone above the limit: it never fits in a batch (see _too_large)
                if pieces[-1] and used + tokens[index] > limit * 0.9:
                    pieces.append([])
                    used = 0
                pieces[-1].append(index)
                used += tokens[index]
            pieces = [p for p in pieces if p]
        kept = {i for part in pieces for i in part}
        alone = [i for i in lines if i not in kept]
        if alone:
            await self._to_sync(job.id, (self._task_row(chunk, i, lines[i]) for i in alone), chunk.options)
            log.warning("job %s: %d rows of chunk %s are each larger than the Batch API's enqueued-token limit "
                        "(%d): they go through the synchronous lane", job.id, len(alone), chunk_id, limit)
        pipe = self.client.pipeline(transaction=True)
        pipe.srem(rkeys.job_in_batch(job.id), *lines)
        for part in pieces:
            new_id = await job.next_chunk_id()
            store_chunk(pipe, job.id, new_id, Chunk(chunk.url, chunk.model, len(part), sum(tokens[i] for i in part),
                                                    chunk.options, attempt=chunk.attempt),
                        [lines.raw(i) for i in part], part)
        self._done(pipe, job.id, chunk_id, chunk)
        await pipe.execute()
        log.info("job %s: chunk %s was %s: split into %d", job.id, chunk_id,
                 f"above the enqueued-token limit {limit}" if limit else "too large for the budget left",
                 len(pieces))

    async def _too_large(self, job: AsyncJob, chunk_id: str, chunk: Chunk, limit: int) -> None:
        """A chunk above the largest enqueued-token ``limit`` a key has: split it, or, a single row,
        send it through the synchronous lane (which answers it, or nulls it with its reason when it
        is too large there too): it can never fit in a batch."""
        if chunk.rows > 1:
            await self._split(job, chunk_id, chunk, limit)
            return
        await self._finish(job, chunk_id, chunk, _entries(()), await self._lines(job.id, chunk_id), late=True,
                           why=f"a row larger than the Batch API's enqueued-token limit, {limit}")

    @staticmethod
    def _task_row(chunk: Chunk, index: str, line: dict[str, Any]) -> list[Any]:
        return [index, line["body"]] if chunk.url == CHAT_URL else [index, line["body"], chunk.url]

    def _done(self, pipe: Any, job_id: str, chunk_id: str, chunk: Chunk) -> None:
        chunk.state = "done"
        pipe.hset(rkeys.job_batches(job_id), chunk_id, chunk.dumps())
        pipe.delete(rkeys.job_chunk(job_id, chunk_id))

    # -- results ----------------------------------------------------------------------------------
    async def _finish(self, job: AsyncJob, chunk_id: str, chunk: Chunk, found: AsyncIterator[BatchEntry],
                      lines: ChunkLines, late: bool, final: bool = False,
                      why: str = "the deadline's cut-over") -> None:
        """Publish what the batch answered, :data:`PUBLISH_GROUP` rows at a time as its results
        stream in; move the other rows on (a new chunk, the synchronous lane past the cut-over, or
        unanswered when the job stopped); end the chunk. ``late``: the other rows go to the
        synchronous lane (``why`` says why, in the log)."""
        unfinished = set(lines)
        reasons: dict[str, dict[str, Any]] = {}  # why the rows that go on did not finish
        group: list[RowResult] = []
        usages: dict[str, Usage] = {}
        published = 0

        async def publish() -> int:
            chunk.answered += sum(1 for r in group if r.answer is not None)
            chunk.nulls += sum(1 for r in group if r.answer is None)
            new = await self._publish(job, chunk, group, usages)
            group.clear()
            usages.clear()
            return new

        async for entry in found:
            index = str(entry.get("custom_id"))
            if index not in unfinished:
                continue  # not this chunk's, or read already
            result, usage = self._result(chunk, index, lines[index]["body"], entry, final)
            if result is None:
                reasons[index] = entry.get("error") or {}
                continue
            unfinished.discard(index)
            group.append(result)
            if usage is not None:
                usages[index] = usage
            if len(group) >= PUBLISH_GROUP:
                published += await publish()
        published += await publish()
        left = [index for index in lines if index in unfinished]
        del unfinished
        status = (await job.meta_fields("status"))[0]
        if left and not late and status != STOPPED and chunk.attempt + 1 >= self.config.batch_attempts:
            # the rows met batch_attempts batches that ended without them: null, with the last reason
            given_up = [RowResult(index=i, answer=None, key=chunk.key, model=chunk.model, attempts=chunk.attempt + 1,
                                  error_type=str(reasons.get(i, {}).get("code") or f"batch_{chunk.status}"),
                                  error=str(reasons.get(i, {}).get("message") or
                                            f"not answered by {chunk.attempt + 1} batches (the last {chunk.status})"))
                        for i in left]
            await self._publish(job, chunk, given_up, {})
            chunk.nulls += len(given_up)
            left = []
        if left and status == STOPPED:
            # Given back before the chunk ends (a release is idempotent), through run_pipeline: it
            # loads the script where this Redis does not know it yet (inside the transaction below,
            # NOSCRIPT failed the step again and again, and the stopped job never ended).
            for start in range(0, len(left), PUBLISH_GROUP):
                await run_pipeline(self.client, lambda pipe, group=left[start:start + PUBLISH_GROUP]:
                                   [job.queue_release(index, pipe) for index in group])
        pipe = self.client.pipeline(transaction=True)
        if lines:
            pipe.srem(rkeys.job_in_batch(job.id), *lines)
        if chunk.state == "submitted":
            pipe.hincrby(rkeys.batch_enqueued(chunk.key or "", chunk.model), "tokens", -chunk.tokens)
        self._unreserve(pipe, job, chunk)  # the real cost was added by _publish
        if left and status == STOPPED:
            pass  # given back above
        elif left and chunk.handed:
            pass  # in the synchronous lane already (_hand_over)
        elif left and late:
            # Row tasks first, then the chunk's end: a crash in between sends the tasks twice, and
            # the rows' leases keep the second copy from paying.
            await self._to_sync(job.id, (self._task_row(chunk, i, lines[i]) for i in left), chunk.options)
            chunk.moved = len(left)
            log.info("job %s: %d rows of chunk %s go through the synchronous lane (%s)",
                     job.id, len(left), chunk_id, why)
        elif left:
            new_id = await job.next_chunk_id()
            tokens = sum(estimate_parts(lines[i]["body"], chunk.url)[0] for i in left)
            store_chunk(pipe, job.id, new_id, Chunk(chunk.url, chunk.model, len(left), tokens, chunk.options,
                                                    attempt=chunk.attempt + 1),
                        [lines.raw(i) for i in left], left)
            chunk.moved = len(left)
            log.info("job %s: %d rows of chunk %s (batch %s) were not answered; they go into chunk %s", job.id,
                     len(left), chunk_id, chunk.status, new_id)
        self._done(pipe, job.id, chunk_id, chunk)
        await pipe.execute()
        log.info("job %s: chunk %s done: %d rows published (%d answers)", job.id, chunk_id, published,
                 chunk.answered)

    async def _to_sync(self, job_id: str, rows: Iterable[list[Any]], options: dict[str, Any]) -> None:
        """Row tasks for ``rows``, pushed :data:`PUBLISH_GROUP` at a time."""
        rows = iter(rows)
        while entries := [envelope(job_id, [row], options) for row in itertools.islice(rows, PUBLISH_GROUP)]:
            await run_pipeline(self.client, lambda pipe, entries=entries: queue_push(pipe, entries))

    def _result(self, chunk: Chunk, index: str, request: dict[str, Any], entry: dict[str, Any],
                final: bool) -> tuple[RowResult | None, Usage | None]:
        """A row's result from its line in the batch's output or error file; None when the row must
        be sent again (the batch expired or was cancelled before it, a transient error)."""
        response, error = entry.get("response"), entry.get("error")
        model = str(request.get("model") or chunk.model)
        common = {"index": index, "key": chunk.key, "model": model, "attempts": chunk.attempt + 1}
        if not response:
            if final and error:
                return RowResult(answer=None, error_type=str(error.get("code") or "batch_failed"),
                                 error=str(error.get("message") or ""), **common), None
            return None, None
        body = response.get("body")
        if response.get("status_code") != 200:
            failure = self.api.classify_response(self._key(chunk.key), int(response.get("status_code") or 500), body)
            if failure.kind in (api.Kind.TRANSIENT, api.Kind.RATE_LIMITED, api.Kind.SLOW_DOWN) and not final:
                return None, None
            return RowResult(answer=None, error_type=failure.reason, error=failure.message, **common,
                             **_final_fields(failure, chunk, request)), None
        try:
            reply = answers.read(chunk.url, body)
        except answers.AnswerError as exc:
            failure = self.api.classify(exc)
            return RowResult(answer=None, error_type=failure.reason, error=failure.message, **common,
                             **_final_fields(failure, chunk, request)), None
        usage = self.prices.usage(model, chunk.url, {**request, "service_tier": "batch"}, reply)
        parsed, problem, _final = answers.structured(chunk.url, request, reply)  # a batch cannot ask again
        return formats.answered(index, reply, parsed, problem, output=chunk.options.get("output", formats.SEED),
                                key=chunk.key, model=model, attempts=chunk.attempt + 1, cost=usage.cost,
                                request_id=response.get("request_id"), body=body,
                                failure_key=failure_key(chunk.url, request, chunk.options.get("fallback"))), usage

    async def _publish(self, job: AsyncJob, chunk: Chunk, results: list[RowResult],
                       usages: dict[str, Usage]) -> int:
        """Publish results (exactly once per row) and count what the new ones cost; return how many
        were new."""
        new = 0
        for start in range(0, len(results), PUBLISH_GROUP):
            group = results[start:start + PUBLISH_GROUP]

            def fill(pipe: Any, group: list[RowResult] = group) -> None:
                for result in group:
                    job.queue_publish(result, pipe)

            replies = await run_pipeline(self.client, fill, durable=True)
            spent: Counter[str] = Counter()  # the group's spend, counted in one step
            for result, fresh in zip(group, replies):
                if not fresh:
                    continue
                new += 1
                metrics.ROWS.labels("null" if result.answer is None else "answered").inc()
                usage = usages.get(result.index)
                if usage is None:
                    continue
                metrics.observe_call(chunk.key or "", result.model or chunk.model, "200", usage)
                spent.update(usage.counters())
            if spent:
                pipe = self.client.pipeline(transaction=False)
                budgets.queue_counts(pipe, chunk.key or "", job.budget_key, spent)
                await pipe.execute()
        return new


def _to_wire(chunk: Chunk, lines: Mapping[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The chunk's requests as sent inline: custom ids ``{tag}-{place}`` (within every provider's
    rules, such as Anthropic's ``^[a-zA-Z0-9_-]{1,64}$``, whatever the rows' indices are)."""
    return [(f"{chunk.tag}-{place}", line["body"]) for place, line in enumerate(lines.values())]


async def _from_wire(chunk: Chunk, lines: ChunkLines, found: AsyncIterator[BatchEntry]) -> AsyncIterator[BatchEntry]:
    """Results of an inline batch with their rows' indices (:func:`_to_wire`'s custom ids read
    back); a result of another attempt's tag is not this chunk's and is left out."""
    order = list(lines)
    prefix = f"{chunk.tag}-"
    foreign = 0
    async for entry in found:
        custom_id = str(entry.get("custom_id"))
        place = custom_id[len(prefix):] if custom_id.startswith(prefix) else ""
        if place.isdigit() and int(place) < len(order):
            yield {**entry, "custom_id": order[int(place)]}
        else:
            foreign += 1
    if foreign:
        log.warning("batch of chunk with tag %s: %d results of another attempt left out", chunk.tag, foreign)


async def _entries(entries: Iterable[BatchEntry]) -> AsyncIterator[BatchEntry]:
    """Results made here (none, or nulls), as a batch's results come (:meth:`BatchLane._finish`)."""
    for entry in entries:
        yield entry


def _final_fields(failure: api.Failure, chunk: Chunk, request: dict[str, Any]) -> dict[str, Any]:
    """A null's ``retryable`` and ``request`` fields (``jobs.RowResult``) for ``failure``."""
    if failure.kind not in api.FINAL_KINDS:
        return {}
    return {"retryable": False, "request": failure_key(chunk.url, request, chunk.options.get("fallback"))}
