"""Bulk-built task messages are the messages apply_async would write, so any worker reads them."""

from __future__ import annotations

import base64
import json

import redis

from opt_queue import keys
from opt_queue.app import configure
from opt_queue.messages import envelope, push
from opt_queue.tasks import rows


def shape(message: dict) -> dict:
    """A message with its per-message ids blanked out."""
    out = json.loads(json.dumps(message))
    for k in ("id", "root_id", "origin"):
        out["headers"][k] = "*"
    for k in ("correlation_id", "delivery_tag", "reply_to"):
        out["properties"][k] = "*"
    return out


def test_envelope_matches_what_apply_async_writes(redis_url: str, rclient: redis.Redis) -> None:
    configure(redis_url)
    batch = [(7, "7", {"model": "m", "messages": [{"role": "user", "content": "é 字"}]}),
             (8, "8", {"model": "m", "messages": [{"role": "user", "content": "b"}], "temperature": 0})]
    args = ("job-1", batch, {"fallback": "f"})
    rows.apply_async(args=args, argsrepr=repr(("job-1", ["7", "8"])), kwargsrepr="{}")
    ordinary = json.loads(rclient.rpop(keys.QUEUE))
    bulk = json.loads(envelope(*args))
    assert shape(bulk) == shape(ordinary)
    assert bulk["body"] == ordinary["body"]


def test_push_keeps_first_in_first_out(rclient: redis.Redis) -> None:
    assert push(rclient, ["a", "b", "c"]) == 3
    assert [rclient.rpop(keys.QUEUE) for _ in range(3)] == [b"a", b"b", b"c"]


def test_requeue_lost_finds_exactly_the_rows_without_a_message(tmp_path, redis_url: str, rclient: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    from conftest import seed_rows, write_jsonl

    from opt_queue.config import Config
    from opt_queue.dataset import iter_input
    from opt_queue.jobs import Job
    from opt_queue.producer import enqueue, requeue_lost

    configure(redis_url)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(10))
    config = Config.model_validate({"api_keys": ["sk-x"], "rows_per_task": 4})
    enqueue(rclient, "job-q", iter_input(data), 10, config)
    assert rclient.llen(keys.QUEUE) == 3  # rows 0-3, 4-7, 8-9
    assert requeue_lost(rclient, "job-q", data, config) == 0  # every row has its message

    def seqs(message: dict) -> list[int]:
        job, batch, _ = json.loads(base64.b64decode(message["body"]))[0]
        assert job == "job-q"
        return [seq for seq, _, _ in batch]

    gone = json.loads(rclient.rpop(keys.QUEUE))  # the oldest: rows 0-3
    held = rclient.rpop(keys.QUEUE)  # rows 4-7, now "delivered, not acknowledged"
    rclient.hset("unacked", "tag-1", json.dumps([json.loads(held), "", keys.QUEUE]))
    assert Job(rclient, "job-q").unfinished() == set(range(10))
    assert requeue_lost(rclient, "job-q", data, config) == 4
    again = json.loads(rclient.lindex(keys.QUEUE, 0))  # the newest entry: rows 0-3 again, not 4-7
    assert seqs(again) == seqs(gone) == [0, 1, 2, 3]
