"""The Redis transport's channel builds one client per connection pool (kombu builds one per
operation), on a real Redis; the stock transport stays one setting away."""

from __future__ import annotations

import subprocess
import sys

from kombu import Connection

from opt_queue.transport import NAME, Channel


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
    code = ("import sys; from opt_queue.app import app, configure; out = []\n"
            "for url in sys.argv[1:]:\n"
            "    configure(url); out.append(str(app.conf.broker_transport))\n"
            "print(' '.join(out))")
    urls = ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "sentinel://127.0.0.1:1"]
    done = subprocess.run([sys.executable, "-c", code, *urls], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [NAME, "None", "None"]
    stock = subprocess.run([sys.executable, "-c", code, urls[0]], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "OPT_QUEUE_STOCK_TRANSPORT": "1"})
    assert stock.stdout.split() == ["None"]
