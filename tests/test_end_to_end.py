"""The whole pipeline with real processes: `opt-queue run` on a private Redis, real Celery workers,
the simulated API over loopback."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conftest import TEST_KEY, cli, read_jsonl, write_config, write_jsonl

from opt_queue.jobflow.dataset import iter_input
from opt_queue.sim.api import SimServer, prompt_key, sim_answer

MODEL = "gpt-3.5-turbo-0613"


def dataset(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 50 == 7:  # longer than the simulated 400-token context window
            rows.append({"index": str(i), "instruction": "Summarise", "input": "长" * 2000})
        elif i % 10 == 3:
            rows.append({"index": str(i), "instruction": "写一个笑话", "input": ""})
        else:
            rows.append({"index": i if i % 13 == 0 else str(i), "instruction": "Translate",
                         "input": f"Ligne {i}: ça va? 今天天气真好 🌤"})
    return rows


def test_run_answers_every_row_once_in_input_order_with_reasons_for_nulls(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(models={MODEL: 400}, latency=0.01)
    data = write_jsonl(tmp_path / "data.jsonl", dataset(200))
    # temperature 0: the repeated prompts do not sample, so each distinct request is paid once
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL, "temperature": 0})
    out = tmp_path / "output.jsonl"

    result = cli("run", str(data), "-c", str(config), "-o", str(out))

    assert result.returncode == 0, result.stderr
    assert "200 rows: 196 answered, 4 null" in result.stdout
    lines = read_jsonl(out)
    rows = list(iter_input(data))
    assert [next(iter(line)) for line in lines] == [r.index for r in rows]
    for line, row in zip(lines, rows):
        answer = line[row.index]
        if row.raw["input"].startswith("长"):
            assert answer is None
        else:
            assert answer == sim_answer(MODEL, row.body["messages"])
    errors = read_jsonl(tmp_path / "output.errors.jsonl")
    assert [e["index"] for e in errors] == ["7", "57", "107", "157"]
    assert {e["error_type"] for e in errors} == {"context_length_exceeded"}
    assert all("maximum context length" in e["message"] and e["key"].startswith("key-") for e in errors)
    expected = Counter(prompt_key(r.body["messages"]) for r in rows if not r.raw["input"].startswith("长"))
    # every distinct request was paid for once: the repeated prompts too (dedupe), each row answered
    assert sim.stats()["per_prompt"] == dict.fromkeys(expected, 1) and max(expected.values()) > 1
    assert not (tmp_path / "output.jsonl.oq-redis").exists()  # private state removed when complete
    assert TEST_KEY not in result.stdout + result.stderr


def test_rerun_sends_only_missing_and_null_rows(tmp_path: Path, sim: SimServer) -> None:
    rows = dataset(30)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, model={"name": MODEL})
    # an earlier run left 20 answers, 2 nulls and nothing for the rest
    prior = [{r.index: "kept"} for r in list(iter_input(data))[:20]] + [{"25": None}, {"26": None}]
    write_jsonl(out, prior)

    result = cli("run", str(data), "-c", str(config), "-o", str(out))

    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out)
    assert len(lines) == 30 and all(v == "kept" for line in lines[:20] for v in line.values())
    assert all(v is not None and v != "kept" for line in lines[20:] for v in line.values())
    assert sim.stats()["answered"] == 10


def test_a_null_that_cannot_change_is_not_paid_again_until_its_request_changes(tmp_path: Path,
                                                                                 sim: SimServer) -> None:
    """The original toolkit's second run with a 16k model: a context-length null is sent again only
    once the request changed (here: a fallback model); the same re-run pays nothing for it."""
    sim.configure(models={MODEL: 400, "gpt-3.5-turbo-16k-0613": 16000})
    rows = [{"index": "short", "input": "hi"}, {"index": "long", "input": "长" * 2000}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    plain = write_config(tmp_path / "plain.json", sim, model={"name": MODEL})
    first = cli("run", str(data), "-c", str(plain), "-o", str(out))
    assert first.returncode == 0 and "1 null" in first.stdout, first.stderr
    assert sim.stats()["calls"] == 2

    again = cli("run", str(data), "-c", str(plain), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert sim.stats()["calls"] == 2  # nothing paid: the same request would fail the same way
    assert "1 nulls kept (1 context_length_exceeded)" in again.stdout and "--retry-failed" in again.stdout
    estimated = cli("estimate", str(data), "-c", str(plain), "-o", str(out))
    assert "rows to send: 0 of 2" in estimated.stdout and "nulls kept" in estimated.stdout, estimated.stdout
    errors = read_jsonl(tmp_path / "output.errors.jsonl")
    assert errors[0]["retryable"] is False and errors[0]["request"]
    forced = cli("run", str(data), "-c", str(plain), "-o", str(out), "--retry-failed")
    assert forced.returncode == 0 and sim.stats()["calls"] == 3  # asked for: sent again (and null again)

    bigger = write_config(tmp_path / "bigger.json", sim, model={"name": MODEL, "fallback": "gpt-3.5-turbo-16k-0613"})
    third = cli("run", str(data), "-c", str(bigger), "-o", str(out))
    assert third.returncode == 0, third.stderr
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert got["long"] == sim_answer("gpt-3.5-turbo-16k-0613", [{"role": "user", "content": "长" * 2000}])
    assert not (tmp_path / "output.errors.jsonl").read_text(encoding="utf-8").strip()


def test_fallback_model_answers_rows_too_long_for_the_main_model(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(models={MODEL: 400, "gpt-3.5-turbo-16k-0613": 16000})
    rows = [{"index": "short", "input": "hi"}, {"index": "long", "input": "长" * 2000}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = write_config(tmp_path / "config.json", sim,
                          model={"name": MODEL, "fallback": "gpt-3.5-turbo-16k-0613"})
    out = tmp_path / "output.jsonl"
    assert cli("run", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    long_messages = [{"role": "user", "content": "长" * 2000}]
    assert got == {"short": sim_answer(MODEL, [{"role": "user", "content": "hi"}]),
                   "long": sim_answer("gpt-3.5-turbo-16k-0613", long_messages)}
    assert sim.stats()["per_prompt"][prompt_key(long_messages)] == 1
