"""Bulk-built task messages are the messages apply_async would write, so any worker reads them."""

from __future__ import annotations

import json

import redis

from opt_queue import keys
from opt_queue.app import configure
from opt_queue.messages import envelope, push
from opt_queue.tasks import row


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
    args = ("job-1", 7, "7", {"model": "m", "messages": [{"role": "user", "content": "é 字"}]}, {"fallback": "f"})
    row.apply_async(args=args, argsrepr=repr(("job-1", "7")), kwargsrepr="{}")
    ordinary = json.loads(rclient.rpop(keys.QUEUE))
    bulk = json.loads(envelope(*args))
    assert shape(bulk) == shape(ordinary)
    assert bulk["body"] == ordinary["body"]


def test_push_keeps_first_in_first_out(rclient: redis.Redis) -> None:
    assert push(rclient, ["a", "b", "c"]) == 3
    assert [rclient.rpop(keys.QUEUE) for _ in range(3)] == [b"a", b"b", b"c"]
