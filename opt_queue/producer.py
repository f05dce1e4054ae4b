"""Submit: validate the input, then enqueue the rows that output.jsonl does not answer yet
(``rows_per_task`` rows to a task message)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from opt_queue.config import Config
from opt_queue.dataset import InputSummary, Row, iter_input, read_output, validate_input
from opt_queue.jobs import Job
from opt_queue.messages import declare_queue, envelope, push, queued_seqs

log = logging.getLogger(__name__)
BATCH = 1000


@dataclass
class SubmitReport:
    """What a submit did."""

    job: str
    total: int = 0
    enqueued: int = 0
    answered: int = 0
    queued: int = 0
    retried_nulls: int = 0
    bad_lines: int = 0

    @property
    def skipped(self) -> int:
        return self.answered + self.queued


def request_body(row: Row, config: Config) -> dict[str, Any]:
    """The full request for a row: the job's model and parameters, overridden by the row's own."""
    body: dict[str, Any] = {"model": config.model.name, **config.model.params}
    body.update(row.body)
    return body


def task_options(config: Config) -> dict[str, Any]:
    """Job-wide options that travel with every task (the fallback model)."""
    return {"fallback": config.model.fallback} if config.model.fallback else {}


def envelopes(job_id: str, rows: list[Row], config: Config) -> list[str]:
    """Task messages for ``rows``: ``config.rows_per_task`` rows to a task, in input order."""
    options = task_options(config)
    size = config.rows_per_task
    return [envelope(job_id, [(r.seq, r.index, request_body(r, config)) for r in rows[i:i + size]], options)
            for i in range(0, len(rows), size)]


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def submit(client: redis.Redis, job_id: str, input_path: str | os.PathLike[str],
           output_path: str | os.PathLike[str], config: Config, *, skip_bad: bool = False,
           on_progress: Callable[[int, int], None] | None = None,
           validated: InputSummary | None = None,
           on_wait: Callable[[int], None] | None = None) -> SubmitReport:
    """Enqueue every row of ``input_path`` that ``output_path`` does not answer yet.

    Validates the whole input first (nothing is enqueued when a line is bad, unless ``skip_bad``).
    Rows answered on disk are skipped; rows null on disk are tried again; rows already queued by an
    earlier submit are not enqueued twice. Safe to run again at any time.
    """
    summary = validated or validate_input(input_path, skip_bad=skip_bad)
    state = read_output(output_path, offsets=False)
    meta = {"input": str(Path(input_path).resolve()), "output": str(Path(output_path).resolve())}
    return enqueue(client, job_id, iter_input(input_path, skip_bad=skip_bad), summary.rows, config,
                   answered=state.answered, nulls=state.nulls, on_progress=on_progress,
                   bad_lines=len(summary.bad), on_wait=on_wait, **meta)


def requeue_lost(client: redis.Redis, job_id: str, input_path: str | os.PathLike[str], config: Config) -> int:
    """Enqueue again the rows that are claimed and unfinished but whose task message is nowhere.

    Kombu's Redis transport moves a delivered message to its ``unacked`` hash a moment after
    popping it; a worker killed in that moment loses the message. A producer killed between claim
    and push leaves claimed rows without messages too. Either way the row would wait forever; this
    finds such rows and enqueues them again (a copy that is not really lost is harmless: a row's
    result is published once). Returns how many rows were enqueued again.
    """
    job = Job(client, job_id)
    lost = job.unfinished() - queued_seqs(client, job_id)
    if not lost:
        return 0
    rows = [r for r in iter_input(input_path, skip_bad=True) if r.seq in lost]
    push(client, envelopes(job_id, rows, config))
    log.warning("job %s: enqueued %d rows again whose tasks were lost (a worker or submit died "
                "while handling them)", job_id, len(rows))
    return len(rows)


def _release_quietly(job: Job, seqs: list[int]) -> None:
    """Best effort: unclaim rows whose tasks were never pushed, so the next submit sends them."""
    try:
        for seq in seqs:
            job.release(seq)
    except Exception:  # Redis is gone too: the rows stay claimed (see README, Troubleshooting)
        log.warning("could not give back %d claimed rows of job %s; run submit again once Redis "
                    "is back, after their visibility timeout", len(seqs), job.id)


def _wait_for_room(job: Job, max_queued: int, wanted: int, on_wait: Callable[[int], None] | None) -> None:
    """Flow control: block while the job already has ``max_queued`` rows queued or in flight."""
    while True:
        outstanding = job.progress().outstanding
        if outstanding + wanted <= max_queued:
            return
        if on_wait:
            on_wait(outstanding)
        time.sleep(0.2)


def enqueue(client: redis.Redis, job_id: str, rows: Iterable[Row], total: int, config: Config, *,
            answered: Container[str] | None = None, nulls: Container[str] | None = None,
            on_progress: Callable[[int, int], None] | None = None, bad_lines: int = 0,
            on_wait: Callable[[int], None] | None = None, **meta: str) -> SubmitReport:
    """Claim and enqueue ``rows`` (skipping ``answered``; ``nulls`` are retried) for job ``job_id``.

    At most ``config.max_queued`` rows of the job sit in Redis at once: the rest wait here until
    rows finish, so Redis memory stays flat however large the input.
    """
    max_queued = config.max_queued
    answered, nulls = answered or set(), nulls or set()
    job = Job(client, job_id)
    job.begin_submit(total=total, model=config.model.name, **meta)
    report = SubmitReport(job=job_id, total=total, bad_lines=bad_lines)
    done = 0
    declare_queue()
    try:
        for batch in _batches(iter(rows), min(BATCH, max_queued) if max_queued else BATCH):
            wanted = [(r.seq, r.index in nulls) for r in batch if r.index not in answered]
            report.answered += len(batch) - len(wanted)
            if max_queued:
                _wait_for_room(job, max_queued, len(wanted), on_wait)
            claimed = set(job.claim(wanted))
            report.queued += len(wanted) - len(claimed)
            fresh = [r for r in batch if r.seq in claimed]
            report.retried_nulls += sum(r.index in nulls for r in fresh)
            try:
                push(client, envelopes(job_id, fresh, config))
                report.enqueued += len(fresh)
            except BaseException:  # Ctrl-C or Redis gone between claim and push: give the rows back
                _release_quietly(job, [r.seq for r in fresh])
                raise
            done += len(batch)
            if on_progress:
                on_progress(done, total)
    finally:
        job.end_submit()
    log.info("job %s: %d rows enqueued, %d already answered, %d already queued",
             job_id, report.enqueued, report.answered, report.queued)
    return report
