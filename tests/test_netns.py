"""A worker on another host (a network namespace joined by a veth pair) is cut off from Redis and
the API mid-run by taking the link down: a real network failure. Its rows go to the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_KEY, kill_group, read_jsonl, seed_rows, start_cli, wait_for, write_config, write_jsonl

from opt_queue.jobflow.dataset import iter_input
from opt_queue.jobflow.local import EmbeddedRedis
from opt_queue.sim.api import SimConfig, SimKey, SimServer, sim_answer

MODEL = "gpt-3.5-turbo-0613"
pytestmark = pytest.mark.slow


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def remote_host() -> Iterator[dict[str, str]]:
    """A second host: namespace ``oqN`` with address 10.250.X.2, reached from here at 10.250.X.1."""
    n = os.getpid() % 200
    name, here_if, there_if = f"oq{os.getpid()}", f"oq{n}h", f"oq{n}r"
    here, there = f"10.250.{n}.1", f"10.250.{n}.2"
    steps = [("netns", "add", name), ("link", "add", here_if, "type", "veth", "peer", "name", there_if),
             ("link", "set", there_if, "netns", name), ("addr", "add", f"{here}/30", "dev", here_if),
             ("link", "set", here_if, "up"),
             ("netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", there_if),
             ("netns", "exec", name, "ip", "link", "set", there_if, "up"),
             ("netns", "exec", name, "ip", "link", "set", "lo", "up")]
    try:
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                pytest.skip(f"this sandbox refuses network namespaces: ip {' '.join(step)}: {done.stderr.strip()}")
        yield {"name": name, "here": here, "there": there, "link": here_if}
    finally:
        ip("netns", "del", name)
        ip("link", "del", here_if)


def test_worker_cut_off_from_redis_mid_run_has_its_rows_redelivered(tmp_path: Path,
                                                                  remote_host: dict[str, str]) -> None:
    here = remote_host["here"]
    sim = SimServer(SimConfig(keys=[SimKey(TEST_KEY)], latency=0.05), hosts=("127.0.0.1", here)).start()
    server = EmbeddedRedis(tmp_path / "redis", bind=("127.0.0.1", here), password="pw-test-123").start()
    remote = local = None
    try:
        data = write_jsonl(tmp_path / "data.jsonl", seed_rows(200))
        out = tmp_path / "output.jsonl"
        # leases of 10 s: the cut-off worker's rows come back after one lease (the default 30 s is
        # test_trust's kill test); what this test proves does not depend on the length
        common = {"visibility_timeout": 3, "model": {"name": MODEL}, "lease_seconds": 10}
        config_here = write_config(tmp_path / "here.json", sim, broker_url=server.url_for("127.0.0.1"), **common)
        config_there = write_config(tmp_path / "there.json", sim, broker_url=server.url_for(here), **common)
        config_there.write_text(config_there.read_text().replace(sim.base_url_for("127.0.0.1"), sim.base_url_for(here)))
        assert subprocess.run([sys.executable, "-m", "opt_queue", "submit", str(data), "-c", str(config_here),
                               "-o", str(out)], capture_output=True, timeout=60).returncode == 0
        remote = subprocess.Popen(["ip", "netns", "exec", remote_host["name"], sys.executable, "-m", "opt_queue",
                                   "worker", "-c", str(config_there), "--concurrency", "4"],
                                  stdout=open(tmp_path / "remote.log", "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        collector = start_cli("collect", "-c", str(config_here), "-o", str(out), log=tmp_path / "collect.log")
        wait_for(lambda: out.exists() and sum(1 for _ in open(out, "rb")) >= 50, timeout=60,
                 what="the remote worker to answer 50 rows")
        assert ip("link", "set", remote_host["link"], "down").returncode == 0  # the cut
        local = start_cli("worker", "-c", str(config_here), "--concurrency", "4", log=tmp_path / "local.log")
        assert collector.wait(timeout=120) == 0, (tmp_path / "collect.log").read_text()[-2000:]
        rows = list(iter_input(data))
        lines = read_jsonl(out)
        assert [next(iter(line)) for line in lines] == [r.index for r in rows]
        assert all(line[r.index] == sim_answer(MODEL, r.body["messages"]) for line, r in zip(lines, rows))
        paid_twice = sum(n - 1 for n in sim.stats()["per_prompt"].values())
        assert paid_twice <= 4, "only the remote worker's in-flight rows may be paid twice"
    finally:
        for proc in (remote, local):
            if proc is not None:
                kill_group(proc, signal.SIGKILL)
        server.stop()
        sim.stop()
