"""Every endpoint of the Batch file format, the output formats and structured outputs: the pure
parts (requests, answers, lines) and the whole path with real workers and the simulated API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_KEY, cli, read_jsonl, write_config, write_jsonl

from opt_queue.core import answers, formats
from opt_queue.core.answers import RowResult
from opt_queue.jobflow.dataset import read_output
from opt_queue.core.request import BadLine, row_request
from opt_queue.sim.api import SimServer, sim_answer
from opt_queue.core.tokens import estimate_tokens

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["title", "year"], "additionalProperties": False}


def batch_line(custom_id: str, url: str, body: dict) -> dict:  # type: ignore[type-arg]
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def mixed_rows() -> list[dict]:  # type: ignore[type-arg]
    return [
        batch_line("chat-1", "/v1/chat/completions",
                   {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "n": 2}),
        batch_line("resp-1", "/v1/responses", {"model": "gpt-4o-mini", "input": "tell me a story"}),
        batch_line("emb-1", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "vector me",
                                               "dimensions": 8}),
        batch_line("cmpl-1", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Once"}),
        batch_line("mod-1", "/v1/moderations", {"input": "FLAG this"}),
        batch_line("chat-refused", "/v1/chat/completions",
                   {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "REFUSE please"}]}),
        batch_line("resp-2", "/responses", {"model": "o3-mini", "input": [{"role": "user", "content": "think"}]}),
    ]


# -- pure -----------------------------------------------------------------------------------------


def test_batch_rows_of_every_endpoint_become_requests_and_bad_ones_name_the_fix() -> None:
    urls = [row_request(r, "batch")[1] for r in mixed_rows()]
    assert urls == ["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions",
                    "/v1/moderations", "/v1/chat/completions", "/v1/responses"]
    with pytest.raises(BadLine, match="/v1/embeddings"):
        row_request(batch_line("x", "/v1/images/generations", {"prompt": "cat"}), "batch")
    with pytest.raises(BadLine, match='needs "model"'):
        row_request(batch_line("x", "/v1/embeddings", {"input": "text"}), "batch")
    with pytest.raises(BadLine, match='needs "input"'):
        row_request(batch_line("x", "/v1/responses", {"model": "gpt-4o-mini"}), "batch")


def test_each_endpoint_is_paced_with_its_own_token_estimate() -> None:
    text = "word " * 300
    chat = estimate_tokens({"messages": [{"role": "user", "content": text}], "max_tokens": 50})
    embedding = estimate_tokens({"input": text}, "/v1/embeddings")
    several = estimate_tokens({"input": [text, text]}, "/v1/embeddings")
    response = estimate_tokens({"input": text, "max_output_tokens": 50}, "/v1/responses")
    completion = estimate_tokens({"prompt": text}, "/v1/completions")
    assert 1500 / 4 <= embedding < chat  # no completion tokens for a vector
    assert several >= 2 * embedding - 5
    assert response >= embedding + 50
    assert completion == embedding + 16  # the completions endpoint writes 16 tokens unless told
    assert estimate_tokens({"input": [[1, 2, 3] * 100]}, "/v1/embeddings") >= 300  # token arrays


def test_answers_of_every_endpoint() -> None:
    chat = answers.read("/v1/chat/completions", {
        "choices": [{"message": {"content": " a "}, "finish_reason": "stop", "logprobs": {"content": []}},
                    {"message": {"content": "b"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2},
                  "completion_tokens_details": {"reasoning_tokens": 3}}})
    assert (chat.value, chat.prompt_tokens, chat.completion_tokens, chat.cached_tokens, chat.reasoning_tokens) \
        == ("a", 5, 7, 2, 3)
    assert chat.full()["choices"] == ["a", "b"] and chat.full()["logprobs"] == {"content": []}
    resp = answers.read("/v1/responses", {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
                                          "output": [{"type": "message", "content": [
                                              {"type": "output_text", "text": "part"}]}],
                                          "usage": {"input_tokens": 4, "output_tokens": 9}})
    assert (resp.value, resp.finish_reason, resp.prompt_tokens, resp.completion_tokens) == ("part", "length", 4, 9)
    with pytest.raises(answers.Refused):
        answers.read("/v1/responses", {"status": "completed", "output": [{"type": "message", "content": [
            {"type": "refusal", "refusal": "no"}]}]})
    emb = answers.read("/v1/embeddings", {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]})
    assert emb.value == [[1.0], [2.0]] and emb.full()["embedding"] == [[1.0], [2.0]]
    assert answers.read("/v1/embeddings", {"data": [{"index": 0, "embedding": [0.5]}]}).value == [0.5]
    mod = answers.read("/v1/moderations", {"results": [{"flagged": True}]})
    assert mod.value == {"flagged": True} and mod.text is None
    cmpl = answers.read("/v1/completions", {"choices": [{"text": " x ", "finish_reason": "length"}]})
    assert (cmpl.value, cmpl.finish_reason) == ("x", "length")
    with pytest.raises(answers.BadResponse):
        answers.read("/v1/embeddings", {"data": []})


def test_schema_checks_say_what_is_wrong() -> None:
    kind, schema = answers.schema_of("/v1/chat/completions", {"response_format": {
        "type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}}})
    assert answers.check('{"title": "Up", "year": 2009}', kind, schema) == ({"title": "Up", "year": 2009}, None)
    _, problem = answers.check('{"title": "Up"}', kind, schema)
    assert problem is not None and "year" in problem
    _, problem = answers.check("not json", kind, schema)
    assert problem is not None and "not valid JSON" in problem
    assert answers.schema_of("/v1/responses", {"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}) \
        == ("json_schema", SCHEMA)
    assert answers.schema_of("/v1/chat/completions", {"response_format": {"type": "text"}}) is None
    with pytest.raises(ValueError, match="schema is not valid"):
        answers.check("{}", "json_schema", {"type": "no-such-type"})


def test_lines_of_every_format_read_back_as_answer_or_null(tmp_path: Path) -> None:
    ok = RowResult(index="a", answer="text", detail={"status_code": 200, "request_id": "r", "body": {"x": 1}})
    full = RowResult(index="b", answer="text", detail={"text": "text", "usage": {}})
    failed = RowResult(index="c", answer=None, error_type="refusal", error="no")
    out = tmp_path / "out.jsonl"
    out.write_text(formats.line("batch", ok) + formats.line("batch", failed) + formats.line("full", full)
                   + formats.line("seed", RowResult(index="d", answer=[0.1, 0.2])), encoding="utf-8")
    state = read_output(out)
    assert set(state.answered) == {"a", "b", "d"} and set(state.nulls) == {"c"}
    batch_null = json.loads(formats.line("batch", failed))
    assert batch_null["response"] is None and batch_null["error"] == {"code": "refusal", "message": "no"}
    assert formats.resolve("auto", "batch") == "batch" and formats.resolve(None, "seed") == "seed"
    assert formats.resolve("full", "batch") == "full"


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_batch_file_mixing_endpoints_comes_back_in_the_batch_output_format(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
    workers(config, concurrency=8)
    data = write_jsonl(tmp_path / "batch.jsonl", mixed_rows())
    out = tmp_path / "output.jsonl"
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in mixed_rows()]  # once each, in order
    by_id = {line["custom_id"]: line for line in lines}
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
    for custom_id in ("chat-1", "resp-1", "emb-1", "cmpl-1", "mod-1", "resp-2"):
        response = by_id[custom_id]["response"]
        assert by_id[custom_id]["error"] is None and response["status_code"] == 200
        assert response["request_id"].startswith("req_sim")
    chat = by_id["chat-1"]["response"]["body"]
    assert [c["message"]["content"].strip() for c in chat["choices"]] == \
        [sim_answer("gpt-4o-mini", [{"role": "user", "content": "hello"}])] * 2  # n = 2 kept
    assert len(by_id["emb-1"]["response"]["body"]["data"][0]["embedding"]) == 8
    assert by_id["mod-1"]["response"]["body"]["results"][0]["flagged"] is True
    assert by_id["resp-2"]["response"]["body"]["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    assert by_id["chat-refused"]["response"] is None and by_id["chat-refused"]["error"]["code"] == "refusal"
    errors = read_jsonl(tmp_path / "output.errors.jsonl")  # the Batch API's error file shape
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("chat-refused", "refusal")]
    received = {r.get("_url", "/v1/chat/completions") for r in sim.received()}
    assert received == {"/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions",
                        "/v1/moderations"}
    assert next(r for r in sim.received() if r.get("_url") == "/v1/moderations")["model"] == "omni-moderation-latest"

    # Resume: the refusal is kept (the same request would be refused again), unless asked for;
    # then only the null row is sent again, and the file keeps one line per row.
    calls = sim.stats()["calls"]
    again = cli("submit", str(data), "-c", str(config), "-o", str(out))
    assert again.returncode == 0 and "1 nulls kept (1 refusal)" in again.stdout, again.stdout
    assert sim.stats()["calls"] == calls
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--retry-failed").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert sim.stats()["calls"] == calls + 1
    assert [line["custom_id"] for line in read_jsonl(out)] == [r["custom_id"] for r in mixed_rows()]

    # One file, one format: asking for another one is refused before anything is sent.
    result = cli("submit", str(data), "-c", str(config), "-o", str(out), "--output-format", "seed")
    assert result.returncode == 2 and "holds batch-format lines" in result.stderr
    assert sim.stats()["calls"] == calls + 1


@pytest.mark.slow
def test_a_batch_format_job_is_written_in_the_batch_format_even_when_its_submit_is_slow(
        tmp_path: Path, sim: SimServer) -> None:
    """``run`` starts its collector beside its submit; a submit that is slow to start (here: it reads
    an output of 20,000 lines first) must not leave the collector guessing the job's format."""
    n = 20_000
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    data = write_jsonl(tmp_path / "batch.jsonl", [batch_line(str(i), "/v1/chat/completions", body) for i in range(n)])
    out = tmp_path / "output.jsonl"
    done = {"status_code": 200, "request_id": "req_earlier", "body": {"choices": [{"message": {"content": "earlier"}}]}}
    write_jsonl(out, [{"id": f"batch_req_{i}", "custom_id": str(i), "response": done, "error": None}
                      for i in range(n - 10)])
    config = write_config(tmp_path / "config.json", sim)
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out)
    assert len(lines) == n and all("custom_id" in line for line in lines), [l for l in lines if "custom_id" not in l][:3]
    assert sim.stats()["calls"] == 10


