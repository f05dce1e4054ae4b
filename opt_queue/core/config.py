"""Configuration: ``config.json`` (the original form and the extended one) plus the environment.

The original toolkit's file still works::

    {"api_keys": ["sk-...", "sk-..."], "api_base": "https://..."}

Every other field is optional; see ``config.example.json`` and docs/configuration.md for the full reference.
The environment is read in one place, :func:`load_config`: ``OPT_QUEUE_API_KEYS`` (comma separated
keys, added to the file's), ``OPT_QUEUE_BROKER_URL`` (overrides ``broker_url``),
``OPT_QUEUE_SENTINEL_MASTER`` (overrides ``sentinel_master``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from opt_queue.core.errors import ConfigError, OptQueueError

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.openai.com/v1"
PROVIDERS = ("openai", "anthropic", "gemini")
"""The APIs a key may speak (``"provider"`` of a key object; ``openai`` when it says none)."""
OUTPUT_WINDOWS = frozenset({"anthropic"})
"""Providers that limit output tokens per minute in a window of its own (learned from headers)."""
DEFAULT_BASES = {"openai": DEFAULT_API_BASE, "anthropic": "https://api.anthropic.com",
                 "gemini": "https://generativelanguage.googleapis.com"}
"""Each provider's own base URL, as its SDK takes it (Anthropic's and Gemini's without a version path)."""
DEFAULT_MODEL = "gpt-3.5-turbo-0613"
ENV_KEYS = "OPT_QUEUE_API_KEYS"
ENV_BROKER = "OPT_QUEUE_BROKER_URL"
ENV_SENTINEL_MASTER = "OPT_QUEUE_SENTINEL_MASTER"
ENV_CONFIG = "OPT_QUEUE_CONFIG"
ENV_OVERRIDES = "OPT_QUEUE_OVERRIDES"  # JSON object of key-free fields, set for local workers

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_WINDOW_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*$")


def provider_of(model: str) -> str:
    """The provider a model's name says: ``claude-*`` Anthropic's, ``gemini-*`` Google's Gemini
    API, any other name OpenAI's API (or one that speaks it)."""
    name = model.lower().rsplit("/", 1)[-1]  # "models/gemini-2.5-flash", "anthropic/claude-..."
    if name.startswith("claude-"):
        return "anthropic"
    if name.startswith("gemini-"):
        return "gemini"
    return "openai"


def _api_base(value: str | None) -> str | None:
    """An ``api_base`` must be an http(s) URL with a host (an empty string means the default)."""
    if value is None or not value.strip():
        return value
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http(s) URL; write the API's base URL, such as "
                         f"'{DEFAULT_API_BASE}'")
    return value.strip()


def parse_seconds(value: Any) -> float:
    """Seconds from a number or a duration such as ``90s``, ``30m``, ``12h``, ``7d``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
    if not m or (m.group(2) and m.group(2) not in _PERIODS):
        raise ValueError(f"{value!r} is not a duration; write seconds or a number with s, min, h or d, "
                         f"such as '7d'")
    return float(m.group(1)) * (_PERIODS[m.group(2)] if m.group(2) else 1.0)


def fingerprint(secret: str) -> str:
    """Return the short public name of an API key: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


