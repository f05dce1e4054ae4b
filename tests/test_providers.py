"""Providers beside OpenAI: a key names its provider, a row's model picks the keys that serve it,
and each provider's requests, answers, errors and rate-limit headers are mapped to the engine's
terms. Pure functions here; the jobs that mix providers through real workers are at the end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import TEST_KEY, cli, read_jsonl, write_config, write_jsonl

from opt_queue.core import answers
from opt_queue.core.config import Config, provider_of
from opt_queue.providers import Kind
from opt_queue.providers import anthropic as claude
from opt_queue.sim.api import SimKey, SimServer, sim_answer

ANT_KEY = "sk-ant-api03-test-0123456789abcdefghijklmnopqrstuv"
CLAUDE = "claude-haiku-4-5"


# -- configuration: which keys serve which rows ---------------------------------------------------
def test_a_rows_model_picks_its_provider_by_name_or_by_a_keys_models() -> None:
    assert [provider_of(m) for m in ("gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash",
                                     "models/gemini-2.0-flash", "o3-mini", "llama-3.1-8b")] == \
        ["openai", "anthropic", "gemini", "gemini", "openai", "openai"]
    cfg = Config.model_validate({"api_keys": [
        "sk-a", {"key": ANT_KEY, "provider": "anthropic"},
        {"key": "sk-gw", "models": ["claude-via-gateway"]}]})
    openai_key, ant, gateway = cfg.keys()
    assert (ant.provider, ant.api_base) == ("anthropic", "https://api.anthropic.com")
    assert openai_key.serves("gpt-4o") and not openai_key.serves(CLAUDE)  # an Anthropic key exists
    assert ant.serves(CLAUDE) and not ant.serves("gpt-4o") and not ant.serves("gemini-2.5-pro")
    assert gateway.serves("claude-via-gateway") and not gateway.serves("gpt-4o")  # its list decides
    # the seed's config (OpenAI keys only) keeps serving every model, a gateway's claude-* included
    seed = Config.model_validate({"api_keys": ["sk-a"], "api_base": "https://gateway.example/v1"}).keys()[0]
    assert seed.serves(CLAUDE) and seed.serves("gemini-2.5-flash") and seed.api_base == "https://gateway.example/v1"


@pytest.mark.parametrize("keys, field", [
    ([{"key": "a", "provider": "anthropic", "group": "g"}, {"key": "b", "group": "g"}], "group 'g' holds keys of"),
    ([{"key": "a", "provider": "anthropic", "azure": {"endpoint": "https://x.openai.azure.com",
                                                      "api_version": "2024-10-21"}}], "azure"),
    ([{"key": "a", "provider": "claude"}], "provider"),
])
def test_a_key_config_that_cannot_work_is_refused_naming_its_field(keys: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Config.model_validate({"api_keys": keys}).keys()


# -- Anthropic: the request ---------------------------------------------------------------------
def test_a_chat_row_becomes_a_native_messages_request() -> None:
    body = {"model": CLAUDE, "temperature": 0.2, "top_p": 0.9, "stop": "END", "seed": 7, "service_tier": "flex",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                             {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}],
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look it up",
                                                        "parameters": {"type": "object"}}}],
            "tool_choice": "required"}
    native = claude.to_messages(body)
    assert native == {
        "model": CLAUDE, "max_tokens": claude.DEFAULT_MAX_TOKENS, "system": "Be brief.\n\nAnswer in English.",
        "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}]}],
        "tools": [{"name": "look", "input_schema": {"type": "object"}, "description": "Look it up"}],
        "tool_choice": {"type": "any"}}
    assert claude.to_messages({"model": CLAUDE, "max_completion_tokens": 30, "messages": []})["max_tokens"] == 30
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert claude.to_messages({"model": CLAUDE, "messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})["output_config"] == \
        {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize("extra, said", [({"n": 2}, "n > 1"), ({"logprobs": True}, "logprobs"),
                                         ({"functions": []}, "functions: not a parameter")])
def test_a_parameter_with_no_messages_equivalent_stops_the_job_by_name(extra: dict, said: str) -> None:
    with pytest.raises(claude.NotMappable, match=said) as got:
        claude.to_messages({"model": CLAUDE, "messages": [{"role": "user", "content": "x"}], **extra})
    assert claude.classify(got.value).kind is Kind.JOB_CONFIG


# -- Anthropic: the answer ----------------------------------------------------------------------
def _message(content: list, stop: str = "end_turn", **usage: int) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE, "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 20, "output_tokens": 7, **usage}}


def test_a_messages_answer_reads_like_an_openai_one() -> None:
    reply = answers.read("/v1/chat/completions", _message(
        [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": " Hello "}, {"type": "text", "text": "there"}],
        cache_read_input_tokens=100, cache_creation_input_tokens=30))
    assert (reply.value, reply.finish_reason) == ("Hello there", "stop")
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (150, 100, 7)
    assert reply.full()["native"]["id"] == "msg_1" and reply.full()["finish_reason"] == "stop"
    assert answers.read("/v1/chat/completions", _message([{"type": "text", "text": "cut"}], "max_tokens")).finish_reason \
        == "length"
    tool = answers.read("/v1/chat/completions", _message(
        [{"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": "猫"}}], "tool_use"))
    assert tool.finish_reason == "tool_calls"
    assert tool.tool_calls == [{"id": "toolu_1", "type": "function",
                                "function": {"name": "look", "arguments": '{"q": "猫"}'}}]
    assert json.loads(tool.value) == tool.tool_calls
    with pytest.raises(answers.Refused) as refused:
        answers.read("/v1/chat/completions", _message([], "refusal"))
    assert refused.value.usage["prompt_tokens"] == 20  # a refusal is billed
    with pytest.raises(answers.BadResponse):
        answers.read("/v1/chat/completions", _message([], "end_turn"))


# -- Anthropic: errors and headers --------------------------------------------------------------
def _error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def test_anthropics_errors_map_to_the_error_policy() -> None:
    headers = {"retry-after": "7", "anthropic-ratelimit-requests-limit": "50",
               "anthropic-ratelimit-input-tokens-limit": "30000"}
    tokens = claude.classify_status(429, _error("rate_limit_error", "This request would exceed the rate limit "
                                                "for your organization of 30,000 input tokens per minute."), headers)
    assert (tokens.kind, tokens.retry_after, tokens.tokens, tokens.server_limits) == \
        (Kind.RATE_LIMITED, 7.0, True, {"requests": 50, "tokens": 30000})
    requests = claude.classify_status(429, _error("rate_limit_error", "... of 50 requests per minute."), {})
    assert requests.kind is Kind.RATE_LIMITED and not requests.tokens
    cases = {(529, "overloaded_error", "Overloaded"): Kind.SLOW_DOWN,
             (401, "authentication_error", "invalid x-api-key"): Kind.KEY_DEAD,
             (403, "permission_error", "no access"): Kind.KEY_DEAD,
             (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API."): Kind.KEY_DEAD,
             (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"): Kind.TOO_LONG,
             (404, "not_found_error", "model: claude-nope"): Kind.JOB_CONFIG,
             (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."): Kind.BAD_ROW,
             (400, "invalid_request_error", "messages.0.content: empty"): Kind.BAD_ROW,
             (500, "api_error", "Internal server error"): Kind.TRANSIENT}
    for (status, kind, message), expected in cases.items():
        assert claude.classify_status(status, _error(kind, message), {}).kind is expected, (status, kind)


def test_the_limits_come_from_the_anthropic_ratelimit_headers() -> None:
    headers = {"anthropic-ratelimit-requests-limit": "4000", "anthropic-ratelimit-requests-remaining": "3999",
               "anthropic-ratelimit-input-tokens-limit": "400000",
               "anthropic-ratelimit-input-tokens-remaining": "399000",
               "anthropic-ratelimit-input-tokens-reset": "2026-12-03T19:00:00Z",
               "anthropic-ratelimit-output-tokens-limit": "80000"}
    assert claude.server_limits(headers) == {"requests": 4000, "tokens": 400000}
    assert claude.token_window(headers) == (400000, 399000)
    assert claude.token_window({"anthropic-ratelimit-input-tokens-limit": "x"}) is None
    assert claude.server_limits({}) == {}


# -- real workers against the simulated API -----------------------------------------------------
def _mixed_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"index": str(i), "model": CLAUDE,
                         "messages": [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": f"第 {i} 行: what is {i} squared?"}]})
        else:  # the job's model (an OpenAI one)
            rows.append({"index": str(i), "messages": [{"role": "user", "content": f"第 {i} 行 ✓"}]})
    return rows


def _claude_config(path: Path, sim: SimServer, **fields: object) -> Path:
    return write_config(path, sim, api_keys=[TEST_KEY, {"key": ANT_KEY, "provider": "anthropic",
                                                        "api_base": sim.base_url.removesuffix("/v1")}],
                        model={"name": "gpt-4o-mini", "max_tokens": 40}, **fields)


def test_one_job_mixes_openai_and_claude_rows_each_answered_by_its_provider_within_its_limits(
        tmp_path: Path, sim: SimServer) -> None:
    # Anthropic's windows bind (requests and input tokens, learned from its headers: no limits typed);
    # its output window is set where this job cannot reach it. One call in ten meets 529 overloaded:
    # a slow-down that uses no attempt (max_retries 0: a used attempt would leave a null)
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY, rpm=8, tpm=120, otpm=100_000)], latency=0.05, minute=2,
                  anthropic_token_rounding=1, overloaded_rate=0.1, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", _mixed_rows(40))
    out = tmp_path / "output.jsonl"
    result = cli("run", str(data), "-c", str(_claude_config(tmp_path / "config.json", sim, max_retries=0)),
                 "-o", str(out), "--output-format", "full")
    assert result.returncode == 0, result.stderr
    lines = {k: v for line in read_jsonl(out) for k, v in line.items()}
    rows = {r["index"]: r for r in _mixed_rows(40)}
    assert len(lines) == 40
    for index, got in lines.items():
        row = rows[index]
        if "model" in row:  # a claude row: answered through the Messages API, its native body kept
            assert got["text"] == sim_answer(CLAUDE, row["messages"])
            assert got["native"]["type"] == "message" and got["finish_reason"] == "stop"
            assert got["usage"]["prompt_tokens"] > 0
        else:
            assert got["text"] == sim_answer("gpt-4o-mini", row["messages"]) and "native" not in got
    stats = sim.stats()
    assert stats["rate_limited"] == 0, stats["refusals"]
    claude_calls = [r for r in sim.received() if r.get("_url") == "/v1/messages"]
    assert stats["faults"].get("overloaded", 0) > 0
    assert len(claude_calls) == 20 + stats["faults"]["overloaded"]  # one call a row, and one per 529
    assert all(r["system"] == "Answer briefly." and r["max_tokens"] == 40 for r in claude_calls)
    assert len(stats["per_prompt"]) == 40 and set(stats["per_prompt"].values()) == {1}  # nothing paid twice
    assert ANT_KEY not in result.stdout + result.stderr


def test_a_provider_whose_sdk_is_missing_is_refused_before_any_call(tmp_path: Path, sim: SimServer) -> None:
    shim = tmp_path / "shim" / "anthropic"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named anthropic (test shim)')\n")
    data = write_jsonl(tmp_path / "data.jsonl", _mixed_rows(4))
    config = _claude_config(tmp_path / "config.json", sim)
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), *sys.path])}
    for command in (("run", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl")),
                    ("estimate", str(data), "-c", str(config))):
        result = cli(*command, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "pip install 'opt-queue[anthropic]'" in result.stderr and "api_keys[1]" in result.stderr
    assert sim.stats()["calls"] == 0
