"""The Flex lane: service_tier flex at half price, and the standard tier when Flex has no room."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from conftest import TEST_KEY, cli, kill_group, read_jsonl, start_cli, wait_for, write_config, write_jsonl

from opt_queue.sim.api import SimKey, SimServer
from opt_queue.store import keys
from opt_queue.store.jobs import job_id_for

PRICES = {"gpt-4o-mini": {"input": 100.0, "output": 200.0}}


def rows(n: int) -> list[dict]:  # type: ignore[type-arg]
    return [{"index": str(i), "messages": [{"role": "user", "content": f"Describe item {i} in one line."}]}
            for i in range(n)]


@pytest.mark.slow
def test_the_flex_lane_pays_half_and_falls_back_to_the_standard_tier(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(flex_unavailable_rate=0.3, flex_latency=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", rows(30))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES,
                          model={"name": "gpt-4o-mini", "max_tokens": 20})
    workers(config, concurrency=8)
    estimate = json.loads(cli("estimate", str(data), "-c", str(config), "-o", str(out), "--json").stdout)
    assert estimate["flex_cost_high"] == pytest.approx(estimate["cost_high"] / 2)
    assert estimate["batch_cost_high"] == pytest.approx(estimate["cost_high"] / 2)
    in_batch = json.loads(cli("estimate", str(data), "-c", str(config), "-o", str(out), "--lane", "batch",
                              "--json").stdout)
    assert in_batch["lane"] == "batch" and in_batch["cost_high"] == pytest.approx(estimate["cost_high"] / 2)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "flex",
               "--output-format", "batch").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [str(i) for i in range(30)]
    tiers = {line["custom_id"]: line["response"]["body"]["service_tier"] for line in lines}
    refused = sim.stats()["faults"]["flex_unavailable"]
    assert 0 < refused < 30 and list(tiers.values()).count("default") == refused  # each fell back once
    sent = sim.received()
    assert sum(r.get("service_tier") == "flex" for r in sent) == 30 and len(sent) == 30 + refused
    expected = sum((line["response"]["body"]["usage"]["prompt_tokens"] * 100
                    + line["response"]["body"]["usage"]["completion_tokens"] * 200) / 1e6
                   * (0.5 if tiers[line["custom_id"]] == "flex" else 1.0) for line in lines)
    spend = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]["spend"]
    assert spend["cost"] == pytest.approx(expected, abs=1e-8) and spend["calls"] == 30


@pytest.mark.slow
def test_flex_only_waits_for_capacity_instead_of_falling_back(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(flex_unavailable_rate=0.5)
    data = write_jsonl(tmp_path / "data.jsonl", rows(8))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, lane="flex", flex_fallback=False,
                          max_retries=0, model={"name": "gpt-4o-mini", "max_tokens": 20})
    workers(config, concurrency=8)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert all(v is not None for line in read_jsonl(out) for v in line.values())  # no attempt was used up
    assert sim.stats()["faults"]["flex_unavailable"] > 0
    assert all(r.get("service_tier") == "flex" for r in sim.received())


# -- the batch lane ---------------------------------------------------------------------------------
def batch_config(tmp_path: Path, sim: SimServer, redis_url: str, **fields) -> Path:  # type: ignore[no-untyped-def]
    return write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES, batch_poll=0.5,
                        lease_seconds=6, model={"name": "gpt-4o-mini", "max_tokens": 20}, **fields)


def batch_stats(sim: SimServer) -> dict:  # type: ignore[type-arg]
    return sim.stats()["batch"]


def paid_once(sim: SimServer, n: int) -> None:
    """Every one of the ``n`` distinct prompts was answered exactly once (in a batch or not)."""
    counts = sim.stats()["per_prompt"]
    assert len(counts) == n and set(counts.values()) == {1}, counts


def submit_and_collect(data: Path, config: Path, out: Path, *submit_args: str) -> list:  # type: ignore[type-arg]
    """Submit, collect to the end, and return the output's lines, every one of them an answer."""
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out), *submit_args)
    assert submitted.returncode == 0, submitted.stderr
    collected = cli("collect", "-c", str(config), "-o", str(out), timeout=180)
    assert collected.returncode == 0, collected.stderr
    lines = read_jsonl(out)
    assert all(v is not None for line in lines for v in line.values())
    return lines


