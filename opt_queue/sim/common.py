"""What the simulated API's endpoints share: the answer a conversation gets, a prompt's identity
and token count, and JSON that matches a schema. Pure functions."""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from typing import Any


def sim_answer(model: str, messages: list[dict[str, Any]]) -> str:
    """The (stripped) answer the simulated API gives to ``messages`` on ``model``."""
    digest = hashlib.sha256(json.dumps([model, messages], ensure_ascii=False, sort_keys=True).encode())
    last = str(messages[-1].get("content") or "")[:24] if messages else ""
    return f"answer {digest.hexdigest()[:10]}: {last}".strip()


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """Identity of a prompt, to count how often the same row was paid for."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def count_tokens(text: str) -> int:
    """The simulated tokenizer, close to OpenAI's on average: four ASCII characters a token, one
    token per other character (a CJK character is 1 to 1.5 tokens there)."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    ascii_chars = sum(1 for c in text if c < "\x80")
    return math.ceil(ascii_chars / 4) + len(text) - ascii_chars


def _schema_instance(schema: Any, text: str) -> Any:
    """A value that matches ``schema`` (the common keywords), for structured outputs."""
    if not isinstance(schema, dict):
        return text
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: _schema_instance(sub, text) for name, sub in props.items()}
    if kind == "array":
        return [_schema_instance(schema.get("items"), text) for _ in range(int(schema.get("minItems") or 1))]
    return {"string": text, "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text)


class Windows:
    """Server-side sliding log of one organization's (or project's) admitted requests, for its model:
    requests and tokens per ``cfg.minute``, requests per ``cfg.day``."""

    def __init__(self) -> None:
        self.log: deque[tuple[float, int]] = deque()
        self.day: deque[float] = deque()

    def check(self, now: float, tokens: int, k: Any, cfg: Any) -> tuple[str, float] | None:
        while self.log and self.log[0][0] <= now - cfg.minute:
            self.log.popleft()
        while self.day and self.day[0] <= now - cfg.day:
            self.day.popleft()
        if k.rpm is not None and len(self.log) + 1 > k.rpm:
            return "requests per min (RPM)", self.log[len(self.log) - k.rpm][0] + cfg.minute - now
        if k.rpm is not None and cfg.burst_divisor > 0:
            short, cap = cfg.minute / cfg.burst_divisor, math.ceil(k.rpm / cfg.burst_divisor)
            recent = [ts for ts, _ in self.log if ts > now - short]
            if len(recent) + 1 > cap:
                return "requests per min (RPM)", recent[len(recent) - cap] + short - now
        if k.tpm is not None:
            used = sum(t for _, t in self.log)
            if used + tokens > k.tpm:
                freed, wait = 0, cfg.minute
                for ts, t in self.log:
                    freed += t
                    if used - freed + tokens <= k.tpm:
                        wait = ts + cfg.minute - now
                        break
                return "tokens per min (TPM)", wait
        if k.rpd is not None and len(self.day) + 1 > k.rpd:
            return "requests per day (RPD)", self.day[len(self.day) - k.rpd] + cfg.day - now
        return None

    def admit(self, now: float, tokens: int) -> None:
        self.log.append((now, tokens))
        self.day.append(now)
