"""A job's state in Redis: its metadata, which rows are claimed and done, its results stream.

A job is one output file (its id is derived from the output path unless named), fed by one input
file. Rows are identified by their input ``index`` (see ``keys.slot``): an edited input (a fixed
line, rows added, removed or reordered) keeps every row's state, and ``output.jsonl`` stays the
truth: a row collected once and later missing or null on disk is claimed, and sent, again.
A finished job's state expires (``state_ttl``); :meth:`Job.delete` forgets a job at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from opt_queue.store import keys
from opt_queue.core.answers import RowResult
from opt_queue.core.prices import dollars
from opt_queue.core.request import index_number
from opt_queue.store.scripts import queue, run_script, scripts_for

log = logging.getLogger(__name__)
RUNNING, STOPPED, COMPLETE = "running", "stopped", "complete"
PRUNE_FLOOR = 10_000
"""Identical-request entries a job keeps before :meth:`Job.dedupe` first prunes them."""


def job_id_for(output_path: str | os.PathLike[str], name: str | None = None) -> str:
    """Return the job id: ``name`` when given, else a stable hash of the output's absolute path."""
    if name:
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError("a job name may hold letters, digits, '-', '_' and '.' only")
        return name
    resolved = str(Path(output_path).resolve())
    return Path(output_path).stem[:24] + "-" + hashlib.sha256(resolved.encode()).hexdigest()[:8]




@dataclass
class Progress:
    """Counters of one job, read from its metadata."""

    job: str
    status: str = RUNNING
    total: int = 0
    claimed: int = 0
    reported: int = 0
    released: int = 0
    nulls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    submitting: bool = False
    reason: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def outstanding(self) -> int:
        """Rows enqueued whose result has not been published yet."""
        return max(0, self.claimed - self.reported - self.released)

    def count(self, name: str) -> int:
        return int(self.meta.get(name) or 0)

    @property
    def spend(self) -> dict[str, Any]:
        """What every paid call of the job used and cost so far (all runs of it), its budget, and
        the projected total: the spend per finished row times the rows of the job."""
        spent = dollars(self.count("spent_nano"))
        per_row = spent / self.reported if self.reported else None
        return {"cost": spent, "calls": self.count("calls"), "unpriced_calls": self.count("unpriced_calls"),
                "input_tokens": self.count("input_tokens"), "cached_tokens": self.count("cached_tokens"),
                "output_tokens": self.count("output_tokens"), "reasoning_tokens": self.count("reasoning_tokens"),
                "max_cost": dollars(self.count("max_cost_nano")) or None,
                "max_tokens_total": self.count("max_tokens_total") or None,
                "spent_tokens": self.count("spent_tokens"),
                "projected_cost": per_row * self.total if per_row is not None and self.total else None,
                "cache_hits": self.count("cache_hits"), "cache_saved": dollars(self.count("cache_saved_nano"))}


@dataclass
class Claim:
    """What :meth:`Job.claim` found: the rows this caller must enqueue, and the rows it must not."""

    claimed: list[str] = field(default_factory=list)
    busy: int = 0
    """Rows queued or in flight already."""
    pending: int = 0
    """Rows whose result is published but not collected yet (``collect`` writes them)."""
    redone: set[str] = field(default_factory=set)
    """Claimed rows that had been collected before (their line is missing or null on disk now)."""


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _bits(raw: bytes) -> Iterable[int]:
    """Positions of the set bits of a Redis bitmap (bit 0 is the top bit of the first byte)."""
    for byte_no, value in enumerate(raw):
        if value:
            for bit in range(8):
                if value & (0x80 >> bit):
                    yield 8 * byte_no + bit