class Window(BaseModel):
    """At most ``limit`` units (requests or tokens) in any ``period`` seconds."""

    model_config = ConfigDict(frozen=True)
    limit: int = Field(ge=1)
    period: float = Field(gt=0)

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse ``N/PERIOD``: ``3/min``, ``600/10s``, ``10/s``, ``200/day``, ``5/1.5s``."""
        m = _WINDOW_RE.match(str(text).lower())
        if not m or m.group(3) not in _PERIODS:
            raise ValueError(
                f"{text!r} is not a limit; write N/PERIOD such as '3/min', '600/10s' or '200/day'"
            )
        count = float(m.group(2)) if m.group(2) else 1.0
        return cls(limit=int(m.group(1)), period=count * _PERIODS[m.group(3)])

    def __str__(self) -> str:
        for unit, seconds in (("day", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
            if self.period == seconds:
                return f"{self.limit}/{unit}"
        return f"{self.limit}/{self.period:g}s"


class Limits(BaseModel):
    """Request windows, token windows and output-token windows (Anthropic's) of one key (or one
    group of keys). ``tokens`` are what the provider's token window counts: a request's prompt and
    ``max_tokens`` on OpenAI's API, its input on Anthropic's and Gemini's."""

    model_config = ConfigDict(frozen=True)
    requests: tuple[Window, ...] = ()
    tokens: tuple[Window, ...] = ()
    output_tokens: tuple[Window, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        requests = [_window(w) for w in data.pop("requests", [])]
        tokens = [_window(w) for w in data.pop("tokens", [])]
        output = [_window(w) for w in data.pop("output_tokens", [])]
        for name, period, target in (("rpm", 60.0, requests), ("rpd", 86400.0, requests),
                                     ("rps", 1.0, requests), ("tpm", 60.0, tokens),
                                     ("tpd", 86400.0, tokens), ("otpm", 60.0, output)):
            if name in data:
                value = data.pop(name)
                if value is not None:
                    target.append(Window(limit=value, period=period))
        if data:
            raise ValueError(f"unknown field(s) {sorted(data)}; use rpm, tpm, otpm, rpd, requests, tokens, "
                             f"output_tokens")
        return {"requests": requests, "tokens": tokens, "output_tokens": output}

    def override(self, other: Limits) -> Limits:
        """Return these limits with ``other``'s windows replacing those of the same period."""
        def merge(base: tuple[Window, ...], top: tuple[Window, ...]) -> tuple[Window, ...]:
            periods = {w.period for w in top}
            return tuple(sorted((*(w for w in base if w.period not in periods), *top), key=lambda w: w.period))
        return Limits(requests=merge(self.requests, other.requests),
                      tokens=merge(self.tokens, other.tokens),
                      output_tokens=merge(self.output_tokens, other.output_tokens))

    def __str__(self) -> str:
        parts = [f"{w} req" for w in self.requests] + [f"{w} tok" for w in self.tokens] + \
            [f"{w} out" for w in self.output_tokens]
        return ", ".join(parts) or "unlimited"


def _window(value: Any) -> Window:
    if isinstance(value, Window):
        return value
    if isinstance(value, dict):
        return Window(**value)
    return Window.parse(value)


SEED_LIMITS = Limits(rpm=3, tpm=40000, rpd=200)
"""The limits of a new account of 2023 (the original toolkit's era); no longer a default: limits
nobody configured are discovered from the server's headers."""


def _model_limits(value: Any) -> Any:
    """``{"model": {limits}}`` -> ``{"model": Limits}``, with the model named in errors."""
    if value is None:
        return value
    if not isinstance(value, dict):
        raise ValueError('must map model names to limits, such as {"gpt-4o-mini": {"rpm": 500}}')
    return {str(m): (v if isinstance(v, Limits) else Limits.model_validate(v or {})) for m, v in value.items()}


class GroupConfig(BaseModel):
    """Keys that share one budget (one organization or project), with the budget's own limits."""

    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(default_factory=list)  # key strings or fingerprints of keys in api_keys
    limits: Limits | None = None
    models: dict[str, Limits] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    otpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)

    _models = field_validator("models", mode="before")(classmethod(lambda cls, v: _model_limits(v)))

    def own_limits(self) -> Limits:
        """The group's windows (its ``limits`` then its shorthands), without any default."""
        limits = self.limits or Limits()
        short = {k: v for k, v in (("rpm", self.rpm), ("tpm", self.tpm), ("otpm", self.otpm), ("rpd", self.rpd)) if v}
        return limits.override(Limits(**short)) if short else limits


class PriceConfig(BaseModel):
    """A model's price in dollars per million tokens (``prices`` in the config)."""

    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(default=0.0, ge=0)
    cached_input: float | None = Field(default=None, ge=0)


class CacheConfig(BaseModel):
    """The response cache across jobs (``cache`` in the config): answers kept in Redis for ``ttl``."""

    model_config = ConfigDict(extra="forbid")
    ttl: float = Field(default=7 * 86400.0, gt=0)

    _ttl = field_validator("ttl", mode="before")(classmethod(lambda cls, v: parse_seconds(v)))


