"""Redis Sentinel: URLs read or refused, durable results, and a fleet that survives its master's death.

The failover test runs a master, two replicas and three Sentinels (``redis-server --sentinel``) on
loopback, a fleet of two workers and a collector, and SIGKILLs the master in the middle of a job
whose limits bind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from cluster import MASTER, SentinelCluster
from conftest import TEST_KEY, assert_complete, cli, kill_group, lines_in, seed_rows, start_cli, wait_for, \
    write_config, write_jsonl

from test_faults import report

from opt_queue.core.config import load_config
from opt_queue.core.errors import BrokerError, ConfigError
from opt_queue.jobflow.dataset import iter_input
from opt_queue.queue.app import create_app
from opt_queue.sim.api import SimKey, SimServer
from opt_queue.sim.common import prompt_key
from opt_queue.store import keys
from opt_queue.store.jobs import job_id_for
from opt_queue.core.broker_url import parse_sentinels, redact_url
from opt_queue.store.redis_conn import connect, connect_async
from opt_queue.store.scripts import WAIT_MS, durable_writes, run_pipeline

MODEL = "gpt-3.5-turbo-0613"


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = SentinelCluster(tmp_path / "cluster").start()
    try:
        yield c
    finally:
        c.stop()


# -- URLs ------------------------------------------------------------------------------------------
def test_a_sentinel_url_is_read_as_kombu_writes_it() -> None:
    got = parse_sentinels("sentinel://:s3cret@10.0.0.1:26380;sentinel://:s3cret@10.0.0.2;sentinel://h3:26381/2")
    assert got.hosts == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("h3", 26381))
    assert (got.db, got.password) == (2, "s3cret")
    assert "s3cret" not in redact_url("sentinel://:s3cret@a:1;sentinel://:s3cret@b:2/0")


@pytest.mark.parametrize("url, says", [
    ("sentinel://a:26379;redis://b:6379/0", "every Sentinel address starts with sentinel://"),
    ("sentinel://a:notaport/0", "port must be a number"),
    ("sentinel://a:26379;;sentinel://b/0", "empty Sentinel"),
    ("sentinel://a:26379/zero", "must be a number (/0)"),
    ("sentinel://a:26379/0?master_name=m", "goes in \"sentinel_master\""),
    ("sentinel://:26379/0", "has no host"),
])
def test_a_malformed_sentinel_url_is_refused_naming_the_fix(tmp_path: Path, url: str, says: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(f'{{"api_keys": ["{TEST_KEY}"], "broker_url": "{url}", "sentinel_master": "m"}}')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert says in str(err.value) and str(path) in str(err.value)
    assert "sentinel://HOST:26379" in str(err.value) or "sentinel_master" in str(err.value)


def test_a_sentinel_url_without_a_master_name_is_refused_before_any_call(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(3))
    config = write_config(tmp_path / "config.json", sim, broker_url="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2/0")
    got = cli("submit", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl"))
    assert got.returncode == 2, got.stderr
    assert "sentinel_master" in got.stderr and "OPT_QUEUE_SENTINEL_MASTER" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1
    # the environment names the master as well as the config does
    cfg = load_config(config, env={"OPT_QUEUE_SENTINEL_MASTER": "m"})
    assert (cfg.sentinel_master, cfg.acks_from_replicas) == ("m", 1)
    assert sim.stats()["calls"] == 0


def test_clients_and_the_celery_app_follow_the_sentinels_master(cluster: SentinelCluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = connect(cluster.url, check=True, master=MASTER)
    client.set("probe", "1")
    assert cluster.master_client().get("probe") == b"1"
    with pytest.raises(BrokerError, match="knows a master named 'nope'"):
        connect(cluster.url, check=True, master="nope")
    monkeypatch.setenv("OPT_QUEUE_SENTINEL_MASTER", MASTER)
    app = create_app(cluster.url)  # as `celery -A opt_queue.queue.app flower` builds it
    assert app.conf.broker_transport_options["master_name"] == MASTER
    with app.connection_for_write() as conn:
        conn.default_channel.client.set("via-kombu", "1")
    assert cluster.master_client().get("via-kombu") == b"1"


def test_clients_follow_the_master_through_a_failover(cluster: SentinelCluster) -> None:
    """A command whose connection the failover broke goes to the promoted replica (redis-py's own
    Sentinel connection dialled the dead master until its retries ran out)."""
    sync = connect(cluster.url, check=True, master=MASTER, patient=True)

    async def main() -> None:
        client = connect_async(cluster.url, max_connections=4, master=MASTER)
        await client.set("before", "1")
        sync.set("sync-before", "1")
        old = cluster.kill_master()
        # both clients' next commands meet the dead connection, then find the new master
        assert await client.incr("after") == 1
        assert sync.incr("sync-after") == 1
        # (the old master is dead: the commands went to the promoted replica; one Sentinel may
        # still name the old master for a moment after the clients found the new one)
        assert cluster.wait_failover(old, timeout=30) != old
        assert await client.get("before") == b"1" and sync.get("sync-before") == b"1"
        await client.aclose()

    asyncio.run(main())


# -- durable results -------------------------------------------------------------------------------
def test_a_durable_write_waits_for_a_replica_and_says_so_when_none_takes_it(
        cluster: SentinelCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A result is on a replica when its publication returns; a stopped replica costs WAIT_MS and
    a warning, and stops nothing."""
    replica = cluster.ports[1]

    async def publish(key: str, durable: bool) -> float:
        client = connect_async(cluster.url, max_connections=4, master=MASTER)
        durable_writes(client, 2)
        started = time.monotonic()
        await run_pipeline(client, lambda pipe: pipe.set(key, "x"), durable=durable)
        took = time.monotonic() - started
        await client.aclose()
        return took

    asyncio.run(publish("warm", True))
    os.kill(cluster.procs[replica].pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="opt_queue.store.scripts"):
            slow = asyncio.run(publish("while-stopped", True))
            fast = asyncio.run(publish("not-durable", False))
    finally:
        os.kill(cluster.procs[replica].pid, signal.SIGCONT)
    assert slow >= WAIT_MS / 1000 * 0.9, "a durable write must wait for the replicas it asks for"
    assert "1 of the 2 replicas" in caplog.text
    assert fast < WAIT_MS / 1000 * 0.9 or slow > fast  # only durable writes wait
    # with the replicas running, a returned durable write is on them
    asyncio.run(publish("durable", True))
    for port in cluster.ports[1:]:
        assert redis.Redis(port=port).get("durable") == b"x"