@pytest.mark.slow
def test_structured_outputs_are_checked_asked_again_and_reported_in_the_full_format(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    response_format = {"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA, "strict": True}}
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, schema_retries=2,
                          model={"name": "gpt-4o-mini", "response_format": response_format})
    workers(config, concurrency=8)
    rows = [{"index": "good", "messages": [{"role": "user", "content": "a movie"}]},
            {"index": "fixed", "messages": [{"role": "user", "content": "BADJSON movie"}]},
            {"index": "hopeless", "messages": [{"role": "user", "content": "ALWAYSBAD movie"}]},
            {"index": "plain", "messages": [{"role": "user", "content": "no schema here"}],
             "response_format": {"type": "text"}}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--output-format", "full").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert list(got) == ["good", "fixed", "hopeless", "plain"]
    for index in ("good", "fixed"):
        assert set(got[index]["parsed"]) == {"title", "year"} and isinstance(got[index]["parsed"]["year"], int)
        assert json.loads(got[index]["text"]) == got[index]["parsed"]
        assert got[index]["finish_reason"] == "stop" and got[index]["usage"]["prompt_tokens"] > 0
    assert got["hopeless"] is None
    assert got["plain"]["parsed"] is None and got["plain"]["text"].startswith("answer ")
    errors = read_jsonl(tmp_path / "output.errors.jsonl")
    assert [(e["index"], e["error_type"]) for e in errors] == [("hopeless", "schema_invalid")]
    assert "unexpected" in errors[0]["message"] or "required" in errors[0]["message"]
    # good 1 call, fixed 2 (asked again once, with the validation error), hopeless 1 + 2 retries, plain 1
    assert sim.stats()["calls"] == 7
    asked = [r for r in sim.received() if r.get("response_format", {}).get("type") == "json_schema"]
    assert len(asked) == 6
    assert TEST_KEY not in out.read_text() + (tmp_path / "output.errors.jsonl").read_text()
