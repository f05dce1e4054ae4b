"""Token counts, offline: the tokenizers against OpenAI's published figures, the chat format's
overhead, the fallback for models of unknown tokenizer, images, context windows."""

from __future__ import annotations

import pytest

from opt_queue.core.tokens import (
    IMAGE_TOKENS,
    char_estimate,
    context_window,
    counter,
    encoding_name,
    estimate_parts,
)

# OpenAI's cookbook ("How to count tokens with tiktoken"): these messages are 129 prompt tokens on
# gpt-3.5-turbo and gpt-4 (cl100k_base) and 124 on gpt-4o and gpt-4o-mini (o200k_base), as the
# API reports them.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]


@pytest.mark.parametrize("model, expected", [("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4", 129),
                                             ("gpt-3.5-turbo", 129)])
def test_a_chat_counts_as_the_api_reports_it(model: str, expected: int) -> None:
    prompt, cap = estimate_parts({"model": model, "messages": COOKBOOK, "max_tokens": 10})
    assert (prompt, cap) == (expected, 10)


@pytest.mark.parametrize("text, cl100k, o200k", [
    # OpenAI's GPT-4o announcement: the same sentence in cl100k_base and o200k_base
    ("Hello, my name is GPT-4o. I'm a new type of language model, it's nice to meet you!", 27, 24),
    ("你好，我的名字是GPT-4o。我是一种新型的语言模型，很高兴见到你!", 34, 24),
    # tiktoken's own tests: "hello world" is [15339, 1917]; "👍" is [9468, 239, 235] in cl100k_base
    ("hello world", 2, 2),
    ("👍", 3, 1),
])
def test_the_tokenizers_match_openais_published_counts(text: str, cl100k: int, o200k: int) -> None:
    assert counter("gpt-4")(text) == cl100k  # type: ignore[misc]
    assert counter("gpt-4o-mini")(text) == o200k  # type: ignore[misc]


def test_model_families_map_to_their_tokenizers() -> None:
    for model in ("gpt-4o-mini", "gpt-4.1-nano", "gpt-5-mini", "o3-mini", "o4-mini", "ft:gpt-4o-mini:org::x",
                  "chatgpt-4o-latest"):
        assert encoding_name(model) == "o200k_base", model
    for model in ("gpt-4", "gpt-4-turbo", "gpt-3.5-turbo-0613", "gpt-35-turbo", "text-embedding-3-small"):
        assert encoding_name(model) == "cl100k_base", model
    assert encoding_name("llama-3.1-8b") is None and encoding_name(None) is None


def test_a_model_of_unknown_tokenizer_gets_the_upper_bound_and_the_special_text_counts_as_text() -> None:
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "你好" * 50}], "max_tokens": 5}
    prompt, _ = estimate_parts(body)
    assert prompt >= char_estimate("你好" * 50) and prompt > 150  # 3 bytes a CJK character: the safe side
    text = "ignore <|endoftext|> this"
    assert estimate_parts({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})[0] > 7


def test_images_count_at_their_detail_and_a_lone_surrogate_does_not_fail() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image, low]}]}
    assert estimate_parts(body)[0] == 3 + 1 + 1 + IMAGE_TOKENS + 85 + 3  # not the base64's length
    assert estimate_parts({"model": "gpt-4o", "messages": [{"role": "user", "content": "a\ud800b"}]})[0] > 0


def test_context_windows_come_from_the_table_or_the_config() -> None:
    assert context_window("gpt-4o-mini") == 128_000
    assert context_window("gpt-4.1-mini") == 1_047_576
    assert context_window("gpt-4-0613") == 8_192 and context_window("gpt-4-turbo") == 128_000
    assert context_window("my-llama") is None
    assert context_window("my-llama", {"my-llama": 8192}) == 8192
    assert context_window("gpt-4o", 4096) == 4096


def test_counting_loads_one_vocabulary_not_the_whole_package(tmp_path) -> None:
    """bpe-openai's package import builds every encoding's tables (1.1 s of CPU per process):
    counting loads its backend alone, and gives the package's own counts."""
    import subprocess
    import sys

    code = ("import sys; from opt_queue.core.tokens import counter; n = counter('gpt-4o')('hello world'); "
            "print(n, 'bpe_openai.compat' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False"]
    import bpe_openai

    text = "请考试我的软件！12345 and some English, émoji 👋"
    assert counter("gpt-4o")(text) == len(bpe_openai.get_encoding("o200k_base").encode_ordinary(text))  # type: ignore[misc]
