"""Trust on a shared broker: rows are their index, the output file is the truth, a killed worker's
rows come back within a minute, every response shape has a defined answer, and what can be checked
is checked before anything is paid for."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from conftest import (assert_complete, cli, kill_group, lines_in, read_jsonl, seed_rows, start_cli, wait_for,
                      write_config, write_jsonl)

from opt_queue.store import keys
from opt_queue.jobflow.dataset import iter_input
from opt_queue.store.jobs import job_id_for
from opt_queue.sim.api import SimServer, prompt_key

MODEL = "gpt-3.5-turbo-0613"


def paid(sim: SimServer, data: Path) -> dict[str, int]:
    """How often the API answered (and billed) each row of ``data``, by index."""
    per_prompt = sim.stats()["per_prompt"]
    return {r.index: per_prompt.get(prompt_key(r.body["messages"]), 0) for r in iter_input(data)}


def test_an_edited_input_sends_exactly_the_rows_the_output_lacks(tmp_path: Path, sim: SimServer,
                                                                redis_url: str) -> None:
    """A bad line skipped, then fixed; rows reordered; rows added: every index once, paid once."""
    rows = seed_rows(30)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[9] = '{"index": "9", "instruction": "Translate to English", "input": '  # torn JSON
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, model={"name": MODEL})
    first = cli("run", str(data), "-c", str(config), "-o", str(out), "--skip-bad-lines", "--workers", "1")
    assert first.returncode == 0, first.stderr
    assert "9" not in {next(iter(line)) for line in read_jsonl(out)}

    edited = list(reversed(rows)) + seed_rows(5, start=30)  # fixed, reordered, extended
    write_jsonl(data, edited)
    second = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1")
    assert second.returncode == 0, second.stderr
    assert_complete(data, out)  # every index of the new file, in its order
    assert set(paid(sim, data).values()) == {1}  # the fixed row and the new rows once; no row twice


@pytest.mark.slow
def test_the_output_file_is_the_truth_on_a_shared_broker(tmp_path: Path, sim: SimServer, redis_url: str,
                                                        rclient: redis.Redis, workers) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(200))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, model={"name": MODEL},
                          state_ttl="1d")
    c = ("-c", str(config), "-o", str(out))
    workers(config, concurrency=16)

    def submit_and_collect() -> str:
        submitted = cli("submit", str(data), *c)
        assert submitted.returncode == 0, submitted.stderr
        collected = cli("collect", *c)
        assert collected.returncode == 0, collected.stderr
        assert_complete(data, out)
        return submitted.stdout

    assert "enqueued 200 rows" in submit_and_collect()
    job = job_id_for(out)
    assert 0 < rclient.ttl(keys.job_meta(job)) <= 86400  # a finished job's state expires

    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    deleted, nulled = {"3", "50", "199"}, {"7", "8", "120"}
    edited = []
    for line in lines:
        index = next(iter(json.loads(line)))
        if index not in deleted:
            edited.append(json.dumps({index: None}) + "\n" if index in nulled else line)
    out.write_text("".join(edited), encoding="utf-8")
    again = submit_and_collect()
    assert "enqueued 6 rows" in again and "3 nulls retried" in again and "3 sent again" in again
    assert rclient.ttl(keys.job_meta(job)) > 0
    counts = paid(sim, data)
    assert {i for i, n in counts.items() if n == 2} == deleted | nulled
    assert set(counts.values()) == {1, 2}

    out.unlink()
    assert "enqueued 200 rows" in submit_and_collect()
    assert set(paid(sim, data).values()) <= {2, 3}

    assert cli("submit", str(data), *c).stdout.count("enqueued 0 rows") == 1  # the file answers all
    reset = cli("reset", *c, "--yes")
    assert reset.returncode == 0 and f"job {job} reset" in reset.stdout, reset.stderr
    assert not rclient.exists(keys.job_meta(job))
    refused = cli("reset", *c)  # no terminal: it says so instead of asking
    assert refused.returncode == 0 and "nothing to reset" in refused.stdout


@pytest.mark.slow
def test_rows_a_collector_writes_while_a_submit_runs_are_not_sent_again(tmp_path: Path, sim: SimServer,
                                                                       redis_url: str, rclient: redis.Redis,
                                                                       workers) -> None:  # type: ignore[no-untyped-def]
    """A re-run's submit reads output.jsonl, then claims rows batch by batch; a collector beside it
    (``run`` starts one) writes the answers an earlier run left in Redis meanwhile. Those rows are
    on disk by the time the submit claims them: they must not be taken for lines gone missing."""
    from opt_queue.core.answers import RowResult
    from opt_queue.store.jobs import Job

    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(40))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, model={"name": MODEL},
                          max_queued=20)  # the submit claims 20 rows, then waits for room
    job = Job(rclient, job_id_for(out))
    earlier = [str(i) for i in range(30, 35)]  # answered by an earlier run, never collected
    job.claim(earlier)
    for i in earlier:
        job.publish(RowResult(index=i, answer=f"earlier answer {i}"))

    submit = start_cli("submit", str(data), "-c", str(config), "-o", str(out), log=tmp_path / "submit.log")
    wait_for(lambda: job.progress().claimed >= 25 and job.progress().submitting, what="the submit to wait")
    collect = start_cli("collect", "-c", str(config), "-o", str(out), log=tmp_path / "collect.log")
    wait_for(lambda: lines_in(out) >= 5, what="the earlier answers on disk")  # before the submit claims them
    workers(config, concurrency=8)
    assert submit.wait(timeout=120) == 0, (tmp_path / "submit.log").read_text()
    assert collect.wait(timeout=120) == 0, (tmp_path / "collect.log").read_text()

    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert [got[i] for i in earlier] == [f"earlier answer {i}" for i in earlier]
    assert sim.stats()["calls"] == 35  # the five rows already answered were not paid again
    assert "enqueued 35 rows" in (tmp_path / "submit.log").read_text()


@pytest.mark.slow
def test_a_killed_workers_rows_are_answered_within_a_minute(tmp_path: Path, sim: SimServer,
                                                          redis_url: str) -> None:
    """Default visibility_timeout (an hour): the rows' leases bring them back, not kombu. The
    leases are 6 s here instead of the default 30 s (the same path, 24 s less of the suite)."""
    sim.configure(latency=0.3)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(400))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, model={"name": MODEL},
                          lease_seconds=6)
    c = ("-c", str(config))
    assert cli("submit", str(data), *c, "-o", str(out)).returncode == 0
    victim = start_cli("worker", *c, "--concurrency", "8", log=tmp_path / "victim.log")
    survivor = start_cli("worker", *c, "--concurrency", "8", log=tmp_path / "survivor.log")
    collector = start_cli("collect", *c, "-o", str(out), log=tmp_path / "collect.log")
    try:
        wait_for(lambda: lines_in(out) >= 100, what="100 rows")
        on_wire = sim.stats()["max_in_flight"]
        kill_group(victim)
        killed = time.monotonic()
        assert collector.wait(timeout=120) == 0, (tmp_path / "collect.log").read_text()[-2000:]
        recovered_in = time.monotonic() - killed
    finally:
        kill_group(survivor, signal.SIGTERM)
    assert_complete(data, out)
    assert recovered_in < 60, recovered_in
    twice = sum(n - 1 for n in paid(sim, data).values())
    assert twice <= min(8, on_wire), twice  # only the victim's calls on the wire
    assert "stopped answering" in (tmp_path / "survivor.log").read_text() + (tmp_path / "collect.log").read_text()
    target = os.environ.get("OPT_QUEUE_FAULT_REPORT")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps({"fault": "worker SIGKILLed, default visibility_timeout", "rows": 400,
                                 "recovered_s": round(recovered_in, 1), "paid_twice": twice}) + "\n")


def test_tool_calls_refusals_and_cut_answers_are_paid_once_and_recorded(tmp_path: Path, sim: SimServer) -> None:
    tool = {"type": "function", "function": {"name": "label", "parameters": {"type": "object"}}}
    rows = [{"index": "t", "messages": [{"role": "user", "content": "label this"}], "tools": [tool]},
            {"index": "r", "messages": [{"role": "user", "content": "REFUSE please"}]},
            {"index": "cut", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 2},
            {"index": "plain", "messages": [{"role": "user", "content": "hello"}]}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL}, max_retries=5)
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    answers = {k: v for line in read_jsonl(out) for k, v in line.items()}
    calls = json.loads(answers["t"])
    assert calls[0]["function"]["name"] == "label" and json.loads(calls[0]["function"]["arguments"])
    assert answers["r"] is None and answers["cut"] and answers["plain"]
    assert set(paid(sim, data).values()) == {1} and sim.stats()["calls"] == 4  # nothing retried
    errors = {e["index"]: e for e in read_jsonl(tmp_path / "output.errors.jsonl")}
    assert errors["r"]["error_type"] == "refusal" and "cannot help" in errors["r"]["message"]
    assert errors["cut"]["warning"] is True and errors["cut"]["error_type"] == "finish_reason_length"
    assert set(errors) == {"r", "cut"}
    assert "1 answers were cut at the token limit" in result.stdout


def _unwritable(tmp_path: Path) -> Path:
    """An output path in a directory this process cannot write (root ignores mode bits)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel/opt-queue-output.jsonl")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "output.jsonl"