@pytest.mark.slow
def test_the_batch_lane_answers_every_row_once_at_half_price_over_several_batches(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(batch_delay=1.0)
    data = write_jsonl(tmp_path / "data.jsonl", rows(2000))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_lines=600)
    workers(config, processes=2)
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch",
                    "--output-format", "full")
    assert submitted.returncode == 0, submitted.stderr
    assert "in 4 batch files" in submitted.stdout
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=180).returncode == 0
    lines = read_jsonl(out)
    assert [next(iter(line)) for line in lines] == [str(i) for i in range(2000)]
    assert all(v is not None and v["text"] for line in lines for v in line.values())
    stats = batch_stats(sim)
    assert stats["batches"] == 4 and stats["files"] == 4 and stats["lines"] == 2000  # uploads
    assert sim.stats()["calls"] == 0  # not one synchronous call
    paid_once(sim, 2000)
    expected = sum((v["usage"]["prompt_tokens"] * 100 + v["usage"]["completion_tokens"] * 200) / 1e6 * 0.5
                   for line in lines for v in line.values())
    job = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    assert job["spend"]["cost"] == pytest.approx(expected, rel=1e-6) and job["spend"]["calls"] == 2000
    assert job["lane"] == "batch" and [b["state"] for b in job["batches"]] == ["done"] * 4
    assert sum(b["answered"] for b in job["batches"]) == 2000


@pytest.mark.slow
def test_the_batch_lane_writes_files_only_as_far_ahead_as_its_window(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient: redis.Redis, workers) -> None:  # type: ignore[no-untyped-def]
    """A job ten times the batch lane's window: submit writes files as batches finish, and the rows
    in files in Redis never pass the window; every row is answered once, in batches."""
    sim.configure(batch_delay=0.3)
    n, window = 1200, 250
    data = write_jsonl(tmp_path / "data.jsonl", rows(n))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_lines=100, batch_max_queued=window)
    workers(config, processes=1)
    submitting = start_cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch",
                           log=tmp_path / "submit.log")
    peak = samples = 0
    while submitting.poll() is None:
        files = [rclient.get(k) or b"" for k in rclient.scan_iter(match="*:chunk:*", count=1000)]
        peak = max(peak, sum(f.count(b"\n") for f in files))
        samples += 1
        time.sleep(0.05)
    assert submitting.returncode == 0, (tmp_path / "submit.log").read_text()[-2000:]
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=180).returncode == 0
    assert window // 2 <= peak <= window, f"{peak} rows in files at most, window {window} ({samples} samples)"
    assert [next(iter(line)) for line in read_jsonl(out)] == [str(i) for i in range(n)]
    paid_once(sim, n)
    assert sim.stats()["calls"] == 0 and batch_stats(sim)["lines"] == n
    assert not list(rclient.scan_iter(match="*:chunk:*"))  # every file deleted once its rows were published


@pytest.mark.slow
def test_a_killed_worker_mid_batch_uploads_nothing_twice(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(batch_delay=4.0)
    data = write_jsonl(tmp_path / "data.jsonl", rows(300))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_lines=100)
    first = workers(config)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch").returncode == 0
    wait_for(lambda: batch_stats(sim).get("batches", 0) == 3, timeout=30, what="three batches created")
    for proc in first.procs:
        kill_group(proc)  # SIGKILL while its batches are in flight
    workers(config)
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=180).returncode == 0
    assert all(v is not None for line in read_jsonl(out) for v in line.values())
    assert batch_stats(sim)["batches"] == 3 and batch_stats(sim)["lines"] == 300
    paid_once(sim, 300)


