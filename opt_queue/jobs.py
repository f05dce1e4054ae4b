"""A job's state in Redis: its metadata, which rows are claimed and done, its results stream.

A job is one output file (its id is derived from the output path unless named), fed by one input
file. Rows are identified in Redis by their position in the input (``seq``), so the bitmaps stay
small: a million rows cost 125 kB per bitmap.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from opt_queue import keys
from opt_queue.scripts import queue, scripts_for

RUNNING, STOPPED, COMPLETE = "running", "stopped", "complete"


def job_id_for(output_path: str | os.PathLike[str], name: str | None = None) -> str:
    """Return the job id: ``name`` when given, else a stable hash of the output's absolute path."""
    if name:
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError("a job name may hold letters, digits, '-', '_' and '.' only")
        return name
    resolved = str(Path(output_path).resolve())
    return Path(output_path).stem[:24] + "-" + hashlib.sha256(resolved.encode()).hexdigest()[:8]


@dataclass
class RowResult:
    """The final outcome of one row, as published to the job's results stream."""

    seq: int
    index: str
    answer: str | None
    error_type: str | None = None
    error: str | None = None
    attempts: int = 0
    key: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_fields(self) -> dict[str, str]:
        return {"r": json.dumps(asdict(self), ensure_ascii=False)}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> RowResult:
        raw = fields.get(b"r", fields.get("r"))
        return cls(**json.loads(raw))


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


