"""The command line as a user meets it: clear errors, nothing enqueued on bad input, merge, status."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from conftest import TEST_KEY, cli, read_jsonl, seed_rows, start_cli, wait_for, write_config, write_jsonl

from opt_queue.store import keys
from opt_queue.sim.api import SimServer


def no_traceback(result) -> None:  # type: ignore[no-untyped-def]
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_input_names_file_and_line_and_enqueues_nothing(tmp_path: Path, sim: SimServer,
                                                            redis_url: str, rclient: redis.Redis) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"index": "0", "input": "a"}\n{"index": "0", "input": "b"}\n{"index": "2", "input": \n')
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
    result = cli("submit", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "data.jsonl:2: index '0' appears more than once" in result.stderr
    assert "data.jsonl:3: not valid JSON" in result.stderr
    no_traceback(result)
    assert rclient.llen(keys.QUEUE) == 0 and not rclient.keys("oq:*")

    run = cli("run", str(data), "-c", str(write_config(tmp_path / "c2.json", sim)), "-o", str(tmp_path / "o.jsonl"))
    assert run.returncode == 2 and "data.jsonl:2:" in run.stderr
    assert not (tmp_path / "o.jsonl.oq-redis").exists()  # nothing was started


def test_skip_bad_lines_processes_the_rest_and_lists_the_bad(tmp_path: Path, sim: SimServer) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"index": "0", "input": "a"}\nnot json\n{"index": "2", "input": "c"}\n')
    out = tmp_path / "out.jsonl"
    result = cli("run", str(data), "-c", str(write_config(tmp_path / "c.json", sim)), "-o", str(out),
                 "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert [list(x) for x in read_jsonl(out)] == [["0"], ["2"]]


def test_bad_config_names_the_field(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(2))
    config = write_config(tmp_path / "config.json", sim, limits={"rpm": "fast"})
    result = cli("run", str(data), "-c", str(config))
    assert result.returncode == 2 and "limits" in result.stderr
    no_traceback(result)
    (tmp_path / "nokeys.json").write_text('{"api_base": "http://127.0.0.1:9/v1"}')
    result = cli("run", str(data), "-c", str(tmp_path / "nokeys.json"))
    assert result.returncode == 2 and "no API key" in result.stderr


def test_unreachable_broker_fails_fast(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(2))
    config = write_config(tmp_path / "config.json", sim, broker_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    result = cli("submit", str(data), "-c", str(config))
    assert result.returncode == 3 and "cannot reach Redis" in result.stderr
    assert time.monotonic() - started < 15
    no_traceback(result)


def test_output_that_is_not_ours_is_refused_before_anything_runs(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(2))
    out = write_jsonl(tmp_path / "out.jsonl", [{"index": "0", "text": "someone else's file"}])
    result = cli("run", str(data), "-c", str(write_config(tmp_path / "c.json", sim)), "-o", str(out))
    assert result.returncode == 2 and "out.jsonl:1" in result.stderr
    assert sim.stats()["calls"] == 0


def test_merge_and_status_json(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(5))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url,
                          limits={"requests": ["100/min"], "tokens": ["100000/min"]})
    assert cli("run", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    merged = tmp_path / "merged.json"
    assert cli("merge", str(data), str(out), str(merged)).returncode == 0
    items = json.loads(merged.read_text(encoding="utf-8"))
    assert [i["index"] for i in items] == ["0", "1", "2", "3", "4"] and all(i["output"] for i in items)

    status = cli("status", "-c", str(config), "--json")
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    (job,) = snap["jobs"]
    assert job["total"] == 5 and job["finished"] == 5 and job["nulls"] == 0 and job["status"] == "complete"
    (key,) = snap["keys"]
    assert key["requests"] == 5 and key["usage"]["requests/60s"] == 5 and key["tokens"] > 0
    assert TEST_KEY not in status.stdout
    table = cli("status", "-c", str(config))
    assert table.returncode == 0 and key["key"] in table.stdout


def test_json_logs_are_one_object_per_line(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
    config.chmod(0o644)  # world-readable: draws a warning
    result = cli("status", "-c", str(config), env={"OPT_QUEUE_LOG_FORMAT": "json"})
    assert result.returncode == 0
    (line,) = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert line["level"] == "WARNING" and "chmod 600" in line["message"] and TEST_KEY not in result.stderr


def test_status_json_reflects_a_running_job(tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(latency=0.3)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(200))  # 20 s of work: still running when looked at
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url,
                          limits={"requests": ["20/2s"]})
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    workers(config, concurrency=8)

    def snapshot() -> dict:
        return json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)

    wait_for(lambda: snapshot()["jobs"][0]["finished"] >= 10, what="10 rows finished")
    snap = snapshot()
    (job,) = snap["jobs"]
    assert job["status"] == "running" and 10 <= job["finished"] < 200 and job["in_flight_or_queued"] > 0
    (key,) = snap["keys"]
    assert 0 < key["usage"]["requests/2s"] <= 20 and key["requests"] >= 10


def test_collect_follow_waits_for_a_job_not_yet_submitted(tmp_path: Path, sim: SimServer, redis_url: str,
                                                          workers) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(20))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
    early = cli("collect", "-c", str(config), "-o", str(out))
    assert early.returncode == 1 and "run submit first" in early.stderr  # without --follow: says so
    collector = start_cli("collect", "-c", str(config), "-o", str(out), "--follow")
    time.sleep(1.5)
    assert collector.poll() is None  # still waiting for the job
    workers(config, concurrency=4)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert collector.wait(timeout=60) == 0
    assert [next(iter(x)) for x in read_jsonl(out)] == [str(i) for i in range(20)]


@pytest.mark.slow
def test_the_demo_runs_offline_and_answers_every_row(tmp_path: Path) -> None:
    done = cli("demo", "-d", str(tmp_path / "demo"), "--rows", "40", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "40 rows: 40 answered, 0 null" in done.stdout and "0 answered 429" in done.stdout
    lines = read_jsonl(tmp_path / "demo" / "output.jsonl")
    assert [next(iter(line)) for line in lines] == [str(i) for i in range(40)]
    assert all(v for line in lines for v in line.values())
    assert "sk-demo" not in (tmp_path / "demo" / "output.worker.log").read_text()