class AzureConfig(BaseModel):
    """An Azure OpenAI resource: requests go to ``{endpoint}/openai/deployments/{deployment}/...``
    with ``api-version`` and the key in an ``api-key`` header (the SDK's ``AsyncAzureOpenAI``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    endpoint: str
    api_version: str
    deployment: str | None = None  # else the row's model names the deployment

    _url = field_validator("endpoint")(classmethod(lambda cls, v: _api_base(v)))


class KeyConfig(BaseModel):
    """One API key as written in ``api_keys``: a string, or an object with overrides."""

    model_config = ConfigDict(extra="forbid")
    key: SecretStr
    provider: Literal["openai", "anthropic", "gemini"] = "openai"
    api_base: str | None = None
    azure: AzureConfig | None = None
    headers: dict[str, str] | None = None  # sent with every request of this key
    group: str | None = None
    models: list[str] | dict[str, Limits] | None = None  # served models; a mapping also gives limits
    limits: Limits | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    otpm: int | None = Field(default=None, ge=1)  # output tokens per minute (Anthropic's third window)
    rpd: int | None = Field(default=None, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        return v if v is None or isinstance(v, list) else _model_limits(v)

    def own_limits(self) -> Limits:
        """The key's windows (its ``limits`` then its shorthands), without any default."""
        limits = self.limits or Limits()
        short = {k: v for k, v in (("rpm", self.rpm), ("tpm", self.tpm), ("otpm", self.otpm), ("rpd", self.rpd)) if v}
        return limits.override(Limits(**short)) if short else limits

    @property
    def has_limits(self) -> bool:
        return bool(self.limits or self.rpm or self.tpm or self.otpm or self.rpd or isinstance(self.models, dict))

    @field_validator("key")
    @classmethod
    def _not_blank(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("an API key is empty")
        return SecretStr(v.get_secret_value().strip())

    _url = field_validator("api_base")(classmethod(lambda cls, v: _api_base(v)))

    @model_validator(mode="after")
    def _azure_is_openai(self) -> KeyConfig:
        if self.azure is not None and self.provider != "openai":
            raise ValueError(f"azure: a key of provider {self.provider!r} is not an Azure OpenAI key; "
                             f"remove \"azure\" or the provider")
        return self


class ModelConfig(BaseModel):
    """The model and the request parameters sent with every row."""

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_MODEL
    fallback: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        """Request parameters other than the model name (temperature, max_tokens, ...)."""
        return dict(self.model_extra or {})


class ApiKey(BaseModel):
    """A key resolved against the defaults: what the engine uses. ``repr`` never shows the secret."""

    model_config = ConfigDict(frozen=True)
    secret: SecretStr
    fingerprint: str
    api_base: str
    limits: Limits
    provider: str = "openai"
    """The API the key speaks (``PROVIDERS``)."""
    speaks_for: tuple[str, ...] = ("openai",)
    """The providers whose models (by name) this key serves when it lists no ``models``: its own,
    and for an OpenAI key also those of providers no key of the config speaks (a gateway)."""
    models: tuple[str, ...] | None = None
    group: str | None = None
    model_limits: tuple[tuple[str, Limits], ...] = ()  # per model: windows replacing ``limits``'
    azure: AzureConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def limits_for(self, model: str) -> Limits:
        """The configured windows for ``model``: the key's (or group's) and the model's own on top."""
        for name, limits in self.model_limits:
            if name == model:
                return self.limits.override(limits)
        return self.limits

    @property
    def bucket(self) -> str:
        """Name of the rate-limit state this key draws from: its group, else its fingerprint."""
        return f"group-{self.group}" if self.group else self.fingerprint

    def serves(self, model: str) -> bool:
        """Whether rows of ``model`` may go to this key: the key's ``models`` when it lists them,
        else the model's name (:func:`provider_of`)."""
        return model in self.models if self.models is not None else provider_of(model) in self.speaks_for


class Config(BaseModel):
    """The whole configuration, validated."""

    model_config = ConfigDict(extra="forbid")
    api_keys: list[SecretStr | KeyConfig] = Field(default_factory=list)
    api_base: str | None = None
    limits: Limits = Field(default_factory=Limits)
    models: dict[str, Limits] | None = None
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    default_limits: Limits = Field(default_factory=Limits)
    header_period: float = Field(default=60.0, gt=0)
    learned_limits_ttl: float = Field(default=600.0, gt=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    max_retries: int = Field(default=5, ge=0)
    api_client: Literal["openai", "aiohttp"] = "openai"
    request_timeout: float = Field(default=60.0, gt=0)
    broker_url: str | None = Field(default=None, repr=False)  # may hold a password
    sentinel_master: str | None = None  # the master's name, when broker_url names Sentinels
    replica_acks: int | None = Field(default=None, ge=0, le=16)  # None: 1 under Sentinel, else 0
    concurrency: int = Field(default=256, ge=1, le=16384)
    rows_per_task: int = Field(default=1, ge=1, le=1000)
    output_format: Literal["auto", "seed", "full", "batch"] = "auto"
    schema_retries: int = Field(default=2, ge=0, le=10)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    max_cost: float | None = Field(default=None, gt=0)
    max_tokens_total: int | None = Field(default=None, gt=0)
    dedupe: bool | None = None
    context_window: int | dict[str, int] | None = None  # tokens: one for every model, or per model
    retry_failed: bool = False
    lane: Literal["sync", "flex", "batch"] = "sync"
    flex_fallback: bool = True
    flex_timeout: float = Field(default=900.0, gt=0)
    deadline: float | None = Field(default=None, gt=0)
    batch_max_lines: int = Field(default=50_000, ge=1, le=50_000)
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    batch_token_limit: int | None = Field(default=None, gt=0)
    batch_poll: float = Field(default=30.0, ge=0.2)
    batch_attempts: int = Field(default=3, ge=1)
    cache: CacheConfig | None = None
    max_queued: int = Field(default=50_000, ge=0)
    batch_max_queued: int = Field(default=500_000, ge=0)
    visibility_timeout: int = Field(default=3600, ge=1)
    lease_seconds: float = Field(default=30.0, ge=2)
    state_ttl: float = Field(default=7 * 86400.0, ge=0)
    safety_margin: float = Field(default=0.25, ge=0)
    safety_fraction: float = Field(default=0.01, ge=0, le=0.5)
    backoff_base: float = Field(default=1.0, ge=0)
    backoff_max: float = Field(default=60.0, ge=0)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _deadline_lane(self) -> Config:
        if self.deadline is not None and self.lane != "batch":
            if "lane" in self.model_fields_set:
                raise ValueError(f"deadline: a deadline is for the batch lane (its leftovers go synchronously "
                                 f"at the cut-over); remove it or set lane \"batch\", not {self.lane!r}")
            self.lane = "batch"
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _model_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    _url = field_validator("api_base")(classmethod(lambda cls, v: _api_base(v)))

    @model_validator(mode="after")
    def _broker(self) -> Config:
        from opt_queue.core.broker_url import check_url, is_sentinel

        if self.broker_url:
            try:
                check_url(self.broker_url, self.sentinel_master)
            except OptQueueError as exc:
                raise ValueError(str(exc)) from None
        elif self.sentinel_master:
            raise ValueError("sentinel_master: it names the master of Sentinels that broker_url lists; set "
                             "broker_url to sentinel://HOST:26379;sentinel://HOST2:26379/0, or remove it")
        if self.broker_url and self.sentinel_master and not is_sentinel(self.broker_url):
            raise ValueError("sentinel_master: broker_url names one Redis, not Sentinels; remove "
                             "sentinel_master, or write broker_url as sentinel://HOST:26379;...")
        return self

    @property
    def acks_from_replicas(self) -> int:
        """How many replicas must hold a row's result before its task is acknowledged (Redis
        ``WAIT``): ``replica_acks``, else 1 under Sentinel and 0 with one Redis."""
        if self.replica_acks is not None:
            return self.replica_acks
        from opt_queue.core.broker_url import is_sentinel

        return 1 if self.broker_url and is_sentinel(self.broker_url) else 0

    @field_validator("state_ttl", "header_period", "learned_limits_ttl", "deadline", "batch_poll", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_seconds(v)

    _models = field_validator("models", mode="before")(classmethod(lambda cls, v: _model_limits(v)))

    @model_validator(mode="after")
    def _discovery_defaults(self) -> Config:
        periods = {w.period for w in (*self.default_limits.requests, *self.default_limits.tokens)}
        if periods - {self.header_period}:
            raise ValueError(f"default_limits: give windows of the header period ({self.header_period:g}s) "
                             f"only, such as {{\"rpm\": 600}}: they are where discovery starts")
        self._entries()  # the groups' key references, checked here so that errors name the field
        if self.max_cost is not None:
            from opt_queue.core.prices import Prices

            prices = Prices({name: p.model_dump() for name, p in self.prices.items()})
            for name in filter(None, (self.model.name, self.model.fallback)):
                if prices.price(name) is None:
                    raise ValueError(f"max_cost: the price of model {name} is unknown; give it in "
                                     f"\"prices\": {{\"{name}\": {{\"input\": ..., \"output\": ...}}}} "
                                     f"(dollars per million tokens)")
        if self.api_client == "aiohttp":
            for i, e in enumerate(self.api_keys):
                if isinstance(e, KeyConfig) and e.azure is not None:
                    raise ValueError(f"api_keys[{i}].azure: Azure keys are called through the openai SDK; "
                                     f"remove \"api_client\": \"aiohttp\"")
        return self

    def _entries(self) -> list[KeyConfig]:
        """``api_keys`` as objects, with the group each key belongs to (its own ``group`` or the
        group whose ``keys`` name it), and the keys that only a group names appended."""
        entries = [e if isinstance(e, KeyConfig) else KeyConfig(key=e) for e in self.api_keys]
        by_name = {}
        for e in entries:
            by_name[e.key.get_secret_value()] = by_name[fingerprint(e.key.get_secret_value())] = e
        for name, group in self.groups.items():
            for i, ref in enumerate(group.keys):
                e = by_name.get(ref.strip())
                if e is None:
                    if ref.strip().startswith("key-"):
                        raise ValueError(f"groups.{name}.keys[{i}]: no key in api_keys has fingerprint {ref}")
                    e = KeyConfig(key=SecretStr(ref))
                    entries.append(e)
                    by_name[ref.strip()] = by_name[fingerprint(ref.strip())] = e
                if e.group not in (None, name):
                    raise ValueError(f"groups.{name}.keys[{i}]: the key is already in group {e.group!r}")
                e.group = name
        for i, e in enumerate(entries[:len(self.api_keys)]):
            if e.group in self.groups and e.has_limits:
                raise ValueError(f"api_keys[{i}]: a key of group {e.group!r} shares the group's budget; "
                                 f"put its limits on groups.{e.group}")
        speaks: dict[str, str] = {}
        for i, e in enumerate(entries):
            if e.group is not None and speaks.setdefault(e.group, e.provider) != e.provider:
                raise ValueError(f"api_keys[{i}]: group {e.group!r} holds keys of {speaks[e.group]!r} and "
                                 f"{e.provider!r}; a group shares one provider's limits: give each its own group")
        return entries

    def keys(self) -> list[ApiKey]:
        """Resolve every key against the defaults: api_base, and the configured limits (the top
        level's, then the model's, then the key's or its group's; what none of them sets for a
        window of the header period is discovered from the server)."""
        base = (self.api_base or "").strip() or DEFAULT_API_BASE
        entries = self._entries()
        spoken = {kc.provider for kc in entries}
        gateway = tuple(p for p in PROVIDERS if p == "openai" or p not in spoken)
        out: list[ApiKey] = []
        for kc in entries:
            secret = kc.key.get_secret_value()
            group = self.groups.get(kc.group) if kc.group else None
            own = group if group is not None else kc
            models = dict(self.models or {})
            for name, limits in ((own.models if isinstance(own.models, dict) else None) or {}).items():
                models[name] = models[name].override(limits) if name in models else limits
            served = kc.models if isinstance(kc.models, list) else list(kc.models) if kc.models else None
            own_base = base if kc.provider == "openai" else DEFAULT_BASES[kc.provider]
            out.append(ApiKey(secret=SecretStr(secret), fingerprint=fingerprint(secret), provider=kc.provider,
                              speaks_for=gateway if kc.provider == "openai" else (kc.provider,),
                              api_base=(kc.azure.endpoint if kc.azure else kc.api_base or own_base).rstrip("/"),
                              azure=kc.azure, headers=tuple(sorted((kc.headers or {}).items())),
                              limits=self.limits.override(own.own_limits()),
                              models=tuple(served) if served is not None else None,
                              group=kc.group, model_limits=tuple(sorted(models.items()))))
        return out


_FIXES = {
    "extra_forbidden": "is not a field opt-queue knows; check its spelling (see config.example.json)",
    "missing": "is required",
}


TOP = "(top level)"


def _where(loc: tuple[Any, ...]) -> str:
    """``api_keys[0].rpm`` from pydantic's location, without its union and validator tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in str(part) for c in "[]()-") or str(part) in ("str", "KeyConfig", "function-after",
                                                                   "function-plain", "function-before"):
            continue  # "lax-or-strict[...]", "function-after[...]": pydantic's inner names
        else:
            out += ("." if out else "") + str(part)
    return out or TOP


def _describe(err: ValidationError, source: str) -> str:
    """One readable line: each bad field, what is wrong with it, and the fix."""
    found: dict[str, str] = {}
    for e in err.errors():
        where = _where(e["loc"])
        if e["type"] in _FIXES:
            msg = _FIXES[e["type"]]
        else:
            msg = e["msg"].removeprefix("Value error, ")
        if where.startswith("api_keys[") and e["type"] in ("string_type", "model_type", "dict_type"):
            msg = ('must be a key string, or an object such as {"key": "sk-...", "rpm": 500}')
        found.setdefault(where, msg)  # a union reports each branch; the first says enough
    for where in [w for w in found if any(o.startswith(w + ".") for o in found)]:
        del found[where]  # "api_keys[0]: must be ..." when "api_keys[0].rpm: ..." says what is wrong
    return f"{source} is not a valid opt-queue config: " + "; ".join(
        m if w == TOP else f"{w}: {m}" for w, m in found.items())  # a whole-config check names its fields


def load_config(path: str | os.PathLike[str] | None = None, *, env: dict[str, str] | None = None,
                require_keys: bool = True) -> Config:
    """Read and validate a config file and the ``OPT_QUEUE_*`` environment."""
    env = dict(os.environ if env is None else env)
    path = path or env.get(ENV_CONFIG)
    data: dict[str, Any] = {}
    source = "the environment"
    if path:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist; create it (see config.example.json)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a JSON object with at least \"api_keys\"")
        _warn_if_world_readable(p, data)
    extra = [k.strip() for k in env.get(ENV_KEYS, "").split(",") if k.strip()]
    if extra:
        data["api_keys"] = list(data.get("api_keys") or []) + extra
    if env.get(ENV_BROKER):
        data["broker_url"] = env[ENV_BROKER]
    if env.get(ENV_SENTINEL_MASTER):
        data["sentinel_master"] = env[ENV_SENTINEL_MASTER]
    if env.get(ENV_OVERRIDES):
        try:
            data.update(json.loads(env[ENV_OVERRIDES]))
        except (ValueError, TypeError):
            raise ConfigError(f"{ENV_OVERRIDES} must hold a JSON object") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if require_keys and not cfg.api_keys:
        raise ConfigError(f"{source} gives no API key: add \"api_keys\" to the config "
                          f"or set {ENV_KEYS}=key1,key2")
    fps = [k.fingerprint for k in cfg.keys()]
    if len(set(fps)) != len(fps):
        raise ConfigError(f"{source}: api_keys lists the same key twice")
    return cfg


def _warn_if_world_readable(p: Path, data: dict[str, Any]) -> None:
    if not data.get("api_keys"):
        return
    try:
        mode = p.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("config file %s holds API keys and is readable by every user; run: chmod 600 %s", p, p)