class _JobBase:
    """A job's Redis names and the arguments of the scripts both job handles call."""

    def __init__(self, client: Any, job_id: str) -> None:
        self.client = client
        self.id = job_id
        self._scripts = scripts_for(client)
        self.meta_key = keys.job_meta(job_id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def _publish_call(self, result: RowResult) -> dict[str, Any]:
        ks = [keys.job_done(self.id), keys.job_answered(self.id), self.meta_key, keys.job_results(self.id)]
        flat: list[str] = []
        for k, v in result.to_fields().items():
            flat += [k, v]
        return {"keys": ks, "args": [result.seq, 0 if result.answer is None else 1, result.prompt_tokens,
                                     result.completion_tokens, *flat]}

    def _release_call(self, seq: int) -> dict[str, Any]:
        return {"keys": [keys.job_claimed(self.id), keys.job_done(self.id), self.meta_key], "args": [seq]}


class Job(_JobBase):
    """Handle on one job's Redis state (blocking client)."""

    client: redis.Redis

    # -- lifecycle ------------------------------------------------------------------------------
    def begin_submit(self, **meta: Any) -> None:
        """Record the job (paths, model, total) and mark it as being submitted and running."""
        fields = {k: str(v) for k, v in meta.items() if v is not None}
        fields.update(status=RUNNING, reason="", submitting="1", updated=str(time.time()))
        pipe = self.client.pipeline()
        pipe.hset(self.meta_key, mapping=fields)
        pipe.hsetnx(self.meta_key, "created", str(time.time()))
        pipe.delete(keys.job_retired(self.id))
        pipe.sadd(keys.JOBS, self.id)
        pipe.execute()

    def end_submit(self) -> None:
        self.client.hset(self.meta_key, mapping={"submitting": "0", "updated": str(time.time())})

    def stop(self, reason: str) -> bool:
        """Stop the job for good with ``reason``; return False if it was already stopped."""
        pipe = self.client.pipeline()
        pipe.hget(self.meta_key, "status")
        pipe.hset(self.meta_key, mapping={"status": STOPPED, "reason": reason})
        before, _ = pipe.execute()
        return before != STOPPED.encode()

    def mark_complete(self) -> None:
        """Every row has its final result on disk (set by the collector)."""
        self.client.hset(self.meta_key, mapping={"status": COMPLETE, "updated": str(time.time())})

    def meta(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.meta_key).items()}

    def exists(self) -> bool:
        return bool(self.client.exists(self.meta_key))

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
    def claim(self, rows: Iterable[tuple[int, bool]], chunk: int = 2000) -> list[int]:
        """Claim ``(seq, is_null_retry)`` rows; return the seqs this caller must enqueue."""
        ks = [keys.job_claimed(self.id), keys.job_done(self.id), keys.job_answered(self.id), self.meta_key]
        claimed: list[int] = []
        argv: list[Any] = []
        for seq, retry in rows:
            argv += [seq, "n" if retry else "m"]
            if len(argv) >= 2 * chunk:
                claimed += [int(s) for s in self._scripts.claim(keys=ks, args=argv)]
                argv = []
        if argv:
            claimed += [int(s) for s in self._scripts.claim(keys=ks, args=argv)]
        return claimed

    def publish(self, result: RowResult) -> bool:
        """Publish a row's final result; False when it was already published (redelivery)."""
        return bool(self._scripts.publish(**self._publish_call(result)))

    def unfinished(self) -> set[int]:
        """Rows claimed (a task was enqueued for them) whose result is not published yet."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(keys.job_claimed(self.id))
        pipe.get(keys.job_done(self.id))
        claimed, done = (raw or b"" for raw in pipe.execute())
        size = max(len(claimed), len(done))
        bits = int.from_bytes(claimed.ljust(size, b"\0"), "big") & ~int.from_bytes(done.ljust(size, b"\0"), "big")
        seqs = set()
        while bits:  # Redis numbers bits from the most significant bit of the first byte
            top = bits.bit_length() - 1
            seqs.add(8 * size - 1 - top)
            bits ^= 1 << top
        return seqs

    def release(self, seq: int) -> bool:
        """Give an unanswered row back (the job stopped) so that a later submit enqueues it."""
        return bool(self._scripts.release(**self._release_call(seq)))

    def forget_queued(self) -> None:
        """Forget claims of rows that are neither done nor released (their tasks are gone).

        Only for a private broker whose queue was purged: every claimed, unfinished row is then
        claimable again.
        """
        pipe = self.client.pipeline()
        pipe.delete(keys.job_claimed(self.id))
        pipe.hget(self.meta_key, "reported")
        pipe.hget(self.meta_key, "released")
        _, reported, released = pipe.execute()
        self.client.hset(self.meta_key, "claimed", int(reported or 0) + int(released or 0))

    def delete(self) -> None:
        """Forget the job entirely (in-memory jobs, once their answers are returned)."""
        self.client.delete(*keys.job_keys(self.id))
        self.client.srem(keys.JOBS, self.id)

    # -- keys -----------------------------------------------------------------------------------
    def retire_key(self, fingerprint: str, reason: str) -> bool:
        """Retire a key for this job; return True the first time."""
        return bool(self.client.hsetnx(keys.job_retired(self.id), fingerprint, reason))

    def retired_keys(self) -> dict[str, str]:
        raw = self.client.hgetall(keys.job_retired(self.id))
        return {k.decode(): v.decode() for k, v in raw.items()}


class AsyncJob(_JobBase):
    """The calls a worker's engine makes on a job, on a ``redis.asyncio`` client."""

    def queue_state(self, seq: int, pipe: Any) -> None:
        """Queue the reads of ``(job stopped, row done)`` on ``pipe``: two replies for :meth:`read_state`."""
        pipe.hget(self.meta_key, "status")
        pipe.getbit(keys.job_done(self.id), seq)

    @staticmethod
    def read_state(replies: list[Any]) -> tuple[bool, bool]:
        status, done = replies
        return status == STOPPED.encode(), bool(done)

    def queue_publish(self, result: RowResult, pipe: Any) -> None:
        """Queue the publication of a row's result on ``pipe`` (see ``scripts.run_pipeline``);
        its reply says whether it was new."""
        queue(pipe, self._scripts.publish, **self._publish_call(result))

    async def release(self, seq: int) -> bool:
        """Give an unanswered row back (the job stopped) so that a later submit enqueues it."""
        return bool(await self._scripts.release(**self._release_call(seq)))

    async def stop(self, reason: str) -> bool:
        """Stop the job for good with ``reason``; return False if it was already stopped."""
        pipe = self.client.pipeline()
        pipe.hget(self.meta_key, "status")
        pipe.hset(self.meta_key, mapping={"status": STOPPED, "reason": reason})
        before, _ = await pipe.execute()
        return before != STOPPED.encode()

    async def retire_key(self, fingerprint: str, reason: str) -> bool:
        """Retire a key for this job; return True the first time."""
        return bool(await self.client.hsetnx(keys.job_retired(self.id), fingerprint, reason))

    async def retired_keys(self) -> dict[str, str]:
        raw = await self.client.hgetall(keys.job_retired(self.id))
        return {k.decode(): v.decode() for k, v in raw.items()}


def list_jobs(client: redis.Redis) -> list[str]:
    return sorted(j.decode() for j in client.smembers(keys.JOBS))
