"""Collect: stream finished rows from Redis into output.jsonl, then rewrite it in input order.

Crash safety: a stream entry is acknowledged (and deleted) only after its line is fsync'd, so a
killed collector re-reads unacknowledged entries on restart; lines already on disk are recognised
by index and not written twice, and a half-written last line is cut off before anything else.
Acknowledging marks the rows collected, so that a line later deleted from output.jsonl (or
turned null) is sent again by the next submit. While it waits, the collector also runs the
broker's recovery (``broker.recover_stale``, ``broker.LostRows``): it only calls it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from opt_queue.core import formats
from opt_queue.store import keys
from opt_queue.core.answers import RowResult
from opt_queue.queue.broker import LostRows, recover_stale
from opt_queue.store.leases import LEASE_SECONDS
from opt_queue.core.config import Config
from opt_queue.jobflow.dataset import (
    IndexList,
    IndexSet,
    LinePlaces,
    OutputState,
    atomic_write,
    errors_path,
    finished_rows,
    iter_input,
    mark_finished,
    placed_lines,
    read_output,
    repair_tail,
    rewrite_output,
)
from opt_queue.core.errors import InputError, JobStopped, OptQueueError, OutputError
from opt_queue.store.jobs import STOPPED, Job, Progress
from opt_queue.jobflow.producer import requeue
from opt_queue.jobflow.status import key_status

log = logging.getLogger(__name__)
CONSUMER = "collector"
READ_COUNT = 2000
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
BLOCK_MS = 500
KEYS_EVERY = 1.0
"""Seconds between two reads of the keys' state for the live display, at least..."""
KEYS_SHARE = 20
"""...and at least this many times what the last read took (so at most 5% of the collector's time)."""


@dataclass
class CollectStatus:
    """What the collector knows, for progress displays and the final summary."""

    job: str
    total: int
    answered: int = 0
    nulls: int = 0
    written: int = 0
    started: float = field(default_factory=time.monotonic)
    progress: Progress | None = None
    complete: bool = False
    null_reasons: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    keys: list[dict[str, Any]] = field(default_factory=list)
    keys_read: float = 0.0
    keys_every: float = 1.0  # seconds between two reads of the keys' state

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.answered - self.nulls)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.written / elapsed if elapsed > 0 else 0.0


