"""The broker's internals in one room: task messages, hand-back and recovery.

**Messages.** A rows task carries ``(job, [[index, request], ...], options)``; Flower and the logs
show ``(job, [index, ...])`` only (:func:`args_repr`). Publishing through ``apply_async`` costs
~400 us of Python per message, so :func:`envelope` wraps Celery's own message in the envelope
kombu's Redis transport stores (``tests/test_messages.py`` compares the two) and :func:`push`
writes a whole batch with one ``LPUSH``.

**Leases** (``store/leases.py``) tell a live worker's rows from a dead one's.

**Recovery.** Kombu's Redis transport keeps a delivered, unacknowledged message in its ``unacked``
hash and gives it back only after ``visibility_timeout`` (an hour by default). A worker that holds a
message takes its rows' leases within milliseconds and renews them, so a message delivered more
than a lease length ago whose unfinished rows hold no live lease belongs to a dead worker:
:func:`recover_stale` puts it back at the head of the queue at once (any worker's recovery thread
or the collector does this, whoever comes first). A message lost outright (a worker killed
between kombu's pop and its ``unacked`` record, a submit killed between claim and push) is found by
:class:`LostRows`, which enqueues such rows again from the input file.

**Hand-back.** A row still waiting for a rate-limit slot when a third of ``visibility_timeout`` has
passed gives up its lease and is enqueued again (:func:`hand_back`), so no message is held until
kombu delivers it twice.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis

from opt_queue.store import keys
from opt_queue.queue.app import get_app
from opt_queue.store.jobs import Job
from opt_queue.store.leases import LEASE_SECONDS, owner_id
from opt_queue.core.request import TaskRow, split_row

log = logging.getLogger(__name__)

ROWS_TASK = "opt_queue.rows"




# -- messages ------------------------------------------------------------------------------------
def args_repr(job_id: str, rows: Iterable[TaskRow] | Iterable[list[Any]]) -> str:
    """What Flower and the logs show of a task's arguments: the job and the rows' indices only."""
    return repr((job_id, [row[0] for row in rows]))


def task_name(job_id: str, rows: list[TaskRow]) -> str:
    """The name Flower and the logs show for a task: the job and its row's index (its first and
    last rows' for a task of several), never the request or a key."""
    if len(rows) == 1:
        return f"row {job_id}:{rows[0][0]}"
    return f"rows {job_id}:{rows[0][0]}..{rows[-1][0]} ({len(rows)})"


def envelope(job_id: str, rows: list[TaskRow], options: dict[str, Any]) -> str:
    """The queue entry for one task of ``rows``, as kombu's Redis transport stores it (JSON text)."""
    from kombu.serialization import dumps

    task_id = str(uuid.uuid4())
    argsrepr = args_repr(job_id, rows)
    app = get_app()
    message = app.amqp.create_task_message(task_id, ROWS_TASK, (job_id, rows, options), {},
                                           argsrepr=argsrepr, kwargsrepr="{}", ignore_result=True,
                                           shadow=task_name(job_id, rows))
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
    app = get_app()
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[keys.QUEUE])


PUSH_GROUP = 1000
"""Entries per LPUSH command."""


def queue_push(pipe: Any, entries: list[str]) -> None:
    """Queue on ``pipe`` the appending of task envelopes (:func:`envelope`) to the queue, first in,
    first out. Every way a task reaches the queue goes through here: a submit (:func:`push`), a
    hand-back (:func:`hand_back`) and the batch lane's hand-over to the synchronous lane."""
    for start in range(0, len(entries), PUSH_GROUP):
        pipe.lpush(keys.QUEUE, *entries[start:start + PUSH_GROUP])


def push(client: redis.Redis, entries: Iterable[str]) -> int:
    """Append task envelopes to the queue in one round trip, all or none; return how many."""
    batch = list(entries)
    if batch:
        pipe = client.pipeline(transaction=True)
        queue_push(pipe, batch)
        pipe.execute()
    return len(batch)


def hand_back(client: redis.Redis, job_id: str, rows: list[Any], options: dict[str, Any] | None) -> None:
    """Enqueue rows again as a new task (behind the rows already queued); their leases must have
    been given up first, so that the new copy may take them."""
    push(client, [envelope(job_id, rows, options or {})])


def _rows_of(message: dict[str, Any]) -> tuple[str, list[str]] | None:
    """``(job, indices)`` of a rows task message, else None."""
    headers = message.get("headers") or {}
    if headers.get("task") != ROWS_TASK:
        return None
    try:
        args = json.loads(base64.b64decode(message["body"]))[0]
        return str(args[0]), [split_row(row)[0] for row in args[1]]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def messages(client: redis.Redis) -> Iterator[tuple[str | None, str, list[str]]]:
    """Every rows task in the broker: ``(delivery tag or None if queued, job, indices)``."""
    for raw in client.lrange(keys.QUEUE, 0, -1):
        found = _rows_of(json.loads(raw))
        if found:
            yield None, *found
    for tag, raw in client.hgetall(keys.UNACKED).items():
        found = _rows_of(json.loads(raw)[0])
        if found:
            yield tag.decode(), *found


