"""Submit: validate the input, then enqueue the rows that output.jsonl does not answer yet
(``rows_per_task`` rows to a task message). Rows are matched by index: the file is the truth."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from opt_queue.core import formats
from opt_queue.lanes.chunks import ChunkWriter, cutover_at, wake
from opt_queue.queue.broker import declare_queue, envelope, push
from opt_queue.core.config import Config
from opt_queue.jobflow.dataset import (
    InputSummary,
    Row,
    FinalFailure,
    catch_up,
    final_failures,
    finished_rows,
    iter_input,
    output_format,
    read_output,
    validate_input,
)
from opt_queue.core.errors import Interrupted, JobStopped, OutputError
from opt_queue.jobflow.estimate import sync_seconds
from opt_queue.store.jobs import STOPPED, Job
from opt_queue.core.prices import nano
from opt_queue.core.request import CHAT_URL, failure_key, paid_once, request_body, request_hash
from opt_queue.core.tokens import estimate_tokens

log = logging.getLogger(__name__)
BATCH = 1000
SAMPLED_AT_MOST = 250_000
"""Distinct requests whose repeats submit counts (``SubmitReport.repeats_sent``) at most."""


@dataclass
class SubmitReport:
    """What a submit did."""

    job: str
    total: int = 0
    enqueued: int = 0
    answered: int = 0
    queued: int = 0
    """Rows queued or in flight already (an earlier submit's)."""
    uncollected: int = 0
    """Rows finished but not written to the output yet: ``collect`` writes them."""
    retried_nulls: int = 0
    copies: int = 0
    """Rows whose request is identical to a row being sent: they get its answer, unpaid."""
    repeats_sent: int = 0
    """Rows that repeat the request of another row of this submit and are sent all the same: they
    sample (see ``request.samples``), so each is its own draw."""
    resent: int = 0
    """Rows collected before whose line output.jsonl no longer has."""
    failed_kept: Counter[str] = field(default_factory=Counter)
    """Nulls not sent again, by reason: the same request would fail the same way (``--retry-failed``)."""
    bad_lines: int = 0
    input_changed: bool = False
    chunks: int = 0
    """Batch lane: the Batch API input files the rows were written into."""
    sync_seconds: float | None = None
    """Deadline: how long the rows would take synchronously at the keys' configured limits."""
    cutover_at: float | None = None
    """Deadline: when the batch lane hands what is not back to the synchronous lane (epoch s)."""

    @property
    def skipped(self) -> int:
        return self.answered + self.queued + self.uncollected + sum(self.failed_kept.values())

    def describe(self) -> str:
        """One line for the user."""
        files = f" in {self.chunks} batch files" if self.chunks else ""
        text = (f"enqueued {self.enqueued} rows{files}, skipped {self.skipped} ({self.answered} already "
                f"answered, {self.queued} already queued")
        if self.uncollected:
            text += f", {self.uncollected} finished and waiting for collect"
        if self.failed_kept:
            reasons = ", ".join(f"{n} {why}" for why, n in self.failed_kept.most_common())
            text += (f", {sum(self.failed_kept.values())} nulls kept ({reasons}): the same request would fail "
                     f"again; --retry-failed sends them")
        text += ")"
        if self.retried_nulls:
            text += f", {self.retried_nulls} nulls retried"
        if self.resent:
            text += f", {self.resent} sent again because output.jsonl no longer has them"
        if self.copies:
            text += f"; {self.copies} rows repeat another row's request and get its answer, unpaid"
        if self.repeats_sent:
            text += (f"; {self.repeats_sent} rows repeat another row's request and are each sent (they "
                     f"sample: temperature unset or above 0, or n > 1; \"dedupe\": true pays them once)")
        return text


def task_row(row: Row, config: Config, url: bool = False) -> list[Any]:
    """A row as a task carries it: ``[index, request]``, or ``[index, request, url]`` for an
    endpoint other than chat completions (or always, with ``url``)."""
    body = request_body(row.url, row.body, config.model.name, config.model.params, config.lane)
    return [row.index, body] if row.url == CHAT_URL and not url else [row.index, body, row.url]


def task_options(config: Config, output: str = formats.SEED) -> dict[str, Any]:
    """Job-wide options that travel with every task: the fallback model, the output format."""
    options: dict[str, Any] = {"fallback": config.model.fallback} if config.model.fallback else {}
    if output != formats.SEED:
        options["output"] = output
    return options


def envelopes(job_id: str, rows: list[Row], config: Config, output: str = formats.SEED) -> list[str]:
    """Task messages for ``rows``: ``config.rows_per_task`` rows to a task, in input order."""
    options = task_options(config, output)
    size = config.rows_per_task
    return [envelope(job_id, [task_row(r, config) for r in rows[i:i + size]], options)
            for i in range(0, len(rows), size)]


def job_output_format(config: Config, summary: InputSummary, output_path: str | os.PathLike[str]) -> str:
    """The job's output format (``config.output_format``, else the input's default), checked
    against the lines ``output_path`` already holds: one file, one format."""
    wanted = formats.resolve(config.output_format, summary.format)
    found = output_format(output_path)
    if found is not None and found != wanted:
        raise OutputError(f"{output_path} holds {found}-format lines and this run would write {wanted}; "
                          f"use --output-format {found} to go on with it, or write to another -o")
    return wanted


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def finished(job_id: str, input_path: str | os.PathLike[str],
             output_path: str | os.PathLike[str]) -> SubmitReport | None:
    """What a submit does when the job finished before and both files are as they were then
    (``dataset.finished_rows``): nothing, said without reading a row; None otherwise."""
    rows = finished_rows(input_path, output_path)
    return None if rows is None else SubmitReport(job=job_id, total=rows, answered=rows)


def submit(client: redis.Redis, job_id: str, input_path: str | os.PathLike[str],
           output_path: str | os.PathLike[str], config: Config, *, skip_bad: bool = False,
           on_progress: Callable[[int, int], None] | None = None,
           validated: InputSummary | None = None,
           on_wait: Callable[[int], None] | None = None,
           should_stop: Callable[[], bool] = lambda: False) -> SubmitReport:
    """Enqueue every row of ``input_path`` that ``output_path`` lacks or holds as null.

    Validates the whole input first (nothing is enqueued when a line is bad, unless ``skip_bad``).
    Rows are matched by index, so the input may have been edited since the last submit. Rows
    queued, in flight or finished but not yet collected are not enqueued twice. Safe to run
    again at any time. ``should_stop`` is asked between batches: when it says so, the rows claimed
    and not enqueued are given back and :class:`Interrupted` is raised.
    """
    done = finished(job_id, input_path, output_path) if validated is None else None
    if done is not None:
        return done
    summary = validated or validate_input(input_path, skip_bad=skip_bad)
    output = job_output_format(config, summary, output_path)
    state = read_output(output_path, offsets=False)
    before = Job(client, job_id).meta().get("input_sha256")

    first_nulls = set(state.nulls)

    def on_disk(indices: set[str]) -> set[str]:
        # A collector may be writing this output while we submit (``run`` starts one beside us; a
        # fleet's ``collect --follow``): rows it acknowledged after our read look collected and
        # missing to the claim. Their lines are on disk now (a collector fsyncs before it
        # acknowledges): an answer, or a null where the file had none.
        nonlocal state
        state = catch_up(output_path, state)
        return {i for i in indices if i in state.answered or (i in state.nulls and i not in first_nulls)}

    meta = {"input": str(Path(input_path).resolve()), "output": str(Path(output_path).resolve()),
            "input_sha256": summary.sha256}
    keep = {} if config.retry_failed else final_failures(output_path, state.nulls)
    report = enqueue(client, job_id, iter_input(input_path, skip_bad=skip_bad), summary.rows, config,
                     answered=state.answered, nulls=state.nulls, keep=keep, on_progress=on_progress,
                     bad_lines=len(summary.bad), on_wait=on_wait, output_format=output, on_disk=on_disk,
                     should_stop=should_stop, **meta)
    report.input_changed = before is not None and before != summary.sha256
    return report


def requeue(client: redis.Redis, job_id: str, input_path: str | os.PathLike[str], config: Config,
            indices: set[str]) -> int:
    """Enqueue ``indices`` again from the input file (their task messages were lost)."""
    rows = [r for r in iter_input(input_path, skip_bad=True) if r.index in indices]
    output = Job(client, job_id).meta().get("output_format") or formats.SEED
    push(client, envelopes(job_id, rows, config, output))
    return len(rows)


def _release_quietly(job: Job, indices: list[str]) -> None:
    """Best effort: unclaim rows whose tasks were never pushed, so the next submit sends them."""
    try:
        for index in indices:
            job.release(index)
    except Exception:  # Redis is gone too: the collector finds such rows once the job stalls
        log.warning("could not give back %d claimed rows of job %s; the collector enqueues them "
                    "again once Redis is back", len(indices), job.id)


def _unless_failed_for_good(batch: list[Row], wanted: list[str], keep: Mapping[str, FinalFailure],
                            config: Config, report: SubmitReport) -> list[str]:
    """``wanted`` without the rows whose last null is final and whose request is the same now."""
    kept: set[str] = set()
    for r in batch:
        failed = keep.get(r.index)
        if failed is None:
            continue
        now = failure_key(r.url, request_body(r.url, r.body, config.model.name, config.model.params, config.lane),
                          config.model.fallback)
        if failed.request is None or failed.request == now:
            kept.add(r.index)
            report.failed_kept[failed.reason] += 1
    return [i for i in wanted if i not in kept] if kept else wanted


def _dedupe(job: Job, rows: list[Row], config: Config, sampled: set[int], report: SubmitReport) -> set[str]:
    """Register the rows whose identical requests are paid once (``request.paid_once``); return
    those that became copies of a row being sent. Rows repeating a request that samples are counted
    in ``report.repeats_sent`` (``sampled`` holds the first :data:`SAMPLED_AT_MOST` distinct
    requests this submit saw, so that a job of any size costs at most ~20 MB for this count)."""
    once: list[tuple[str, str]] = []
    for r in rows:
        body = request_body(r.url, r.body, config.model.name, config.model.params, config.lane)
        digest = request_hash(r.url, body)
        if paid_once(config.dedupe, r.url, body):
            once.append((r.index, digest))
        elif config.dedupe is None:
            raw = int(digest[:16], 16)
            if raw in sampled:
                report.repeats_sent += 1
            elif len(sampled) < SAMPLED_AT_MOST:
                sampled.add(raw)
    copies = job.dedupe(once) if once else set()
    report.copies += len(copies)
    return copies


def _wait_for_room(job: Job, max_queued: int, wanted: int, on_wait: Callable[[int], None] | None,
                   should_stop: Callable[[], bool] = lambda: False, until: float = 0.0,
                   before_waiting: Callable[[], None] | None = None) -> bool:
    """Flow control: block while the job already has ``max_queued`` rows queued, in flight or in
    batches. Return False when there is room (or ``should_stop`` says so), True when ``until``
    (epoch s; 0: never) came first. ``before_waiting``: the batch lane's (it stores the files it
    holds open before the first wait, so that they run and make room; a file's rows count until
    the file is deleted, a moment after they are published)."""
    waited = False
    while True:
        outstanding = job.progress().outstanding
        if before_waiting is not None:
            outstanding = max(outstanding, job.in_batches())
        if outstanding + wanted <= max_queued or should_stop():
            return False
        if until and time.time() >= until:
            return True
        if not waited and before_waiting is not None:
            before_waiting()
            waited = True
        if on_wait:
            on_wait(outstanding)
        time.sleep(0.2)


def _plan(job: Job, config: Config, now: float, needed: list[int], done: int, total: int,
          report: SubmitReport) -> float:
    """A deadline job's cut-over (set on the job; returned) from what sending the batch lane's rows
    synchronously would take at the keys' limits: ``needed`` (rows, tokens) of the ``done`` rows
    read so far, projected to ``total``."""
    scale = total / done if done else 1.0
    report.sync_seconds = sync_seconds(config, config.model.name, round(needed[0] * scale), round(needed[1] * scale))
    report.cutover_at = cutover_at(config.deadline or 0.0, now, report.sync_seconds)
    job.set_cutover(report.cutover_at)
    return report.cutover_at


def _window(config: Config) -> int:
    """How many rows of the job may sit in Redis at once in its lane (0: no bound)."""
    return config.batch_max_queued if config.lane == "batch" else config.max_queued


def enqueue(client: redis.Redis, job_id: str, rows: Iterable[Row], total: int, config: Config, *,
            answered: Container[str] | None = None, nulls: Container[str] | None = None,
            on_progress: Callable[[int, int], None] | None = None, bad_lines: int = 0,
            on_wait: Callable[[int], None] | None = None, output_format: str = formats.SEED,
            on_disk: Callable[[set[str]], set[str]] | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            keep: Mapping[str, FinalFailure] | None = None, **meta: str) -> SubmitReport:
    """Claim and enqueue ``rows`` (skipping ``answered``; ``nulls`` are retried) for job ``job_id``.

    At most ``config.max_queued`` rows of the job sit in Redis at once: the rest wait here until
    rows finish, so Redis memory stays flat however large the input. Raises :class:`JobStopped`
    when the job is stopped meanwhile (every key retired, a wrong model): nothing more is sent.
    ``keep``: nulls that retrying cannot help (``dataset.final_failures``); they are sent again only
    when their request changed.
    """
    # The batch lane's rows wait in chunk files for the providers' batches, hours perhaps, so its
    # window (batch_max_queued) is wider: batches run side by side, and Redis still holds a bounded
    # part of the job. Past a deadline's cut-over the rows not chunked yet go synchronously.
    max_queued = _window(config)
    answered, nulls = answered or set(), nulls or set()
    job = Job(client, job_id)
    if job.exists() and job.progress().outstanding == 0:
        job.clear_reservations()  # budget shares of workers that died holding them
    now = time.time()
    cutover = cutover_at(config.deadline, now) if config.deadline else 0.0  # planned again as files are stored
    job.begin_submit(total=total, model=config.model.name, output_format=output_format,
                     max_cost_nano=nano(config.max_cost), max_tokens_total=config.max_tokens_total or 0,
                     lane=config.lane, deadline_at=now + config.deadline if config.deadline else "",
                     cutover_at=cutover or "", **meta)
    needed = [0, 0]  # deadline: rows and tokens the batch lane takes, to size the synchronous reserve
    report = SubmitReport(job=job_id, total=total, bad_lines=bad_lines)
    writer = (ChunkWriter(client, job_id, config, task_options(config, output_format))
              if config.lane == "batch" else None)
    wake(client, job_id, now=False)  # chunks of an earlier submit whose next step Redis lost
    done = planned = 0
    sampled: set[int] = set()  # digests of the requests sent each time they repeat (they sample)
    declare_queue()
    try:
        windows = [max(1, w // 4) for w in (max_queued, config.max_queued if config.deadline else 0) if w]
        for batch in _batches(iter(rows), min([BATCH, *windows])):  # a quarter of every window at most
            wanted = [r.index for r in batch if r.index not in answered]
            report.answered += len(batch) - len(wanted)
            if keep:
                wanted = _unless_failed_for_good(batch, wanted, keep, config, report)
            while True:
                if writer is not None and cutover and time.time() >= cutover:
                    # past the cut-over: the rows not chunked yet go synchronously, in its window
                    writer.flush()
                    report.chunks = writer.chunks
                    writer, max_queued = None, config.max_queued
                if not max_queued:
                    break
                if writer is not None and config.deadline and writer.chunks != planned:
                    # a chunk more was stored: the cut-over from the rows' needs so far, projected
                    cutover, planned = _plan(job, config, now, needed, done, total, report), writer.chunks
                if not _wait_for_room(job, max_queued, len(wanted), on_wait, should_stop,
                                      until=cutover if writer is not None else 0.0,
                                      before_waiting=writer.flush if writer is not None else None):
                    break
            if should_stop():
                raise Interrupted("submit interrupted")
            if job.status() == STOPPED:
                raise JobStopped(f"job {job_id} stopped: {job.meta().get('reason', '')}")
            claim = job.claim(wanted)
            report.queued += claim.busy
            report.uncollected += claim.pending
            claimed = set(claim.claimed)
            if claim.redone and on_disk is not None:
                written = on_disk(claim.redone)  # collected meanwhile: on disk, not missing
                job.unclaim(written)
                claimed -= written
                claim.redone -= written
                report.answered += len(written)
            fresh = [r for r in batch if r.index in claimed]
            report.retried_nulls += sum(r.index in nulls for r in fresh)
            report.resent += sum(r.index in claim.redone and r.index not in nulls for r in fresh)
            if fresh and config.dedupe is not False:
                copies = _dedupe(job, fresh, config, sampled, report)
                fresh = [r for r in fresh if r.index not in copies]
            try:
                if writer is not None:
                    for r in fresh:
                        index, body, url = task_row(r, config, url=True)
                        writer.add(index, body, url)
                        if config.deadline:
                            needed[0] += 1
                            needed[1] += estimate_tokens(body, url)
                else:
                    push(client, envelopes(job_id, fresh, config, output_format))
                report.enqueued += len(fresh)
            except BaseException:  # Ctrl-C or Redis gone between claim and push: give the rows back
                _release_quietly(job, sorted({r.index for r in fresh} | set(writer.held() if writer else ())))
                raise
            done += len(batch)
            if on_progress:
                on_progress(done, total)
        if writer is not None:
            try:
                writer.flush()
            except BaseException:
                _release_quietly(job, writer.held())
                raise
            report.chunks = writer.chunks
        if config.deadline and writer is not None:
            _plan(job, config, now, needed, total, total, report)
    finally:
        job.end_submit()
    log.info("job %s: %d rows enqueued, %d already answered, %d already queued, %d awaiting collection",
             job_id, report.enqueued, report.answered, report.queued, report.uncollected)
    return report
