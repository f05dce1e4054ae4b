"""The rows task: hand a batch of rows to the worker's event loop and wait for them.

Each worker process runs one asyncio event loop in a background thread, with one :class:`Engine`
on it. A Celery pool thread that receives a task only blocks on the batch's future; the rows
themselves run on the loop, so thousands of rows in flight cost no threads and no GIL contention.
Everything a row does lives in ``engine``; leases, hand-back and recovery live in ``broker``. Each
worker process also runs the recovery of dead workers' messages (``broker.recover_stale``) in a
background thread, and the batch lane's due steps (``batchlane``) on its loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis
from celery import Task
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from opt_queue.queue.app import get_app, sentinel_master
from opt_queue.lanes.batchlane import BatchLane
from opt_queue.queue.broker import ROWS_TASK, args_repr, hand_back, recover_stale
from opt_queue.core.request import split_row
from opt_queue.core.config import Config, load_config
from opt_queue.engine.engine import HANDED_BACK, Engine, Published
from opt_queue.store.redis_conn import connect, connect_async
from opt_queue.store.scripts import durable_writes

log = logging.getLogger(__name__)
T = TypeVar("T")
app = get_app()  # the process's app: the task below is registered on it

_settings: Config | None = None


def use(config: Config) -> None:
    """The config this process's worker runs with (``opt-queue worker`` hands it over before the
    worker starts; a worker started as ``celery -A opt_queue.queue.app worker`` reads it from the
    environment, as ``config.load_config`` does)."""
    global _settings
    _settings = config


class _Runtime:
    """The worker process's event loop thread and the engine that lives on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="opt-queue-rows", daemon=True)
        self.thread.start()
        config = _settings if _settings is not None else load_config()
        # A row in flight holds at most two connections at a time (its send-time stamp runs beside
        # its call); the rest is for the engine.
        master = sentinel_master(app)
        client = connect_async(app.conf.broker_url, max_connections=2 * config.concurrency + 16, master=master)
        durable_writes(client, config.acks_from_replicas)
        self.engine: Engine = self.run(Engine.start(config, client))
        # The batch lane's steps (upload, poll, publish) run on the same loop, with the engine's
        # connections and keys; any worker process takes the steps that are due.
        self.lane = BatchLane(config, client, self.engine.provider, self.engine.keys, self.engine.prices)
        self.loop.call_soon_threadsafe(self.lane.start)
        self.redis = connect(app.conf.broker_url, master=master)  # the pool threads' own (blocking) client: hand-backs
        self._stop = threading.Event()
        self.recovery = threading.Thread(target=self._recover, args=(config.lease_seconds,),
                                         name="opt-queue-recovery", daemon=True)
        self.recovery.start()

    def _recover(self, lease_seconds: float) -> None:
        """Every few seconds, put dead workers' messages back in the queue (see ``broker``)."""
        while not self._stop.wait(lease_seconds / 6):
            try:
                recover_stale(self.redis, lease_seconds)
            except redis.RedisError as exc:
                log.debug("recovery pass skipped: %r", exc)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from a pool thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Close the engine's connections and stop the loop (the worker is shutting down)."""
        self._stop.set()
        try:
            self.run(self.lane.stop(), timeout=5)
            self.run(self.engine.close(), timeout=5)
        except Exception as exc:  # best effort: the process is exiting anyway
            log.debug("closing the worker's connections: %r", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> _Runtime:
    """The worker process's runtime, built on first use from its config (:func:`use`) and broker."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
        return _runtime


@worker_ready.connect
def _start_runtime(**_: Any) -> None:
    """Start the runtime with the worker, not with its first rows task: the batch lane's steps
    need it in a worker that never receives a row."""
    try:
        runtime()
    except Exception as exc:  # the first task builds it again, and says why it cannot
        log.warning("the worker's runtime did not start yet: %r", exc)


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    """The worker was asked to stop (SIGTERM, Ctrl-C): from now on no API call starts. Runs in the
    signal handler: it only schedules the engine's drain on its loop."""
    if _runtime is not None:
        _runtime.loop.call_soon_threadsafe(_runtime.engine.drain)


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    if _runtime is not None:
        _runtime.close()


@app.task(name=ROWS_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          max_retries=None)
def rows(self: Task, job_id: str, rows: list[list[Any]], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Answer a batch of one job's ``[index, request(, url)]`` rows; return how each one ended."""
    rt = runtime()
    outcomes = rt.run(rt.engine.process_rows(job_id, rows, options))
    back = [row for row, out in zip(rows, outcomes) if out == HANDED_BACK]
    unfinished = [row for row, out in zip(rows, outcomes) if isinstance(out, BaseException)]
    if back or unfinished:
        try:  # so that their next copy may take them at once; else their leases expire
            rt.run(rt.engine.give_back(job_id, [split_row(row)[0] for row in back + unfinished]))
        except redis.RedisError:
            pass
    if back:
        # Still waiting for a slot (or for another worker's lease): enqueue them again rather than
        # hold the message past its visibility timeout. Enqueued before this task is acked, so a
        # crash in between leaves at worst a second copy, which the rows' leases keep from paying.
        hand_back(rt.redis, job_id, back, options)
        log.info("job %s: %d rows still waiting for a rate-limit slot were enqueued again", job_id, len(back))
    if unfinished:
        # Redis restarting or unreachable: those rows are neither done nor lost; run them again.
        first = next(out for out in outcomes if isinstance(out, BaseException))
        level = logging.WARNING if isinstance(first, redis.RedisError) else logging.ERROR
        log.log(level, "job %s: %d rows of the batch did not finish (%s: %s); retrying them",
                job_id, len(unfinished), type(first).__name__, first)
        raise self.retry(args=(job_id, unfinished, options), countdown=min(30, 2 ** self.request.retries),
                         argsrepr=args_repr(job_id, unfinished), kwargsrepr="{}")
    ended: dict[str, Any] = dict(Counter(str(out) for out in outcomes))
    keys = Counter(out.by for out in outcomes if isinstance(out, Published) and out.by)
    if keys:
        ended["keys"] = dict(keys)  # Flower's result column: which provider's key answered (fingerprints)
    return ended