def queued_indices(client: redis.Redis, job_id: str) -> set[str]:
    """Rows of ``job_id`` that have a task message in the broker: queued, or delivered and not yet
    acknowledged."""
    return {i for _tag, job, indices in messages(client) if job == job_id for i in indices}


def restore(client: redis.Redis, tag: str) -> bool:
    """Put an unacknowledged message back at the head of the queue, as kombu does after the
    visibility timeout (``QoS.restore_by_tag``); False when it was acknowledged meanwhile."""
    restored = False

    def move(pipe: Any) -> None:
        nonlocal restored
        raw = pipe.hget(keys.UNACKED, tag)
        pipe.multi()
        pipe.zrem(keys.UNACKED_INDEX, tag)
        pipe.hdel(keys.UNACKED, tag)
        if raw:
            message, _exchange, routing_key = json.loads(raw)
            message.setdefault("headers", {})["redelivered"] = True
            message.get("properties", {}).get("delivery_info", {})["redelivered"] = True
            pipe.rpush(routing_key or keys.QUEUE, json.dumps(message))
            restored = True

    client.transaction(move, keys.UNACKED)
    return restored


# -- recovery ------------------------------------------------------------------------------------
def _orphans(client: redis.Redis, job_id: str, indices: list[str]) -> set[str]:
    """Rows of a running job among ``indices`` that are not done and hold no live lease."""
    return Job(client, job_id).orphans(indices)


def recover_stale(client: redis.Redis, lease_seconds: float = LEASE_SECONDS) -> int:
    """Put back in the queue every message delivered more than a lease length ago whose unfinished
    rows nobody holds a lease on (its worker died); return how many. One process at a time does
    this (a lock in Redis); the others skip the pass."""
    if not client.set(keys.RECOVERY_LOCK, owner_id(), nx=True, px=int(lease_seconds * 1000)):
        return 0
    try:
        stale = client.zrangebyscore(keys.UNACKED_INDEX, "-inf", time.time() - lease_seconds)
        if not stale:
            return 0
        raws = client.hmget(keys.UNACKED, stale)
        by_job: dict[str, list[tuple[str, list[str]]]] = {}
        for tag, raw in zip(stale, raws):
            found = _rows_of(json.loads(raw)[0]) if raw else None
            if found:
                by_job.setdefault(found[0], []).append((tag.decode(), found[1]))
        restored = 0
        for job_id, tasks in by_job.items():
            orphans = _orphans(client, job_id, [i for _tag, indices in tasks for i in indices])
            back: list[str] = []
            for tag, indices in tasks:
                mine = [i for i in indices if i in orphans]
                if mine and restore(client, tag):
                    restored += 1
                    back += mine
            if back:  # one line a pass and job, however many rows: a dead worker held hundreds
                log.warning("job %s: %d rows were held by a worker that stopped answering (%s); their "
                            "tasks are back in the queue", job_id, len(back), _few(back))
        return restored
    finally:
        client.delete(keys.RECOVERY_LOCK)


def _few(indices: list[str], most: int = 8) -> str:
    shown = ", ".join(indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


class LostRows:
    """Finds rows whose task message is gone (claimed, unfinished, no live lease, in no message)
    and enqueues them again with ``requeue``. It looks only once the job has not moved for a lease
    length (a healthy job's queued rows hold no lease either, and reading the whole queue is not
    free), and a row must look lost in two such passes a lease length apart: a message is in
    neither the queue nor ``unacked`` for an instant while kombu hands it to a worker."""

    def __init__(self, client: redis.Redis, job_id: str, requeue: Callable[[set[str]], int],
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.client = client
        self.job = Job(client, job_id)
        self.requeue = requeue
        self.lease_seconds = lease_seconds
        self._suspects: set[str] = set()
        self._signature: Any = None
        self._moved = self._looked = time.monotonic()

    def check(self, signature: Any) -> int:
        """One pass, given anything that changes when the job makes progress; return how many
        rows were enqueued again."""
        now = time.monotonic()
        if signature != self._signature:
            self._signature, self._moved, self._suspects = signature, now, set()
            return 0
        if now - self._moved < self.lease_seconds or now - self._looked < self.lease_seconds:
            return 0
        self._looked = now
        unfinished = self.job.unfinished()
        lost = _orphans(self.client, self.job.id, sorted(unfinished)) if unfinished else set()
        if lost:
            lost -= queued_indices(self.client, self.job.id)
        confirmed, self._suspects = lost & self._suspects, lost - self._suspects
        if not confirmed:
            return 0
        count = self.requeue(confirmed)
        log.warning("job %s: enqueued %d rows again whose tasks were lost (a worker or submit died "
                    "while handling them)", self.job.id, count)
        return count
