"""Token estimates, as the server counts a request against its tokens-per-minute window.

The server counts a request when it arrives: an estimate of its prompt plus its completion's
maximum (``max_tokens`` / ``max_completion_tokens``, times ``n``), and a smaller usage afterwards
gives nothing back. Pure functions; the limiter and ``estimate`` use them.

Two estimators, and :func:`estimator` says which one is in use:

* **tiktoken** (``cl100k_base``) when tiktoken is installed and its encoding file is already in
  its cache on this machine (never downloaded: workers may have no internet);
* the **character estimate** otherwise, an upper bound: one token per 3 characters (OpenAI's
  tokenizers give about 4 in English, digits come in groups of 3), plus one per UTF-8 byte beyond
  a character's first (an accented letter 1 more, a CJK character 2, an emoji 3; tokenizers give a
  CJK character 1 to 1.5 tokens). ``OPT_QUEUE_TOKENIZER=chars``
  forces it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from opt_queue.request import CHAT_URL, ENDPOINTS

CHARS_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 4
TYPICAL_TOKENS_PER_MESSAGE = 3
"""OpenAI's count: 3 tokens around each message, and 3 that prime the reply."""
TIKTOKEN_ENCODING = "cl100k_base"
_TIKTOKEN_URL = f"https://openaipublic.blob.core.windows.net/encodings/{TIKTOKEN_ENCODING}.tiktoken"


@functools.cache
def _tokenizer() -> Callable[[str], int] | None:
    if os.environ.get("OPT_QUEUE_TOKENIZER", "auto") == "chars":
        return None
    try:
        import tiktoken  # optional
    except ImportError:
        return None
    cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(_TIKTOKEN_URL.encode()).hexdigest())):
        return None
    try:
        encoding = tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except Exception:  # a corrupt cache or an incompatible version: fall back, never fail a row
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def estimator() -> str:
    """Which estimate is in use, for logs, ``status`` and ``estimate``."""
    if _tokenizer() is not None:
        return f"tiktoken {TIKTOKEN_ENCODING}"
    return "character estimate (an upper bound; install tiktoken's encoding for exact counts)"


def typical_estimator() -> str:
    """Which estimate ``estimate`` uses for costs."""
    if _tokenizer() is not None:
        return f"tiktoken {TIKTOKEN_ENCODING}"
    return ("typical character estimate (4 ASCII characters a token, one per other character; "
            "install tiktoken's encoding for exact counts)")


def char_estimate(text: str) -> int:
    """The character estimate of ``text`` (see the module docstring): never below the server's."""
    extra = 0 if text.isascii() else len(text.encode("utf-8")) - len(text)
    return math.ceil(len(text) / CHARS_PER_TOKEN) + extra


def typical_estimate(text: str) -> int:
    """A central estimate of ``text``'s tokens, for what a run will cost (``estimate``): about 4
    ASCII characters a token (OpenAI's tokenizers on English), one token per other character
    (CJK: 1 to 1.5). Not an upper bound: the limiter uses :func:`char_estimate`."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    ascii_chars = sum(1 for c in text if c < "\x80")
    return math.ceil(ascii_chars / 4) + len(text) - ascii_chars


def count_typical_tokens(text: str) -> int:
    """Tokens of ``text`` for cost estimates: tiktoken's count when available, else the typical estimate."""
    tokenize = _tokenizer()
    return tokenize(text) if tokenize else typical_estimate(text)


def count_prompt_tokens(text: str) -> int:
    """Tokens of ``text``: tiktoken's count when available, else the character estimate."""
    tokenize = _tokenizer()
    return tokenize(text) if tokenize else char_estimate(text)


def _texts(value: Any, out: list[str], per_message: int = TOKENS_PER_MESSAGE) -> int:
    """Gather the strings of a prompt field into ``out``; return the tokens given as token ids
    (an embedding's or completion's input may be token arrays) and the messages met."""
    if isinstance(value, str):
        out.append(value)
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, dict):  # a message or an input item: its content, at a message's cost
        content = value.get("content", value.get("text"))
        if isinstance(content, (str, list)):
            return per_message + _texts(content, out, per_message)
        out.append(json.dumps(value, ensure_ascii=False))
        return per_message
    if isinstance(value, list):
        return sum(_texts(v, out, per_message) for v in value)
    if value is not None:
        out.append(json.dumps(value, ensure_ascii=False))
    return 0


def estimate_parts(body: dict[str, Any], url: str = CHAT_URL, completion_default: int | None = None,
                   typical: bool = False) -> tuple[int, int]:
    """``(prompt tokens, completion cap)`` of a request: the prompt's estimate (the limiter's upper
    bound, or with ``typical`` the central estimate of :func:`count_typical_tokens` and OpenAI's 3
    tokens a message), and the completion's maximum (the endpoint's cap field, times ``n``; the
    endpoint's default when none is set, ``completion_default`` when given)."""
    endpoint = ENDPOINTS.get(url, ENDPOINTS[CHAT_URL])
    texts: list[str] = []
    count = count_typical_tokens if typical else count_prompt_tokens
    per_message = TYPICAL_TOKENS_PER_MESSAGE if typical else TOKENS_PER_MESSAGE
    extra = sum(_texts(body.get(name), texts, per_message) for name in endpoint.prompt)
    prompt = count("\n".join(texts)) + extra + (3 if texts or extra else 0)
    if not endpoint.completion_default:
        return prompt, 0
    cap = next((body[name] for name in endpoint.completion if body.get(name)), None)
    if cap is None:
        cap = endpoint.completion_default if completion_default is None else completion_default
    return prompt, int(cap) * int(body.get("n") or 1)


def estimate_tokens(body: dict[str, Any], url: str = CHAT_URL, completion_default: int | None = None) -> int:
    """The tokens a request counts against TPM on arrival: its prompt plus its completion's maximum."""
    return sum(estimate_parts(body, url, completion_default))