@pytest.mark.slow
def test_an_expired_batch_keeps_its_answers_and_sends_the_rest_again(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(batch_delay=1.0, batch_expire_after=0.5)  # a batch does half its rows, then expires
    data = write_jsonl(tmp_path / "data.jsonl", rows(16))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_attempts=10)
    workers(config)
    submit_and_collect(data, config, out, "--lane", "batch")
    stats = batch_stats(sim)
    assert stats["batches"] == 5 and stats["lines"] == 16  # 16 -> 8 left -> 4 -> 2 -> 1: each answers half
    paid_once(sim, 16)


@pytest.mark.slow
def test_batches_wait_their_turn_under_the_enqueued_token_limit(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # each row is ~14 prompt tokens to the simulated API; 4 chunks of 25 rows, room for 2 at a time
    # per organization; two keys of two organizations share the chunks
    other = "sk-test-second-organization-0123456789"
    sim.configure(batch_delay=1.5, batch_enqueued_tokens=400,
                  keys=[SimKey(TEST_KEY, org="org-a"), SimKey(other, org="org-b")])
    data = write_jsonl(tmp_path / "data.jsonl", rows(100))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_lines=25, api_keys=[TEST_KEY, other])
    workers(config)
    submit_and_collect(data, config, out, "--lane", "batch")
    assert batch_stats(sim).get("failed", 0) >= 1  # the limit was met, and waited out
    job = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    assert len({b["key"] for b in job["batches"] if b["answered"]}) == 2  # spread over both keys
    assert not (tmp_path / "output.errors.jsonl").exists() or not read_jsonl(tmp_path / "output.errors.jsonl")
    paid_once(sim, 100)