class ResultStream:
    """The job's results stream, read through the collectors' consumer group."""

    pending_every = 5.0
    """Seconds of reading nothing after which the entries delivered before are read again: a read
    whose reply a Redis restart lost, and which redis-py then ran again by itself, left its entries
    delivered to this consumer but never seen (they would wait for ever)."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client = client
        self.key = keys.job_results(job_id)
        try:
            client.xgroup_create(self.key, keys.COLLECTOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, pending: bool) -> list[tuple[bytes, dict[Any, Any]]]:
        """Entries delivered before but not acknowledged (``pending``), else new ones (blocks briefly)."""
        res = self.client.xreadgroup(keys.COLLECTOR_GROUP, CONSUMER, {self.key: "0" if pending else ">"},
                                     count=READ_COUNT, block=None if pending else BLOCK_MS)
        return res[0][1] if res else []

    def ack(self, entries: list[tuple[bytes, dict[Any, Any]]], job: Job | None = None) -> None:
        """Acknowledge and delete entries whose rows are safely stored; with ``job``, mark their
        rows collected too (a row whose line later disappears from the file is then sent again)."""
        ids = [e[0] for e in entries]
        if job is not None:
            job.collected(ids, [RowResult.from_fields(f).index for _id, f in entries if f])
            return
        pipe = self.client.pipeline()
        pipe.xack(self.key, keys.COLLECTOR_GROUP, *ids)
        pipe.xdel(self.key, *ids)
        pipe.execute()

    def empty(self) -> bool:
        return self.client.xlen(self.key) == 0

    def entries(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[list[tuple[bytes, dict[Any, Any]]]]:
        """Batches of entries, pending ones first; an empty batch means nothing arrived for a moment.

        Rides out a Redis restart: it waits for the server to come back instead of failing.
        """
        pending = True
        idle_since = time.monotonic()
        while not should_stop():
            try:
                got = self.read(pending)
            except _REDIS_DOWN as exc:
                log.warning("Redis unavailable (%s); waiting for it to come back", type(exc).__name__)
                time.sleep(1.0)
                pending = True  # re-read what was delivered but not acknowledged
                continue
            if pending and not got:
                pending = False
                idle_since = time.monotonic()
                continue
            if got:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.pending_every:
                pending = True  # see pending_every
            yield got


class _Recovery:
    """The broker's recovery, run by whoever waits for a job's results (see ``broker``)."""

    def __init__(self, client: redis.Redis, job_id: str, requeue: Callable[[set[str]], int] | None,
                 lease_seconds: float) -> None:
        self.client = client
        self.lease_seconds = lease_seconds
        self.lost = LostRows(client, job_id, requeue, lease_seconds) if requeue else None
        self._last = 0.0

    def check(self, p: Progress, *signature: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.lease_seconds / 6:
            self._last = now
            recover_stale(self.client, self.lease_seconds)
        if self.lost is not None and not p.submitting and p.outstanding:
            self.lost.check((p.reported, p.released, p.claimed, *signature))


Entries = list[tuple[bytes, dict[Any, Any]]]
COMPLETE, LEAVE = "complete", "leave"
"""Verdicts that end :func:`read_results`: every row is in (the collector then rewrites its file), or
leave for now (the job goes on without this collector)."""


def read_results(job: Job, stream: ResultStream, recovery: _Recovery, take: Callable[[Entries], None],
           verdict: Callable[[Progress, bool, bool], str | None], signature: Callable[[], Any],
           should_stop: Callable[[], bool] = lambda: False, mark_collected: bool = True) -> str | None:
    """The collection loop of both collectors (into a file, into memory).

    Each batch of results goes to ``take`` (which stores it), then is acknowledged (with
    ``mark_collected``, its rows are marked collected). After each read, ``verdict(progress, idle,
    quiet)`` may end the loop: ``idle`` when the read found nothing, ``quiet`` when besides nothing
    more can arrive (no row outstanding, no submit running, the stream empty). A stopped job that
    is quiet raises :class:`JobStopped`; while idle, the broker's recovery runs (``signature``
    tells it whether the job moved). Returns the verdict that ended it, None if asked to stop."""
    for got in stream.entries(should_stop):
        if got:
            take(got)
        try:
            if got:
                stream.ack(got, job if mark_collected else None)
            p = job.progress()
            quiet = not got and p.outstanding == 0 and not p.submitting and stream.empty()
            ended = verdict(p, not got, quiet)
        except _REDIS_DOWN:
            continue  # entries() waits for Redis; unacknowledged entries come back, deduplicated
        if ended:
            return ended
        if got:
            continue
        if p.status == STOPPED and quiet:
            raise JobStopped(f"job {job.id} stopped: {p.reason}")
        recovery.check(p, signature())
    return None


def gather(client: redis.Redis, job_id: str, count: int,
           on_result: Callable[[RowResult], None] | None = None,
           requeue: Callable[[set[str]], int] | None = None,
           lease_seconds: float = LEASE_SECONDS) -> dict[str, RowResult]:
    """Collect ``count`` distinct results of a job into memory (no files); raise
    :class:`JobStopped` if the job stops first. Recovers stalled rows the way ``collect`` does
    (``requeue`` enqueues rows whose messages were lost)."""
    results: dict[str, RowResult] = {}

    def take(entries: Entries) -> None:
        for _id, fields in entries:
            if fields:
                r = RowResult.from_fields(fields)
                if r.index not in results and on_result:
                    on_result(r)
                results.setdefault(r.index, r)

    read_results(Job(client, job_id), ResultStream(client, job_id),
           _Recovery(client, job_id, requeue, lease_seconds), take,
           lambda p, idle, quiet: COMPLETE if len(results) >= count else None,
           lambda: len(results), mark_collected=False)
    return results


@contextmanager
def _locked(output: Path) -> Iterator[None]:
    lock_path = output.with_name(output.name + ".lock")
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another collector is writing {output}; stop it first") from None
        yield
    finally:
        fh.close()


class Collector:
    """Streams one job's results into its output file."""

    def __init__(self, client: redis.Redis, job_id: str, output: str | os.PathLike[str],
                 input_path: str | os.PathLike[str] | None = None, config: Config | None = None) -> None:
        self.config = config  # lets the collector enqueue again rows whose tasks were lost
        self.client = client
        self.job = Job(client, job_id)
        self.output = Path(output)
        self.errors = errors_path(self.output)
        self._input = input_path
        self.format = formats.SEED

    def __repr__(self) -> str:
        return f"<Collector {self.job.id} -> {self.output}>"

    def _input_path(self, follow: bool) -> Path:
        if self._input:
            return Path(self._input)
        while True:
            given = self.job.meta().get("input")
            if given:
                return Path(given)
            if not follow:
                raise OptQueueError(f"job {self.job.id} is unknown to this broker; run submit first "
                                    f"(or collect --follow to wait for it)")
            time.sleep(1)

    def run(self, *, follow: bool = False, on_progress: Callable[[CollectStatus], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, drain: bool = False) -> CollectStatus:
        """Collect until the job is complete (exit normally), stopped (raise :class:`JobStopped`),
        or, without ``follow``, until nothing more can arrive. With ``drain``, write what Redis
        holds now and return (after an interrupted ``run``: its workers are stopped)."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.output):
            return self._run(follow, on_progress or (lambda s: None), should_stop, drain)

    def _run(self, follow: bool, on_progress: Callable[[CollectStatus], None],
             should_stop: Callable[[], bool], drain: bool = False) -> CollectStatus:
        rows = finished_rows(self._input, self.output)
        if rows is not None:  # finished before, and both files are as they were then
            return CollectStatus(job=self.job.id, total=rows, answered=rows, complete=True)
        input_path = self._input_path(follow)
        self.format = self.job.meta().get("output_format") or formats.SEED
        # A few bytes a row, never a map of strings: the input's order as numbers, sets as bits, and
        # the output's lines known by index only (their places are read at the final rewrite).
        digest = hashlib.sha256()
        try:
            order = IndexList(row.index for row in iter_input(input_path, skip_bad=True, digest=digest))
        except InputError as exc:
            raise OptQueueError(f"cannot read the job's input {input_path}: {exc}; pass --input") from None
        state = read_output(self.output, offsets=False)
        repair_tail(self.errors)
        inputs = order.as_set()
        status = CollectStatus(job=self.job.id, total=len(order), answered=order.count_in(state.answered),
                               nulls=order.count_in(state.nulls))
        stream = ResultStream(self.client, self.job.id)
        config = self.config or Config()
        recovery = _Recovery(self.client, self.job.id,
                             (lambda lost: requeue(self.client, self.job.id, input_path, config, lost))
                             if self.config is not None else None, config.lease_seconds)
        def verdict(p: Progress, idle: bool, quiet: bool) -> str | None:
            status.progress = p
            self._refresh_keys(status)
            on_progress(status)
            if not idle:
                return None
            if drain:  # write what Redis holds now and leave, unless that completes the file
                return COMPLETE if quiet and status.remaining == 0 else LEAVE
            if p.status == STOPPED:
                return None  # read_results() raises JobStopped once nothing more can arrive
            if quiet and status.remaining == 0:
                return COMPLETE
            return LEAVE if quiet and not follow else None

        out = open(self.output, "a", encoding="utf-8")
        err = open(self.errors, "a", encoding="utf-8")
        try:
            ended = read_results(
                self.job, stream, recovery, lambda got: self._write(got, state, inputs, status, out, err),
                verdict, lambda: status.written, should_stop)
        finally:
            out.close()
            err.close()
        if ended != COMPLETE:
            return status  # asked to stop, or left a job that goes on
        self._finalize(order, status, input_path, digest.hexdigest())
        on_progress(status)
        return status

    def _refresh_keys(self, status: CollectStatus) -> None:
        """Per-key usage for live displays, read at most once a second, and at most 5% of the
        time: with a thousand keys one read costs tens of ms of CPU, which the workers on the
        same machine need."""
        now = time.monotonic()
        if now - status.keys_read >= status.keys_every:
            status.keys = key_status(self.client, self.job.retired_keys(),
                                     (self.config or Config()).learned_limits_ttl)
            status.keys_read = time.monotonic()
            status.keys_every = max(KEYS_EVERY, (status.keys_read - now) * KEYS_SHARE)

    def _write(self, entries: list[tuple[bytes, dict[Any, Any]]], state: Any, inputs: IndexSet,
               status: CollectStatus, out: IO[str], err: IO[str]) -> None:
        for _entry_id, fields in entries:
            if not fields:  # deleted entry still listed as pending
                continue
            r = RowResult.from_fields(fields)
            was_null = r.index in state.nulls
            new = state.record(r.index, r.answer)
            if (r.answer is None and (new or was_null)) or (r.warning and new):
                # also when the null line made it to disk before a crash but its reason did not
                err.write(formats.error_line(self.format, r) or "")
            if not new:
                continue
            out.write(formats.line(self.format, r))
            status.written += 1
            if r.index not in inputs:
                continue
            if r.answer is None:
                status.nulls += 1
            else:
                status.answered += 1
                status.nulls -= was_null
        for fh in (out, err):
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite_errors(self, order: IndexList, state: OutputState, status: CollectStatus) -> None:
        """Rewrite output.errors.jsonl in input order with the last line of each row that has one
        (a null's reason, an answer's warning), counting the reasons. Its memory is the places of
        those lines (:class:`LinePlaces`), not their text: every row of a job may have one."""
        places = LinePlaces()
        found = self.errors.exists()
        if found:
            with open(self.errors, "rb") as fh:
                offset = 0
                for raw in fh:
                    try:
                        index = formats.error_index(json.loads(raw))
                    except ValueError:
                        index = None  # a torn line from a crash; the entry was re-read and rewritten
                    if index is not None:
                        warning = b'"warning": true' in raw
                        if (index in state.nulls and not warning) or (index in state.answered and warning):
                            places[index] = (offset, len(raw))
                    offset += len(raw)

        def lines() -> Iterator[bytes]:
            if not found:
                return
            for _index, line in placed_lines(self.errors, order, places):
                if line is None:
                    continue
                entry = json.loads(line)
                counter = status.warnings if entry.get("warning") else status.null_reasons
                counter[entry.get("error_type") or (entry.get("error") or {}).get("code") or "unknown"] += 1
                yield line if line.endswith(b"\n") else line + b"\n"

        atomic_write(self.errors, lines(), binary=True)

    def _finalize(self, order: IndexList, status: CollectStatus, input_path: Path, input_sha256: str) -> None:
        """Rewrite output.jsonl in input order, one line per row, and the errors of its nulls;
        when every row is answered, note it (:func:`~opt_queue.jobflow.dataset.mark_finished`)."""
        state = read_output(self.output)
        rewrite_output(self.output, iter(order), state)
        state.offsets = None  # stale once rewritten; the sets stay true for the input's rows
        self._rewrite_errors(order, state, status)
        status.answered = order.count_in(state.answered)
        status.nulls = order.count_in(state.nulls)
        status.complete = True
        self.job.mark_complete((self.config or Config()).state_ttl)
        if status.answered == len(order):
            mark_finished(input_path, input_sha256, self.output, len(order))