# -- the failover ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_master_killed_mid_job_loses_nothing_and_pays_nothing_twice(
        tmp_path: Path, sim: SimServer, cluster: SentinelCluster) -> None:
    """Two workers and a collector on Sentinels; the master SIGKILLed mid-job; nobody re-runs
    anything. Every row once; rows answered before the kill are not paid again (only those on the
    wire may be); the key's limit holds but for a few 429s while windows rebuild."""
    rows = 300
    sim.configure(keys=[SimKey(TEST_KEY, rpm=60)], minute=2.0, latency=0.05)  # 30 rows/s: ~10 s
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(rows))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=cluster.url, sentinel_master=MASTER,
                          model={"name": MODEL}, lease_seconds=4, visibility_timeout=8)  # limits from headers
    c = ("-c", str(config))
    assert cli("submit", str(data), *c, "-o", str(out)).returncode == 0
    fleet = [start_cli("worker", *c, "--concurrency", "4", log=tmp_path / f"w{i}.log") for i in range(2)]
    collector = start_cli("collect", *c, "-o", str(out), log=tmp_path / "collect.log")
    try:
        wait_for(lambda: lines_in(out) >= rows // 3, timeout=90, what=f"{rows // 3} rows")
        # rows whose results both replicas hold: whichever is promoted has them
        job = job_id_for(out)
        on_replicas = [set(_done(redis.Redis(port=p), job)) for p in cluster.ports[1:]]
        safe = on_replicas[0] & on_replicas[1]
        paid_before = dict(sim.stats()["per_prompt"])
        in_flight = sim.api.in_flight
        written = lines_in(out)
        old = cluster.kill_master()
        killed = time.monotonic()
        new = cluster.wait_failover(old)
        promoted = time.monotonic() - killed
        assert new != old
        wait_for(lambda: lines_in(out) > written + 5, timeout=90, what="rows after the failover")
        flowing = time.monotonic() - killed
        assert collector.wait(timeout=150) == 0, (tmp_path / "collect.log").read_text()[-3000:]
    finally:
        for proc in fleet:
            kill_group(proc, signal.SIGTERM)
        if collector.poll() is None:
            kill_group(collector)
    stats = sim.stats()
    prompts = {r.index: prompt_key(r.body["messages"]) for r in iter_input(data)}
    again = {i for i in safe if stats["per_prompt"].get(prompts[i], 0) > 1}
    twice = sum(n - 1 for n in stats["per_prompt"].values())
    # the figures first, so that a failing assertion below has them on record (figures.jsonl)
    figures = dict(on_the_wire=in_flight, replicated_before=len(safe), paid_again_of_those=len(again),
                   paid_twice=twice, rate_limited=stats["rate_limited"], promoted_s=round(promoted, 1),
                   flowing_again_s=round(flowing, 1))
    report("Redis master SIGKILLed mid-job under Sentinel (2 replicas, 3 Sentinels; 2 workers, collector)",
           data, out, sim, **figures)
    assert_complete(data, out)
    assert not again, f"rows answered and replicated before the failover were paid again: {sorted(again)}; {figures}"
    assert twice <= max(in_flight, 8), f"{twice} calls paid twice; {in_flight} were on the wire at the kill; {figures}"
    assert len(paid_before) >= len(safe), figures
    assert stats["rate_limited"] <= 10, f"{stats['rate_limited']} 429s: the limit did not hold; {figures}"


def _done(client: redis.Redis, job: str) -> list[str]:
    raw = client.get(keys.job_done(job)) or b""
    return [str(8 * i + b) for i, byte in enumerate(raw) for b in range(8) if byte & (0x80 >> b)]