def test_what_can_be_checked_is_checked_before_anything_is_paid(tmp_path: Path, sim: SimServer,
                                                               redis_url: str, rclient: redis.Redis) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(10))
    bad_base = write_config(tmp_path / "bad.json", sim, api_base="notaurl")
    result = cli("run", str(data), "-c", str(bad_base), "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode == 2 and "api_base: 'notaurl' is not an http(s) URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    readonly = _unwritable(tmp_path)
    for command in (("run",), ("submit",)):
        config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
        result = cli(*command, str(data), "-c", str(config), "-o", str(readonly))
        assert result.returncode == 2, result.stderr
        assert f"cannot write {readonly}" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert rclient.llen(keys.QUEUE) == 0 and not rclient.keys("oq:{*")  # nothing enqueued
    assert sim.stats()["calls"] == 0


def test_run_keeps_its_worker_log_and_refuses_a_run_nobody_can_work(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(6))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL})
    idle = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "0", timeout=60)
    assert idle.returncode == 2 and "--workers 0" in idle.stderr and sim.stats()["calls"] == 0
    done = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "output.worker.log"
    assert f"worker log: {log}" in done.stdout and log.stat().st_size > 0
    assert not (tmp_path / "output.jsonl.oq-redis").exists()  # the state goes, the log stays


