"""Token counts of a request, as the server counts it against its tokens-per-minute window and
bills it. Pure functions; the limiter, the producer and ``estimate`` use them.

**Exact counts, offline.** A model of a known family is counted with its real tokenizer:
``o200k_base`` for gpt-4o, gpt-4.1, gpt-4.5, gpt-5, chatgpt-4o and the o-series, ``cl100k_base``
for gpt-4, gpt-3.5 and OpenAI's embeddings (:func:`encoding_name`). The vocabularies ship inside
the ``bpe-openai`` package (tiktoken's API over a Rust tokenizer, both encodings built in), so a
worker with no internet counts exactly; tiktoken itself downloads its encoding files on first use.
A chat request counts OpenAI's format: 3 tokens per message, its role and content (and a name, plus
one), and 3 that prime the reply (the cookbook's ``num_tokens_from_messages``). An image part
counts 765 tokens (a 1024x1024 image at high detail; 85 with ``detail: low``).

**Other models** (Llama on vLLM, a proxy's own names) fall back to estimates: the limiter uses
:func:`char_estimate`, an upper bound (one token per 3 characters plus one per UTF-8 byte beyond a
character's first), and ``estimate`` the central :func:`typical_estimate`. ``OPT_QUEUE_TOKENIZER=
chars`` forces the estimates for every model.

The limiter does not take any of this for the server's count: servers count in their own way
(OpenAI's rate limiter is said to count about 4 characters a token), and it learns each server's
way from the ``x-ratelimit-*-tokens`` headers (``limiter.py``, calibration).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

from opt_queue.core.request import CHAT_URL, ENDPOINTS

CHARS_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 3
"""OpenAI's count: 3 tokens around each message (and 1 more for a ``name``)."""
REPLY_PRIMING = 3
"""Tokens that prime the reply (``<|start|>assistant<|message|>``)."""
CHAT_FORMAT_URLS = frozenset({CHAT_URL, "/v1/responses"})
"""Endpoints whose prompt is a list of messages (the chat format's overhead applies)."""
IMAGE_TOKENS = 765
"""An image part: gpt-4o's count for a 1024x1024 image at high detail (85 + 170 per 512 px tile)."""
IMAGE_TOKENS_LOW = 85
O200K = "o200k_base"
CL100K = "cl100k_base"
TOKEN_COUNTS = ("typical", "chars4", "o200k", "cl100k", "estimator")
"""Ways a server may count a prompt, which the simulated API can each take (``simapi.py``)."""
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4", "gpt-oss",
                   "omni-moderation", "codex-mini", "computer-use")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")


def encoding_name(model: str | None) -> str | None:
    """The tokenizer of ``model`` (``o200k_base``, ``cl100k_base``), None for a model of unknown
    family. A fine-tune (``ft:gpt-4o-mini:org::id``) and an Azure-style name (``gpt-35-turbo``)
    count as their base model."""
    if not model or os.environ.get("OPT_QUEUE_TOKENIZER", "auto") == "chars":
        return None
    name = model.lower().removeprefix("ft:").removeprefix("openai/")
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name.startswith(_CL100K_PREFIXES):
        return CL100K
    return None


def _backend() -> Any:
    """``bpe_openai``'s Rust extension, loaded without the package's ``__init__``: that imports its
    tiktoken compatibility layer, which builds the rank tables of every encoding at import (1.1 s
    of CPU for each worker process and command, measured; the extension alone loads in 2 ms and
    one encoding in 0.1 s). Upstream: ``bpe_openai/compat.py`` (0.1.4) calls ``_metadata`` for all
    encodings at import time. None when this version lays its files out otherwise."""
    import importlib.machinery
    import importlib.util

    package = importlib.util.find_spec("bpe_openai")
    if package is None or not package.submodule_search_locations:
        return None
    for folder in package.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.startswith("_bindings.") and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                spec = importlib.util.spec_from_file_location("bpe_openai._bindings", os.path.join(folder, name))
                if spec is None or spec.loader is None:
                    return None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
    return None