@pytest.mark.slow
def test_batch_rows_that_can_never_fit_the_enqueued_token_limit_go_synchronously_and_files_are_reused(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # ~14 prompt tokens a row, two rows of ~600 alone: above the 400 enqueued tokens a batch may hold
    sim.configure(batch_delay=1.0, batch_enqueued_tokens=400)
    data_rows = rows(40)  # four chunks: three fit two at a time, the fourth holds the large rows
    for i in (35, 38):
        data_rows[i]["messages"][0]["content"] = f"Describe item {i}: " + "the long review of the committee " * 70
    data_rows[3]["messages"][0]["content"] = "REFUSE this"  # a refusal in a batch: a null kept by a re-run
    data = write_jsonl(tmp_path / "data.jsonl", data_rows)
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_lines=10)
    workers(config)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=180).returncode == 0
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert got["3"] is None and all(v is not None for k, v in got.items() if k != "3")
    error = read_jsonl(tmp_path / "output.errors.jsonl")[0]
    assert error["error_type"] == "refusal" and error["retryable"] is False
    paid_once(sim, 40)  # the two large rows answered synchronously, once; nothing loops
    assert sim.stats()["calls"] == 2  # the synchronous lane's calls: just the two
    job = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    stats = batch_stats(sim)
    # a chunk that waited for room under the limit was created again with the file it had uploaded
    assert stats.get("failed", 0) >= 1 and stats["files"] <= len(job["batches"]), (stats, len(job["batches"]))


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 12], ids=["every-row-in-files", "submit-waits-for-its-window"])
def test_a_deadline_sends_the_leftovers_synchronously_in_time(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient: redis.Redis, workers, window: int) -> None:  # type: ignore[no-untyped-def]
    """With a window (``batch_max_queued``) smaller than the job, submit is still waiting for room
    at the cut-over: the rows it has not written into files by then go synchronously."""
    # the batch would take a minute (a provider slow to cancel, as the real ones may be for up to
    # 10 minutes: test_provider_batches' deadline test, for the three providers' batches)
    sim.configure(batch_delay=60.0)
    data = write_jsonl(tmp_path / "data.jsonl", rows(40))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_max_queued=window, batch_max_lines=6)
    workers(config)
    # submit may wait for room until the cut-over: the collector runs beside it from the start
    submitting = start_cli("submit", str(data), "-c", str(config), "-o", str(out), "--deadline", "12s",
                           log=tmp_path / "submit.log")
    wait_for(lambda: rclient.exists(keys.job_meta(job_id_for(out))), timeout=30, what="the job")
    collecting = start_cli("collect", "-c", str(config), "-o", str(out), log=tmp_path / "collect.log")
    try:
        assert submitting.wait(timeout=60) == 0, (tmp_path / "submit.log").read_text()[-2000:]
        assert collecting.wait(timeout=180) == 0, (tmp_path / "collect.log").read_text()[-2000:]
    finally:
        for proc in (submitting, collecting):
            kill_group(proc)
    late = time.time() - float(rclient.hget(keys.job_meta(job_id_for(out)), "deadline_at") or 0)
    # collected by the deadline: the slack covers the collect command's own final rewrite and exit
    # on a loaded 2-core machine (0.6 s was seen); without the cut-over the rows come ~50 s late
    assert late < 2.0, late
    assert all(v is not None for line in read_jsonl(out) for v in line.values())
    stats = batch_stats(sim)
    # with a window, the rows past it were never in a file: the window's files at most were sent (a
    # file the workers had not sent by the cut-over goes synchronously unsent)
    assert 1 <= stats["batches"] == stats["files"] <= -(-(window or 40) // 6), stats
    assert stats.get("cancelled") == stats["batches"], stats
    paid_once(sim, 40)  # the cancelled batches' answered rows kept, the rest sent synchronously
    assert sim.stats()["calls"] == 40 - stats.get("lines", 0)


@pytest.mark.slow
def test_cancel_cancels_the_batches_keeps_their_answers_and_a_rerun_finishes(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(batch_delay=8.0)
    data = write_jsonl(tmp_path / "data.jsonl", rows(40))
    out = tmp_path / "output.jsonl"
    config = batch_config(tmp_path, sim, redis_url, batch_attempts=1)  # a cancel is not a failed attempt
    workers(config)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch").returncode == 0
    wait_for(lambda: batch_stats(sim).get("batches", 0) == 1, timeout=30, what="the batch")
    time.sleep(2)  # the batch answers a share of its rows meanwhile
    cancelled = cli("cancel", "-c", str(config), "-o", str(out))
    assert cancelled.returncode == 0 and "1 batches are being cancelled" in cancelled.stdout
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode != 0  # incomplete: rows unanswered
    kept = read_jsonl(out) if out.exists() else []
    assert batch_stats(sim)["cancelled"] == 1 and 0 < len(kept) < 40
    assert all(v is not None for line in kept for v in line.values())  # unanswered, not null
    sim.configure(batch_delay=0.5)
    assert len(submit_and_collect(data, config, out, "--lane", "batch")) == 40
    paid_once(sim, 40)


@pytest.mark.slow
def test_a_budget_holds_in_the_batch_lane_and_a_higher_one_finishes(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient, workers) -> None:  # type: ignore[no-untyped-def]
    from opt_queue.store.jobs import Job, job_id_for
    from opt_queue.core.prices import dollars

    sim.configure(batch_delay=0.5)
    data = write_jsonl(tmp_path / "data.jsonl", rows(24))
    out = tmp_path / "output.jsonl"
    estimate = json.loads(cli("estimate", str(data), "-c", str(batch_config(tmp_path, sim, redis_url)), "-o",
                              str(out), "--lane", "batch", "--json").stdout)
    budget = round(estimate["batch_cost_high"] / 2, 6)  # half the job at its worst case
    config = batch_config(tmp_path, sim, redis_url, lane="batch", max_cost=budget)
    workers(config)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    stopped = cli("collect", "-c", str(config), "-o", str(out))
    assert stopped.returncode == 4 and "budget reached: $" in stopped.stderr, stopped.stderr
    meta = Job(rclient, job_id_for(out)).meta()
    assert 0 < dollars(meta["spent_nano"]) <= budget and int(meta["reserved_nano"]) == 0
    kept = read_jsonl(out)
    assert 12 <= len(kept) < 24 and all(v is not None for line in kept for v in line.values())  # unanswered, not null
    config = batch_config(tmp_path, sim, redis_url, lane="batch", max_cost=budget * 4)
    assert len(submit_and_collect(data, config, out)) == 24
    paid_once(sim, 24)
