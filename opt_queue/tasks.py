"""The row task: decode, hand the row to the engine, done. Everything else lives in ``engine``."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Task

from opt_queue.app import app
from opt_queue.config import load_config
from opt_queue.engine import Engine
from opt_queue.messages import ROW_TASK
from opt_queue.redis_conn import connect

log = logging.getLogger(__name__)
INTERNAL_RETRIES = 5

_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The worker process's engine, built on first use from ``OPT_QUEUE_CONFIG`` and the broker."""
    global _engine
    with _engine_lock:
        if _engine is None:
            config = load_config()
            _engine = Engine(config, connect(app.conf.broker_url, patient=True))
        return _engine


@app.task(name=ROW_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def row(self: Task, job_id: str, seq: int, index: str, body: dict[str, Any],
        options: dict[str, Any] | None = None) -> str:
    """Answer one row of a job (the request travels in the message; the key never does)."""
    try:
        return get_engine().process(job_id, seq, index, body, options)
    except redis.RedisError as exc:
        # Redis restarting or unreachable: the row is neither done nor lost; try it again later.
        log.warning("row %s of job %s: Redis error (%s); retrying", index, job_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=min(30, 2 ** self.request.retries), max_retries=None)