@functools.cache
def _encoder(name: str) -> Callable[[str], int] | None:
    """Count the tokens of a text with encoding ``name`` (special tokens' text counts as ordinary
    text, as in a prompt), with the Rust backend's ``count`` (twice as fast as the package's
    ``encode_ordinary``, which builds the token list: an estimate of a million rows takes a
    tokenization each); the package's public API when the backend cannot be loaded alone."""
    try:
        backend = _backend()
        count = backend.tokenizer_for_encoding(name).count if backend is not None else None
    except Exception:
        count = None
    if count is None:
        try:
            import bpe_openai

            encoding = bpe_openai.get_encoding(name)
        except Exception:  # an install without the package or its data: fall back, never fail a row
            return None

        def count(text: str) -> int:
            return len(encoding.encode_ordinary(text))
    short: dict[str, int] = {}  # roles, names and instructions repeat on every row

    def tokens(text: str) -> int:
        got = short.get(text) if len(text) <= 64 else None
        if got is None:
            got = tokens_of(text)
            if len(text) <= 64 and len(short) < 8192:
                short[text] = got
        return got

    def tokens_of(text: str) -> int:
        try:
            return count(text)
        except UnicodeEncodeError:  # a lone surrogate: replaced, as tiktoken does
            return count(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    return tokens


@functools.lru_cache(maxsize=256)
def counter(model: str | None) -> Callable[[str], int] | None:
    """The exact token count of text for ``model``, None when its tokenizer is not known."""
    name = encoding_name(model)
    return _encoder(name) if name else None


CONTEXT_WINDOWS = (
    ("gpt-4.1", 1_047_576), ("gpt-5", 400_000), ("gpt-4o", 128_000), ("chatgpt-4o", 128_000),
    ("gpt-4.5", 128_000), ("gpt-4-turbo", 128_000), ("gpt-4-1106", 128_000), ("gpt-4-0125", 128_000),
    ("gpt-4-32k", 32_768), ("gpt-4", 8_192), ("gpt-3.5-turbo-instruct", 4_096), ("gpt-3.5-turbo", 16_385),
    ("o1-mini", 128_000), ("o1", 200_000), ("o3", 200_000), ("o4", 200_000),
    ("text-embedding-3", 8_191), ("text-embedding-ada-002", 8_191),
)
"""Context windows (prompt plus completion cap, tokens) of OpenAI's model families, by the longest
prefix that matches; a config's ``context_window`` adds or overrides."""


def context_window(model: str | None, configured: int | dict[str, int] | None = None) -> int | None:
    """The context window of ``model``: the config's (one number for every model, or per model),
    else :data:`CONTEXT_WINDOWS`; None when unknown."""
    if isinstance(configured, int):
        return configured
    if not model:
        return None
    if configured and model in configured:
        return configured[model]
    name = model.lower().removeprefix("ft:").removeprefix("openai/")
    return next((size for prefix, size in CONTEXT_WINDOWS if name.startswith(prefix)), None)


def estimator(model: str | None = None, typical: bool = False) -> str:
    """How the prompts of ``model`` are counted, for logs, ``status`` and (``typical``: its central
    estimate for a model of unknown tokenizer) ``estimate``."""
    name = encoding_name(model)
    if name and _encoder(name) is not None:
        return f"{name} (exact)"
    if typical:
        return "typical estimate (model of unknown tokenizer: 4 ASCII characters a token, one per other character)"
    return "character estimate (model of unknown tokenizer: an upper bound until the server's headers say)"


def char_estimate(text: str) -> int:
    """The character estimate of ``text`` (see the module docstring): never below a tokenizer's."""
    extra = 0 if text.isascii() else len(text.encode("utf-8")) - len(text)
    return math.ceil(len(text) / CHARS_PER_TOKEN) + extra


def typical_estimate(text: str) -> int:
    """A central estimate of ``text``'s tokens: about 4 ASCII characters a token (OpenAI's
    tokenizers on English), one token per other character (CJK: 1 to 1.5). Not an upper bound."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    ascii_chars = sum(1 for c in text if c < "\x80")
    return math.ceil(ascii_chars / 4) + len(text) - ascii_chars


def _image_tokens(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    detail = (image.get("detail") if isinstance(image, dict) else part.get("detail")) or "auto"
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS


def _texts(value: Any, out: list[str], per_message: int) -> int:
    """Gather the strings of a prompt field into ``out``; return the tokens counted otherwise:
    token ids (an embedding's or completion's input may be token arrays), each message's overhead,
    images."""
    if isinstance(value, str):
        out.append(value)
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image"):
            return _image_tokens(value)
        if "role" in value or "content" in value:  # a message or an input item
            extra = per_message
            for name in ("role", "name"):
                if isinstance(value.get(name), str):
                    out.append(value[name])
                    extra += name == "name"
            content = value.get("content")
            if isinstance(content, (str, list)):
                return extra + _texts(content, out, per_message)
            for name in ("tool_calls", "function_call"):
                if value.get(name):
                    out.append(json.dumps(value[name], ensure_ascii=False))
            return extra
        if isinstance(value.get("text"), str):  # a content part
            out.append(value["text"])
            return 0
        out.append(json.dumps(value, ensure_ascii=False))
        return 0
    if isinstance(value, list):
        return sum(_texts(v, out, per_message) for v in value)
    if value is not None:
        out.append(json.dumps(value, ensure_ascii=False))
    return 0


def estimate_parts(body: dict[str, Any], url: str = CHAT_URL, completion_default: int | None = None,
                   typical: bool = False) -> tuple[int, int]:
    """``(prompt tokens, completion cap)`` of a request: the prompt's count (exact for a model of
    known tokenizer; else the limiter's upper bound, or with ``typical`` the central estimate), and
    the completion's maximum (the endpoint's cap field, times ``n``; the endpoint's default when
    none is set, ``completion_default`` when given)."""
    endpoint = ENDPOINTS.get(url, ENDPOINTS[CHAT_URL])
    texts: list[str] = []
    chat = url in CHAT_FORMAT_URLS  # messages: each with its overhead, and the reply primed
    per_message = TOKENS_PER_MESSAGE if chat else 0
    extra = sum(_texts(body.get(name), texts, per_message) for name in endpoint.prompt)
    for name in ("tools", "functions", "response_format", "text"):
        if body.get(name) and chat:  # counted by the server in a form of its own
            texts.append(json.dumps(body[name], ensure_ascii=False))
    count = counter(body.get("model") or endpoint.default_model)
    if count is not None:
        prompt = sum(count(t) for t in texts) + extra
    else:
        prompt = (typical_estimate if typical else char_estimate)("\n".join(texts)) + extra
    if chat:
        prompt += REPLY_PRIMING
    if not endpoint.completion_default:
        return prompt, 0
    cap = next((body[name] for name in endpoint.completion if body.get(name)), None)
    if cap is None:
        cap = endpoint.completion_default if completion_default is None else completion_default
    return prompt, int(cap) * int(body.get("n") or 1)


def estimate_tokens(body: dict[str, Any], url: str = CHAT_URL, completion_default: int | None = None) -> int:
    """The tokens a request counts against TPM on arrival: its prompt plus its completion's maximum."""
    return sum(estimate_parts(body, url, completion_default))
