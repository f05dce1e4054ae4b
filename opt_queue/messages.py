"""Rows task messages built in bulk and pushed to the Redis queue in pipelines.

A task carries up to ``rows_per_task`` rows of one job as ``[seq, index, request]`` triples: the
worker runs them concurrently, and Celery's own cost (about 1 ms per task message in a worker
process, measured in docs/benchmarks.md) is paid once per batch instead of once per row.

Publishing through ``apply_async`` costs one or two Redis round trips and ~400 us of Python per
row (about 2,000 rows/s); a million-row submit needs better. Celery still builds every message
(``app.amqp.create_task_message``); this module wraps it in the envelope kombu's Redis transport
stores (the same fields ``apply_async`` writes: ``tests/test_messages.py`` compares the two) and
pushes a whole batch with one ``LPUSH``.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from kombu.serialization import dumps

from opt_queue import keys
from opt_queue.app import app

ROWS_TASK = "opt_queue.rows"
TaskRow = tuple[int, str, dict[str, Any]]
"""One row as a task carries it: ``(seq, index, request body)``; the key never travels."""


def args_repr(job_id: str, rows: list[TaskRow] | list[list[Any]]) -> str:
    """What Flower and the logs show of a task's arguments: the job and the rows' indices only."""
    return repr((job_id, [row[1] for row in rows]))


def envelope(job_id: str, rows: list[TaskRow], options: dict[str, Any]) -> str:
    """The queue entry for one task of ``rows``, as kombu's Redis transport stores it (JSON text)."""
    task_id = str(uuid.uuid4())
    argsrepr = args_repr(job_id, rows)
    message = app.amqp.create_task_message(task_id, ROWS_TASK, (job_id, rows, options), {},
                                           argsrepr=argsrepr, kwargsrepr="{}", ignore_result=True)
    content_type, content_encoding, data = dumps(message.body, serializer="json")
    properties = dict(message.properties)
    properties.update(reply_to=app.thread_oid, argsrepr=argsrepr, kwargsrepr="{}", delivery_mode=2,
                      delivery_info={"exchange": "", "routing_key": keys.QUEUE}, priority=0,
                      body_encoding="base64", delivery_tag=str(uuid.uuid4()))
    raw = data.encode(content_encoding) if isinstance(data, str) else data
    return json.dumps({"body": base64.b64encode(raw).decode(), "content-encoding": content_encoding,
                       "content-type": content_type, "headers": message.headers, "properties": properties})


def declare_queue() -> None:
    """Declare the row queue the ordinary way once, so the broker knows its binding."""
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[keys.QUEUE])


def queued_seqs(client: redis.Redis, job_id: str) -> set[int]:
    """Rows of ``job_id`` that have a task message in the broker: queued, or delivered and not yet
    acknowledged (kombu keeps those in the ``unacked`` hash as ``[message, exchange, key]``)."""
    raws = [json.loads(m) for m in client.lrange(keys.QUEUE, 0, -1)]
    raws += [json.loads(m)[0] for m in client.hvals("unacked")]
    found = set()
    for message in raws:
        headers = message.get("headers") or {}
        if headers.get("task") != ROWS_TASK or job_id not in str(headers.get("argsrepr")):
            continue
        args = json.loads(base64.b64decode(message["body"]))[0]
        if args[0] == job_id:
            found.update(int(row[0]) for row in args[1])
    return found


def push(client: redis.Redis, entries: Iterable[str]) -> int:
    """Append entries to the queue in one round trip; first in, first out. Return how many."""
    batch = list(entries)
    if batch:
        client.lpush(keys.QUEUE, *batch)
    return len(batch)