@pytest.mark.slow
def test_a_batch_with_a_redis_error_and_a_handed_back_row_finishes_both(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient: redis.Redis, workers) -> None:  # type: ignore[no-untyped-def]
    """One task of three rows: "0" is answered at once, "1" waits for the key's next window past
    its task's hold (handed back), "x" meets a Redis error (its model's only key has limiter state
    of the wrong type) until the test mends it. Both "1" and "x" must finish, each paid once."""
    from opt_queue.core.config import fingerprint
    from opt_queue.limits.limiter import scope_name
    from opt_queue.sim.api import SimKey

    slow, other = "sk-test-slow-0123456789abcdefghij", "sk-test-other-0123456789abcdefgh"
    sim.configure(keys=[SimKey(slow), SimKey(other)])
    rows = [{"index": i, "messages": [{"role": "user", "content": f"row {i}"}]} for i in ("0", "1")]
    rows.append({"index": "x", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "row x"}]})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, rows_per_task=3,
                          visibility_timeout=6, model={"name": MODEL},
                          api_keys=[{"key": slow, "models": [MODEL], "limits": {"requests": ["1/8s"]}},
                                    {"key": other, "models": ["gpt-4o-mini"]}])
    broken = keys.bucket_state(scope_name(fingerprint(other), "gpt-4o-mini"))
    rclient.set(broken, "not a hash")  # every admission of row x now fails with WRONGTYPE
    workers(config, concurrency=4)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    log = tmp_path / "worker.log"
    wait_for(lambda: log.exists() and "did not finish" in log.read_text(), timeout=30, what="a Redis error")
    wait_for(lambda: "were enqueued again" in log.read_text(), timeout=30, what="a hand-back")
    rclient.delete(broken)
    # well before a lost row would be found (two quiet lease lengths): row 1 had its message
    collected = cli("collect", "-c", str(config), "-o", str(out), timeout=45)
    assert collected.returncode == 0, collected.stderr
    answers = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert list(answers) == ["0", "1", "x"] and all(answers.values())
    assert set(paid(sim, data).values()) == {1}
    assert log.read_text().count("were enqueued again") <= 6  # once per 2 s hold, not a storm
