"""Stop part way, start again: nothing lost, nothing duplicated, nothing on disk paid twice."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import assert_complete, cli, kill_group, lines_in, seed_rows, start_cli, wait_for, write_config, write_jsonl

from opt_queue.jobflow.dataset import iter_input, read_output
from opt_queue.sim.api import SimServer, prompt_key

MODEL = "gpt-3.5-turbo-0613"


@pytest.mark.slow
def test_killed_worker_and_collector_resume_on_a_shared_broker(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    sim.configure(latency=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(300))
    out = tmp_path / "output.jsonl"
    # tasks of 16 rows: see test_faults.test_redis_restart_mid_run_loses_nothing
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, visibility_timeout=3,
                          model={"name": MODEL}, rows_per_task=16, lease_seconds=10)
    c = ("-c", str(config))
    first = cli("submit", str(data), *c, "-o", str(out))
    assert first.returncode == 0 and "enqueued 300 rows" in first.stdout, first.stderr

    worker = start_cli("worker", *c, "--concurrency", "4", log=tmp_path / "w1.log")
    collector = start_cli("collect", *c, "-o", str(out), log=tmp_path / "c1.log")
    wait_for(lambda: lines_in(out) >= 80, what="80 rows on disk")
    kill_group(worker)
    kill_group(collector)
    on_disk = read_output(out).answered
    assert 80 <= len(on_disk) < 300
    paid_before = sum(sim.stats()["per_prompt"].values())

    again = cli("submit", str(data), *c, "-o", str(out))  # nothing new: every row is on disk or queued
    assert again.returncode == 0 and "enqueued 0 rows" in again.stdout, again.stdout
    worker = start_cli("worker", *c, "--concurrency", "4", log=tmp_path / "w2.log")
    try:
        done = cli("collect", *c, "-o", str(out), timeout=120)
    finally:
        kill_group(worker, signal.SIGTERM)
    assert done.returncode == 0, done.stderr + done.stdout
    assert_complete(data, out)

    per_prompt = sim.stats()["per_prompt"]
    rows = {r.index: prompt_key(r.body["messages"]) for r in iter_input(data)}
    assert all(per_prompt[rows[i]] == 1 for i in on_disk)  # nothing already on disk was paid again
    twice = [p for p, n in per_prompt.items() if n > 1]
    assert len(twice) <= 4, f"only rows in flight at the kill may be paid twice, not {len(twice)}"
    assert paid_before + 300 - len(on_disk) >= sum(per_prompt.values()) - len(twice)


@pytest.mark.slow
def test_killed_run_resumes_from_its_private_redis(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(latency=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(300))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL}, concurrency=4)
    run = start_cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1",
                    log=tmp_path / "run1.log")
    wait_for(lambda: lines_in(out) >= 60, what="60 rows on disk")
    kill_group(run)  # SIGKILL: its worker and Redis get SIGTERM from the kernel (parent death)
    on_disk = read_output(out).answered
    assert (tmp_path / "output.jsonl.oq-redis" / "appendonly.aof").exists() or \
        (tmp_path / "output.jsonl.oq-redis" / "appendonlydir").exists()

    time.sleep(0.5)
    result = cli("run", str(data), "-c", str(config), "-o", str(out), timeout=150)

    assert result.returncode == 0, result.stderr
    assert_complete(data, out)
    per_prompt = sim.stats()["per_prompt"]
    rows = {r.index: prompt_key(r.body["messages"]) for r in iter_input(data)}
    assert all(per_prompt[rows[i]] == 1 for i in on_disk)
    twice = sorted((i for i, key in rows.items() if per_prompt[key] > 1), key=int)
    # the rows in flight at the kill (concurrency); the message names them for the record (5 were
    # seen once in a parallel suite run, not reproduced in six runs under a CPU burner)
    assert sum(n - 1 for n in per_prompt.values()) <= 4, f"paid twice: {twice}; {len(on_disk)} rows were on disk"
    assert Counter(per_prompt.values()).keys() <= {1, 2}


def test_a_finished_job_run_again_reads_no_row_until_a_file_changes(tmp_path: Path, sim: SimServer,
                                                                    redis_url: str) -> None:
    """A finished job run again: nothing sent and the output left as it is (not one row read:
    the collector's final rewrite would replace the file), until the input or the output changes;
    then the rows missing are found and sent as before."""
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(30))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL})
    c = ("-c", str(config), "-o", str(out), "--workers", "1")
    assert cli("run", str(data), *c).returncode == 0
    assert_complete(data, out)
    before = out.stat()
    calls = sim.stats()["calls"]

    fleet = write_config(tmp_path / "fleet.json", sim, model={"name": MODEL}, broker_url=redis_url)
    for command in (("run", str(data), *c), ("submit", str(data), "-c", str(fleet), "-o", str(out)),
                    ("collect", "-c", str(fleet), "-o", str(out))):
        again = cli(*command)
        assert again.returncode == 0, again.stderr
        assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns), command
        assert command[0] != "submit" or "answers every row" in again.stdout, again.stdout
    assert sim.stats()["calls"] == calls

    rows = seed_rows(31)  # one row more: the input's hash changes, the scan sends it alone
    write_jsonl(data, rows)
    assert cli("run", str(data), *c).returncode == 0
    assert_complete(data, out)
    assert sim.stats()["calls"] == calls + 1

    kept = out.read_text().splitlines()  # a line lost from the output: sent again
    out.write_text("\n".join(kept[1:]) + "\n")
    assert cli("run", str(data), *c).returncode == 0
    assert_complete(data, out)
    assert sim.stats()["calls"] == calls + 2