class _JobBase:
    """A job's Redis names and the arguments of the scripts both job handles call."""

    def __init__(self, client: Any, job_id: str) -> None:
        self.client = client
        self.id = job_id
        self._scripts = scripts_for(client)
        self.meta_key = keys.job_meta(job_id)
        self.rows = keys.row_state(job_id)
        self.leases = [keys.job_leases(job_id), keys.job_lease_owners(job_id)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    @property
    def budget_key(self) -> str:
        """The hash the job's budget and spend are kept in (``store/budget.py``, ``lua/acquire.lua``)."""
        return self.meta_key

    def _publish_call(self, result: RowResult) -> dict[str, Any]:
        flat: list[str] = []
        for k, v in result.to_fields().items():
            flat += [k, v]
        return {"keys": [*self.rows, self.meta_key, keys.job_results(self.id), *self.leases,
                         keys.job_copies(self.id)],
                "args": [keys.slot(result.index), result.index, 0 if result.answer is None else 1,
                         result.prompt_tokens, result.completion_tokens, *flat]}

    def _release_call(self, index: str) -> dict[str, Any]:
        return {"keys": [*self.rows, self.meta_key, *self.leases, keys.job_copies(self.id)],
                "args": [keys.slot(index), index]}

    # -- one implementation for both handles: what to send and how to read it; ``_run`` sends it
    # (and returns the value on a blocking client, an awaitable of it on an asyncio one) --------
    def _run(self, fill: Callable[[Any], None], read: Callable[[list[Any]], Any]) -> Any:
        raise NotImplementedError

    def stop(self, reason: str) -> Any:
        """Stop the job for good with ``reason``; whether it was running (False: stopped already)."""
        def fill(pipe: Any) -> None:
            pipe.hget(self.meta_key, "status")
            pipe.hset(self.meta_key, mapping={"status": STOPPED, "reason": reason})
        return self._run(fill, lambda replies: replies[0] != STOPPED.encode())

    def retire_key(self, fingerprint: str, reason: str) -> Any:
        """Retire a key for this job; True the first time."""
        return self._run(lambda pipe: pipe.hsetnx(keys.job_retired(self.id), fingerprint, reason),
                         lambda replies: bool(replies[0]))

    def retired_keys(self) -> Any:
        """The job's retired keys: fingerprint -> why."""
        return self._run(lambda pipe: pipe.hgetall(keys.job_retired(self.id)), lambda replies: _decode(replies[0]))

    def _lease_call(self, owner: str, ms: int, indices: list[str]) -> dict[str, Any]:
        """``lua/lease.lua``: take the leases of ``indices`` for ``owner`` for ``ms``."""
        return {"keys": [*self.rows, self.meta_key, *self.leases], "args": [owner, ms, *_index_slots(indices)]}

    def _renew_call(self, owner: str, ms: int, indices: Iterable[str]) -> dict[str, Any]:
        """``lua/renew.lua``: extend ``owner``'s leases of ``indices`` by ``ms`` (0: end them)."""
        return {"keys": self.leases, "args": [owner, ms, *indices]}

    def release(self, index: str) -> Any:
        """Give an unanswered row back (the job stopped) so that a later submit enqueues it;
        truthy when this call released it (on an asyncio client, an awaitable of that)."""
        return self._scripts.release(**self._release_call(index))

    def queue_release(self, index: str, pipe: Any) -> None:
        """Queue on ``pipe`` the release of an unanswered row (the job stopped)."""
        queue(pipe, self._scripts.release, **self._release_call(index))

    def queue_cache_hit(self, saved_nano: int, pipe: Any) -> None:
        """Queue on ``pipe`` a row answered from the response cache, and the dollars it saved."""
        pipe.hincrby(self.meta_key, "cache_hits", 1)
        pipe.hincrby(self.meta_key, "cache_saved_nano", saved_nano)


def _index_slots(indices: Iterable[str]) -> list[str]:
    """``index, slot, index, slot, ...``: how ``lua/lease.lua`` and ``lua/orphans.lua`` take rows."""
    return [part for index in indices for part in (index, keys.slot(index))]


class Job(_JobBase):
    """Handle on one job's Redis state (blocking client)."""

    client: redis.Redis
    _prune_at = PRUNE_FLOOR

    # -- lifecycle ------------------------------------------------------------------------------
    def begin_submit(self, **meta: Any) -> None:
        """Record the job (paths, input fingerprint, model, total) as being submitted and running;
        its state no longer expires."""
        fields = {k: str(v) for k, v in meta.items() if v is not None}
        fields.update(status=RUNNING, reason="", submitting="1", updated=str(time.time()))
        pipe = self.client.pipeline()
        pipe.hset(self.meta_key, mapping=fields)
        pipe.hsetnx(self.meta_key, "created", str(time.time()))
        pipe.delete(keys.job_retired(self.id))
        pipe.sadd(keys.JOBS, self.id)
        for key in keys.job_keys(self.id):
            pipe.persist(key)
        pipe.execute()

    def begin_collect(self, output_format: str) -> None:
        """Mark the job as being submitted, with its output format, before a collector starts
        beside the submit (``run``): the collector then never guesses either."""
        self.client.hset(self.meta_key, mapping={"submitting": "1", "output_format": output_format})

    def clear_reservations(self) -> None:
        """Forget the budget shares held by requests in flight (call only when none is)."""
        self.client.hset(self.meta_key, mapping={"reserved_nano": 0, "reserved_tokens": 0})

    def end_submit(self) -> None:
        self.client.hset(self.meta_key, mapping={"submitting": "0", "updated": str(time.time())})

    def mark_complete(self, ttl: float | None = None) -> None:
        """Every row has its final result on disk (set by the collector); the state expires after
        ``ttl`` seconds unless the job is submitted again."""
        pipe = self.client.pipeline()
        pipe.hset(self.meta_key, mapping={"status": COMPLETE, "updated": str(time.time())})
        if ttl:
            for key in keys.job_keys(self.id):
                pipe.expire(key, int(ttl))
        pipe.execute()

    def meta(self) -> dict[str, str]:
        return _decode(self.client.hgetall(self.meta_key))

    def exists(self) -> bool:
        return bool(self.client.exists(self.meta_key))

    def in_batches(self) -> int:
        """Rows in the batch lane's files now (deleted with a file, after its rows are published)."""
        return int(self.client.scard(keys.job_in_batch(self.id)))

    def status(self) -> str | None:
        raw = self.client.hget(self.meta_key, "status")
        return raw.decode() if raw else None

    def progress(self) -> Progress:
        m = self.meta()

        def num(name: str) -> int:
            return int(m.get(name) or 0)

        return Progress(job=self.id, status=m.get("status", RUNNING), total=num("total"),
                        claimed=num("claimed"), reported=num("reported"), released=num("released"),
                        nulls=num("nulls"), prompt_tokens=num("prompt_tokens"),
                        completion_tokens=num("completion_tokens"),
                        submitting=m.get("submitting") == "1", reason=m.get("reason", ""), meta=m)

    # -- rows -----------------------------------------------------------------------------------
    def claim(self, indices: Iterable[str], chunk: int = 2000) -> Claim:
        """Claim rows that output.jsonl lacks or holds as null; say which ones to enqueue."""
        out = Claim()
        ks = [*self.rows, self.meta_key]
        batch: list[str] = []

        def flush() -> None:
            claimed, busy, pending, redone = self._scripts.claim(keys=ks, args=[keys.slot(i) for i in batch])
            by_slot = {keys.slot(i): i for i in batch}
            out.claimed += [by_slot[s.decode()] for s in claimed]
            out.redone.update(by_slot[s.decode()] for s in redone)
            out.busy += int(busy)
            out.pending += int(pending)
            batch.clear()

        for index in indices:
            batch.append(index)
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        return out

    def unclaim(self, indices: Iterable[str]) -> int:
        """Give rows claimed a moment ago, and not enqueued, back to the collected state: their
        lines reached output.jsonl after the submit read it (see ``lua/unclaim.lua``)."""
        slots = [keys.slot(i) for i in indices]
        return int(self._scripts.unclaim(keys=[*self.rows, self.meta_key], args=slots)) if slots else 0

    def dedupe(self, rows: Iterable[tuple[str, str]]) -> set[str]:
        """Register ``(index, request hash)`` of rows just claimed; return the indices that are
        copies of a pending row with the identical request (not to be enqueued: they get its result)."""
        args: list[str] = []
        for index, digest in rows:
            args += [digest, keys.slot(index), index]
        if not args:
            return set()
        found = self._scripts.dedupe(keys=[*self.rows, keys.job_requests(self.id), keys.job_copies(self.id)],
                                     args=args)
        if self.client.hlen(keys.job_requests(self.id)) > self._prune_at:
            self._prune_at = max(PRUNE_FLOOR, 2 * self.prune_requests())
        return {i.decode() if isinstance(i, bytes) else i for i in found}

    def prune_requests(self, step: int = 1000) -> int:
        """Forget the identical-request entries whose row is published or given back (they can
        make no more copies), ``step`` entries a call so Redis never stalls; return how many are
        left. :meth:`dedupe` runs it whenever the hash doubled since the last time, so it holds
        about twice the rows in flight (``max_queued``), not a row for each row of the job."""
        cursor: bytes | str = "0"
        while True:
            cursor = self._scripts.prune(keys=[*self.rows, keys.job_requests(self.id)], args=[cursor, step])
            if cursor in (b"0", "0", 0):
                return int(self.client.hlen(keys.job_requests(self.id)))

    def copies(self) -> set[str]:
        """Rows waiting for the result of their primary (no task of their own)."""
        out: set[str] = set()
        for raw in self.client.hvals(keys.job_copies(self.id)):
            out.update(entry.split("\n", 1)[1] for entry in json.loads(raw))
        return out

    def publish(self, result: RowResult) -> bool:
        """Publish a row's final result; False when it was already published (another copy)."""
        return bool(self._scripts.publish(**self._publish_call(result)))

    def unfinished(self) -> set[str]:
        """Rows claimed (a task was enqueued for them) whose result is not published yet."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys.job_claimed(self.id))
        pipe.get(keys.job_done(self.id))
        pipe.hgetall(keys.job_rows(self.id))
        claimed, done, others = pipe.execute()
        claimed, done = claimed or b"", done or b""
        size = max(len(claimed), len(done))
        mask = bytes(c & ~d & 0xFF for c, d in zip(claimed.ljust(size, b"\0"), done.ljust(size, b"\0")))
        out = {str(n) for n in _bits(mask)}
        out.update(k.decode() for k, v in others.items() if int(v) == 1)
        return out - self.copies() - self.in_batch()

    def in_batch(self) -> set[str]:
        """Rows in a batch-lane chunk now: no task message holds them (see ``batchlane``)."""
        return {i.decode() for i in self.client.smembers(keys.job_in_batch(self.id))}

    def collected(self, entry_ids: list[Any], indices: list[str]) -> None:
        """Acknowledge stream entries stored on disk and mark their rows collected."""
        self._scripts.collected(keys=[*self.rows, keys.job_results(self.id)],
                                args=[keys.COLLECTOR_GROUP, len(entry_ids), *entry_ids,
                                      *(keys.slot(i) for i in indices)])

    def forget_queued(self) -> None:
        """Forget claims of rows that are not done (their tasks are gone).

        Only for a private broker whose queue was purged: every claimed, unfinished row is then
        claimable again; rows published but not collected keep their claim (their result is in
        the stream).
        """
        claimed, done, rows = self.rows
        pipe = self.client.pipeline()
        pipe.bitop("AND", claimed, claimed, done)
        pipe.hgetall(rows)
        pipe.hget(self.meta_key, "reported")
        pipe.hget(self.meta_key, "released")
        _, others, reported, released = pipe.execute()
        batched = self.in_batch()  # in a provider's batch: still claimed, not in the queue
        pipe = self.client.pipeline()
        for index, flags in others.items():
            if int(flags) == 1 and index.decode() not in batched:
                pipe.hdel(rows, index)
        for index in batched:
            n = index_number(index)
            if n is not None:
                pipe.setbit(claimed, n, 1)
        pipe.hset(self.meta_key, "claimed", int(reported or 0) + int(released or 0) + len(batched))
        pipe.delete(*self.leases, keys.job_copies(self.id))
        pipe.execute()

    def delete(self) -> None:
        """Forget the job entirely (``reset``, and in-memory jobs once their answers are returned).

        Task messages of the job still in the broker find no job and are dropped by the workers."""
        chunks = [keys.job_chunk(self.id, c.decode()) for c in self.client.hkeys(keys.job_batches(self.id))]
        self.client.delete(*keys.job_keys(self.id), *chunks)
        self.client.srem(keys.JOBS, self.id)

    # -- keys -----------------------------------------------------------------------------------
    def orphans(self, indices: list[str]) -> set[str]:
        """Rows of a running job among ``indices`` that are not done and hold no live lease."""
        found = self._scripts.orphans(keys=[*self.rows, self.meta_key, self.leases[0]], args=_index_slots(indices))
        return {i.decode() if isinstance(i, bytes) else str(i) for i in found}

    def set_cutover(self, at: float | str) -> None:
        """When the job's rows still in batches go through the synchronous lane (``--deadline``)."""
        self.client.hset(self.meta_key, "cutover_at", at)

    def _run(self, fill: Callable[[Any], None], read: Callable[[list[Any]], Any]) -> Any:
        pipe = self.client.pipeline()
        fill(pipe)
        return read(pipe.execute())


class AsyncJob(_JobBase):
    """The calls a worker's engine makes on a job, on a ``redis.asyncio`` client."""

    def queue_state(self, index: str, pipe: Any) -> None:
        """Queue the reads of ``(job status, row done)`` on ``pipe``: two replies for :meth:`read_state`."""
        pipe.hget(self.meta_key, "status")
        n = index_number(index)
        if n is None:
            pipe.hget(keys.job_rows(self.id), index)
        else:
            pipe.getbit(keys.job_done(self.id), n)

    @staticmethod
    def read_state(index: str, replies: list[Any]) -> tuple[str | None, bool]:
        """``(job status or None when the job is unknown, row done)``."""
        status, done = replies
        if index_number(index) is None:
            done = int(done or 0) & 2
        return (status.decode() if status else None), bool(done)

    def queue_publish(self, result: RowResult, pipe: Any) -> None:
        """Queue the publication of a row's result on ``pipe`` (see ``scripts.run_pipeline``);
        its reply says whether it was new."""
        queue(pipe, self._scripts.publish, **self._publish_call(result))

    async def take_leases(self, owner: str, ms: int, indices: list[str]) -> list[Any]:
        """``[job status, code per index]`` of ``lua/lease.lua`` (``store/leases.py`` reads it)."""
        return list(await run_script(self.client, self._scripts.lease, **self._lease_call(owner, ms, indices)))

    async def renew_leases(self, owner: str, ms: int, indices: Iterable[str]) -> list[Any]:
        """Extend (``ms`` 0: end) ``owner``'s leases; the indices whose lease another took over."""
        return list(await run_script(self.client, self._scripts.renew, **self._renew_call(owner, ms, indices)))

    async def next_chunk_id(self) -> str:
        """A new chunk of the batch lane's: its id."""
        return str(await self.client.hincrby(self.meta_key, "chunks", 1))

    async def meta_fields(self, *names: str) -> list[str | None]:
        return [v.decode() if v is not None else None for v in await self.client.hmget(self.meta_key, names)]

    async def _run(self, fill: Callable[[Any], None], read: Callable[[list[Any]], Any]) -> Any:
        pipe = self.client.pipeline()
        fill(pipe)
        return read(await pipe.execute())


def list_jobs(client: redis.Redis) -> list[str]:
    return sorted(j.decode() for j in client.smembers(keys.JOBS))
