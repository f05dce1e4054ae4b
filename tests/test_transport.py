"""The Redis transport's channel builds one client per connection pool (kombu builds one per
operation), on a real Redis; the stock transport stays one setting away."""

from __future__ import annotations

import subprocess
import sys

from kombu import Connection

from opt_queue.queue.transport import NAME, Channel


def test_a_channel_hands_out_one_client_until_its_pool_changes(redis_url: str) -> None:
    with Connection(redis_url, transport=NAME) as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as a, channel.conn_or_acquire() as b:
            assert a is b and a.ping()
            assert a.connection_pool is channel.pool
        channel._disconnect_pools()  # what a fork or a lost connection does
        with channel.conn_or_acquire() as c:
            assert c is not a and c.connection_pool is channel.pool and c.ping()
        given = object()
        with channel.conn_or_acquire(given) as d:
            assert d is given
        # the transport still moves messages: publish, get, ack
        queue = conn.SimpleQueue("opt-queue-transport-test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


def test_the_app_uses_it_for_plain_redis_urls_only() -> None:
    code = ("import sys; from opt_queue.queue.app import app, configure; out = []\n"
            "for url in sys.argv[1:]:\n"
            "    configure(url); out.append(str(app.conf.broker_transport))\n"
            "print(' '.join(out))")
    urls = ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "sentinel://127.0.0.1:1"]
    done = subprocess.run([sys.executable, "-c", code, *urls], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [NAME, "None", "None"]
    stock = subprocess.run([sys.executable, "-c", code, urls[0]], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "OPT_QUEUE_STOCK_TRANSPORT": "1"})
    assert stock.stdout.split() == ["None"]


def test_acknowledgements_ride_on_the_next_round_trip_and_none_is_left_at_close(redis_url: str) -> None:
    """An ack is done in memory at once; its unacked record goes with the channel's next delivery
    (one pipeline), else its next BRPOP, else its close: nothing is left behind and nothing comes
    back to the queue."""
    import redis

    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport=NAME) as conn:
        queue = conn.SimpleQueue("opt-queue-transport-acks")
        qos = queue.consumer.channel.qos
        unacked = qos.unacked_key
        for n in range(3):
            queue.put({"n": n})
        first = queue.get(timeout=5)
        assert client.hlen(unacked) == 1
        first.ack()
        assert client.hlen(unacked) == 1  # acknowledged in memory, the record not yet removed
        assert first.acknowledged
        second = queue.get(timeout=5)  # its record and the first one's removal: one round trip
        assert client.hkeys(unacked) == [second.delivery_tag.encode()]
        second.ack()
        third = queue.get(timeout=5)
        third.ack()
        assert client.hlen(unacked) == 1  # the third's removal waits for the next round trip
        queue.close()
    assert client.hlen(unacked) == 0 and client.zcard(qos.unacked_index_key) == 0
    assert client.llen("opt-queue-transport-acks") == 0  # no acknowledged message was restored


def test_an_unacknowledged_message_is_still_restored_at_close(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport=NAME) as conn:
        queue = conn.SimpleQueue("opt-queue-transport-restore")
        queue.put({"n": 1})
        queue.put({"n": 2})
        done, running = queue.get(timeout=5), queue.get(timeout=5)
        done.ack()
        queue.close()
    assert client.llen("opt-queue-transport-restore") == 1  # the one a task still ran came back
    assert client.hlen("unacked") == 0
    assert running.payload == {"n": 2}


def test_a_channel_closing_after_its_connection_was_dropped_does_not_stop_the_worker(redis_url: str) -> None:
    """After a broker outage kombu may close a channel once its connection is gone (its pool
    dropped, the transport's client None): giving its unacknowledged messages back must fail as a
    connection error, which kombu's closing ignores, not as the AttributeError from kombu's
    connection parameters that ended a worker with "Unrecoverable error" in a Redis restart."""
    from kombu.common import ignore_errors

    with Connection(redis_url, transport=NAME) as conn:
        channel = conn.default_channel
        queue = conn.SimpleQueue("opt-queue-transport-dropped")
        queue.put({"n": 1})
        running = queue.get(timeout=5)  # unacknowledged, as a task a worker was running
        channel._disconnect_pools()  # what the lost connection did
        conn.transport.client = None  # what kombu's close of the connection did
        ignore_errors(conn, channel.close)  # raised AttributeError
    assert running.payload == {"n": 1}
