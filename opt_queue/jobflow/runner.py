"""``run``: submit, work and collect one job on this machine, with a private Redis if needed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt_queue.queue.app import configure
from opt_queue.jobflow.collector import Collector, CollectStatus
from opt_queue.core.config import Config
from opt_queue.jobflow.dataset import beside, check_writable, read_output, validate_input
from opt_queue.store.jobs import Job, job_id_for
from opt_queue.jobflow.local import EmbeddedRedis, LocalWorkers, purge_queue
from opt_queue.core.errors import Interrupted
from opt_queue.jobflow.producer import SubmitReport, finished, job_output_format, submit
from opt_queue.store.redis_conn import connect

log = logging.getLogger(__name__)


def state_dir(output: str | os.PathLike[str]) -> Path:
    """Where the private Redis keeps its append-only file: ``<output>.oq-redis/`` beside it."""
    p = Path(output)
    return p.with_name(p.name + ".oq-redis")


BROKER_FILE = "broker.url"
"""In :func:`state_dir` while ``run`` works: the private Redis' URL, for ``status -o``."""


def private_broker(output: str | os.PathLike[str]) -> str | None:
    """The URL of the private Redis of a ``run`` working on ``output`` now, if any."""
    try:
        return (state_dir(output) / BROKER_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def worker_log(output: str | os.PathLike[str]) -> Path:
    """Where ``run``'s local workers log (kept after the job: keys retired, rows failed)."""
    return beside(output, ".worker.log")


STOP_SECONDS = 8.0
"""After Ctrl-C or SIGTERM: how long the local workers get to finish the calls on the wire (they
abandon them after ``engine.DRAIN_SECONDS``) before they are killed."""


class _Submitter(threading.Thread):
    """Submits in the background: with flow control it waits for rows to finish as it goes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(name="opt-queue-submit", daemon=True)
        self.stop = threading.Event()
        self.kwargs = kwargs
        self.report: SubmitReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.report = submit(**self.kwargs, should_stop=self.stop.is_set)
        except BaseException as exc:  # handed to the main thread
            self.error = exc


def _submit_and_collect(client: Any, job_id: str, input_path: Any, output_path: Any, config: Config,
                        skip_bad: bool, validated: Any, on_submit: Any, on_progress: Any,
                        should_stop: Callable[[], bool]) -> tuple[SubmitReport, CollectStatus]:
    job = Job(client, job_id)
    # Before the collector can look: the job is being submitted, and its output format is fixed
    # (else a collector that looks first would write another format's lines).
    job.begin_collect(job_output_format(config, validated, output_path))
    submitter = _Submitter(client=client, job_id=job_id, input_path=input_path, output_path=output_path,
                           config=config, skip_bad=skip_bad, on_progress=on_submit, validated=validated)
    submitter.start()
    try:
        status = Collector(client, job_id, output_path, input_path, config=config).run(
            on_progress=on_progress, should_stop=lambda: submitter.error is not None or should_stop())
    except BaseException:
        submitter.stop.set()  # no more rows enqueued; those claimed and not pushed are given back
        submitter.join(timeout=5)
        raise
    submitter.join()
    if submitter.error is not None:
        raise submitter.error
    assert submitter.report is not None
    return submitter.report, status


def _wind_down(client: Any, job_id: str, input_path: Any, output_path: Any, config: Config,
               local: LocalWorkers) -> CollectStatus:
    """After Ctrl-C or SIGTERM: the workers start no new call and get ``STOP_SECONDS`` for the calls on
    the wire; then every answer that reached Redis is written to the output, so a re-run pays for
    none of them. Further signals are ignored meanwhile (it takes seconds, not minutes)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    log.warning("interrupted: no new API call starts; finishing the calls on the wire (up to %.0fs)",
                STOP_SECONDS)
    local.stop(timeout=STOP_SECONDS)
    return Collector(client, job_id, output_path, input_path, config=config).run(drain=True)


@dataclass
class RunResult:
    """What a run did."""

    job: str
    submitted: SubmitReport
    collected: CollectStatus
    broker: str
    worker_log: Path | None = None


def run_job(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], config: Config, *,
            config_path: str | None = None, job_name: str | None = None, workers: int = 1,
            skip_bad: bool = False, on_submit: Callable[[int, int], None] | None = None,
            on_progress: Callable[[CollectStatus], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, keep_state: bool = False,
            worker_overrides: dict[str, Any] | None = None) -> RunResult:
    """Run a whole job here. Without ``broker_url`` a private Redis is started beside the output
    (its append-only file lets an interrupted run resume) and removed once the job is complete."""
    job_id = job_id_for(output_path, job_name)
    done = finished(job_id, input_path, output_path)
    if done is not None:  # finished before, and both files are as they were then: nothing to do
        return RunResult(job=job_id, submitted=done, broker="",
                         collected=CollectStatus(job=job_id, total=done.total, answered=done.total, complete=True))
    # Everything that can be checked is checked before anything starts or anything is paid for.
    check_writable(output_path)
    validated = validate_input(input_path, skip_bad=skip_bad)
    read_output(output_path, offsets=False)  # refuse an output file that is not ours
    private = None
    if config.broker_url is None:
        private = EmbeddedRedis(state_dir(output_path)).start()
        (private.directory / BROKER_FILE).write_text(private.url, encoding="utf-8")
    url = private.url if private else str(config.broker_url)
    log_file = worker_log(output_path) if workers else None
    try:
        client = connect(url, check=True, patient=True, master=config.sentinel_master)
        configure(url, config.visibility_timeout, config.sentinel_master)
        if private:
            # Nobody else uses this broker: tasks left by an interrupted run are ours to redo.
            dropped = purge_queue(client)
            Job(client, job_id).forget_queued()
            if dropped:
                log.info("dropped %d tasks of the interrupted run; their rows are enqueued again", dropped)
        local = LocalWorkers(url, config_path, processes=workers, concurrency=config.concurrency,
                             loglevel=config.log_level, log_file=log_file,
                             overrides=worker_overrides,
                             events=private is None,  # nobody watches a private broker with Flower
                             die_signal=signal.SIGKILL if private else signal.SIGTERM)
        if workers:
            local.start()
        try:
            report, status = _submit_and_collect(client, job_id, input_path, output_path, config, skip_bad,
                                                 validated, on_submit, on_progress, should_stop)
        except KeyboardInterrupt:
            kept = _wind_down(client, job_id, input_path, output_path, config, local)
            raise Interrupted(
                f"interrupted: {kept.answered} rows answered and {kept.nulls} null are in {output_path}, "
                f"{kept.remaining} remain; run the same command again to resume (nothing answered is "
                f"paid again)") from None
        finally:
            local.stop()
        client.close()
    finally:
        if private:
            (private.directory / BROKER_FILE).unlink(missing_ok=True)
            private.stop()
    if private and status.complete and not keep_state:
        shutil.rmtree(private.directory, ignore_errors=True)
    return RunResult(job=job_id, submitted=report, collected=status, broker=url, worker_log=log_file)
